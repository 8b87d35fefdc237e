"""Checks of the tensor arguments both entry points share, run before any kernel is launched
(the scalar options are params.py's).

Every error names the argument and says what was expected, so a mistake in a training script
fails on the first call with a message instead of a NaN or an illegal memory access later.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, x, *, ndim: int, float_dtype: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if float_dtype and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_labels(labels, *, rows: int, tokens: int) -> None:
    """Type, dtype and shape of ``labels``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != (rows, tokens):
        raise ValueError(
            f"labels must have shape (2B, T) = {(rows, tokens)} to match the logits/hidden states, "
            f"got {tuple(labels.shape)}"
        )


def count_scored_labels(labels: torch.Tensor, *, vocab: int, ignore_index: int) -> int:
    """The number of scored labels, after checking that every label is in [0, V) or
    ignore_index (a wrong one would read out of bounds in the kernels). Both come back in one
    transfer: this is the only host synchronisation of a loss call."""
    scored = labels != ignore_index
    bad = scored & ((labels < 0) | (labels >= vocab))
    count, n_bad = torch.stack([scored.sum(), bad.sum()]).tolist()
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"labels{list(first)} = {int(labels[first])}"
        )
    return int(count)


def check_not_sharded(**tensors) -> None:
    """A DTensor (an FSDP2-sharded parameter) reaching the functional API would be read as its
    local shard: refuse it, saying what to do instead."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 kept it private
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return
    for name, x in tensors.items():
        if isinstance(x, DTensor):
            raise TypeError(
                f"{name} is a sharded DTensor (an FSDP2 parameter): the loss needs the whole "
                "tensor. Call it through LinearEpsilonDPOHead inside a fully_shard-ed module, "
                f"whose forward gathers the weight, or pass {name}.full_tensor()"
            )


def check_pair_rows(name: str, rows: int) -> None:
    if rows == 0 or rows % 2:
        raise ValueError(
            f"{name}.shape[0] must be 2B > 0 (rows [0, B) chosen, [B, 2B) rejected), got {rows}"
        )


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first}, {name} is on {dev}"
            )
    return first
