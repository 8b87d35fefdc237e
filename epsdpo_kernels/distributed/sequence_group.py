"""Sequence parallelism: each rank of a group holds some tokens of every sequence.

ε-DPO needs only per-sequence sums of per-token statistics (docs/SPEC.md, Per sequence), and
sums over disjoint token sets add: each rank reduces its own tokens to the ``(SEQUENCE_FIELDS,
2B)`` buffer, one all-reduce of 6·2B floats completes it, and every rank then runs the same pair
head on the same sums, so every rank holds the full loss and every per-pair field. The backward
needs no communication: a token's gradient depends on its own logits and its sequence's
coefficient c_n, which every rank has, so each rank's backward gives exactly its own tokens'
share of the single-process gradient.

Any split of the tokens works (contiguous blocks, context parallelism's load-balanced chunks, the
tokens of a packed stream in any order), since each token's sequence is named by its row (padded)
or its ``sequence_ids`` entry (packed). Every rank must call the loss with the same sequences
(2B, or ``num_pairs``) and the same options: that is checked with one small all-reduce before
any kernel runs, so a mismatch is a ``ValueError`` on every rank rather than a hang or wrong sums.
"""

from __future__ import annotations

import torch

from .agreement import check_ranks_agree


def resolve_group(sequence_group):
    """The ProcessGroup of ``sequence_group`` (a ProcessGroup, or a 1-D DeviceMesh such as
    ``mesh["cp"]``); None for None. Raises before any collective runs."""
    if sequence_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "sequence_group: torch.distributed is not initialised (init_process_group first)"
        )
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(sequence_group, DeviceMesh):
        if sequence_group.ndim != 1:
            raise ValueError(
                f"sequence_group: a DeviceMesh of {sequence_group.ndim} dimensions "
                f"{sequence_group.mesh_dim_names}; pass the one dimension the sequences are "
                "split over, e.g. mesh['cp']"
            )
        return sequence_group.get_group()
    if not isinstance(sequence_group, dist.ProcessGroup):
        raise TypeError(
            "sequence_group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got "
            f"{type(sequence_group).__name__}"
        )
    return sequence_group


def check_group_agrees(group, device: torch.device, count: int, options) -> None:
    """Every rank of ``group`` holds the same number of sequences and the same options;
    otherwise a ValueError, raised on every rank alike."""
    check_ranks_agree(
        group,
        device,
        {"sequences (2B)": count, **options.agreed_values()},
        "sequence_group",
        "every rank must call the loss with the same sequences and options",
    )


def complete_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """This rank's per-sequence sums → the group's (in place); ``sums`` unchanged without one."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    return sums
