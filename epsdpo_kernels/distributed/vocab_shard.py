"""Vocabulary parallelism: each rank of a group holds rows ``[offset, offset + V_r)`` of the
lm_head (a DTensor ``Shard(0)``, what ``ColwiseParallel`` on the lm_head gives) and the same,
replicated hidden states.

Forward, per token: each rank computes its shard's logits and, for each of the four distributions of
docs/SPEC.md (policy h, reference g, the two mixes h ± ε(h − g)), the partial log-sum-exp as (max, Σ
exp(x − max)), the lm_head outputs at the label when the label falls in its shard, Σ_v h and (for
WPO's weights) the policy's Σ exp(2(h − max)) (layout.py, ``SHARD_*``). The partials merge exactly:
one MAX all-reduce of the 4 maxes, then the 8 sums, the Σexp rescaled to the merged maxes first,
gathered and added in rank order (``merge_partials``): 12 floats per token, never a logit. The
merged values give the token fields of layout.py, after which everything (sequence sums, pair head)
is the single-process path.

Backward: the per-token gradient ``c·(onehot − softmax)`` of a shard needs only the shard's
logits and the merged lse, so each rank runs the usual vocabulary-slice backward on its own rows
(labels offset by its shard) and gets its weight (and bias) gradient shard; the hidden-state
gradient Σ_v G[:, v]·W[v] is a sum over shards, completed by one SUM all-reduce of S × H floats.

The partials come from the backend's token pass over the shard (the Triton token kernel's
split mode, one launch for the whole shard; torch_backend/vocab_shard.py, the reference) and
the merged stats from its finish (dispatch.py); this module holds the shards and their
collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import layout as L
from .agreement import check_ranks_agree


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of the vocabulary: rows ``[offset, offset + rows)`` of ``vocab``."""

    offset: int
    rows: int
    vocab: int
    group: object  # the ProcessGroup of the ranks sharing the vocabulary


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _vocab_dim(name: str, x, tensor_dim: int = 0) -> int:
    """The mesh dimension over which DTensor ``x`` is sharded on ``tensor_dim`` (its vocabulary
    dimension), every other mesh dimension replicated; a TypeError for any other placement."""
    from torch.distributed.tensor import Replicate, Shard

    tensor_dim %= x.ndim
    shards = [
        d
        for d, p in enumerate(x.placements)
        if isinstance(p, Shard) and p.dim % x.ndim == tensor_dim
    ]
    others = [
        p for d, p in enumerate(x.placements) if d not in shards and not isinstance(p, Replicate)
    ]
    if len(shards) != 1 or others or type(x.placements[shards[0]]) is not Shard:
        raise TypeError(
            f"{name} is a DTensor with placements {tuple(x.placements)}: the loss takes it "
            f"sharded over the vocabulary on one mesh dimension (Shard({tensor_dim}), every other "
            "dimension Replicate(), as ColwiseParallel gives); an FSDP2-sharded weight must be "
            f"gathered first (LinearEpsilonDPOHead inside a fully_shard-ed module, or "
            f"{name}.full_tensor())"
        )
    return shards[0]


def shard_of(name: str, weight, tensor_dim: int = 0) -> VocabShard:
    """The ``VocabShard`` of a DTensor sharded over the vocabulary on ``tensor_dim`` (torch.chunk's
    split: the first ranks hold ⌈V/n⌉ entries, the last may hold fewer or none)."""
    dim = _vocab_dim(name, weight, tensor_dim)
    mesh = weight.device_mesh
    vocab, size = weight.shape[tensor_dim], mesh.size(dim)
    per_rank = math.ceil(vocab / size)
    coordinate = mesh.get_local_rank(dim)
    offset = min(vocab, coordinate * per_rank)
    rows = min(vocab, offset + per_rank) - offset
    if weight.to_local().shape[tensor_dim] != rows:
        raise TypeError(
            f"{name}: its local shard has {weight.to_local().shape[tensor_dim]} entries where a "
            f"shard of "
            f"{vocab} rows over {size} ranks gives {rows}"
        )
    return VocabShard(offset=offset, rows=rows, vocab=vocab, group=mesh.get_group(dim))


def localize(inputs):
    """Plain tensors for the loss from a call whose ``policy_weight`` may be vocabulary-sharded:
    ``inputs`` is a NamedTuple (plans.LinearInputs) whose fields end in ``_hidden``, ``_weight``
    or ``_bias``; returned alike, with the weights' and biases' local shards (a plain reference
    weight or bias is sliced to the policy's shard) and the hidden states' local values (plain,
    or replicated DTensors), and the ``VocabShard``. DTensors keep their gradient path:
    ``to_local``'s backward gives the weight gradient the weight's placement. Without a sharded
    policy weight nothing changes, and any DTensor is left for
    ``validation.check_not_sharded`` to refuse."""
    dtensor = _dtensor_type()
    weight = inputs.policy_weight
    if dtensor is None or not isinstance(weight, dtensor):
        return inputs, None
    shard = shard_of("policy_weight", weight)
    out = {}
    for name, x in inputs._asdict().items():
        if x is None:
            out[name] = None
        elif name.endswith("_hidden"):
            if isinstance(x, dtensor):
                from torch.distributed.tensor import Replicate

                if not all(isinstance(p, Replicate) for p in x.placements):
                    raise TypeError(
                        f"{name} is a DTensor with placements {tuple(x.placements)}: with a "
                        "vocabulary-sharded lm_head the hidden states must be replicated "
                        "(a plain tensor, or Replicate())"
                    )
                x = x.to_local()
            out[name] = x
        elif isinstance(x, dtensor):
            other = shard_of(name, x)
            if (other.offset, other.rows, other.vocab) != (shard.offset, shard.rows, shard.vocab):
                raise TypeError(
                    f"{name} is sharded as rows [{other.offset}, {other.offset + other.rows}) of "
                    f"{other.vocab}, policy_weight as [{shard.offset}, "
                    f"{shard.offset + shard.rows}) of {shard.vocab}: shard them alike"
                )
            out[name] = x.to_local()
        else:
            if x.shape[0] != shard.vocab:
                raise ValueError(
                    f"{name} must have {shard.vocab} rows (the vocabulary of the sharded "
                    f"policy_weight), got shape {tuple(x.shape)}"
                )
            out[name] = x[shard.offset : shard.offset + shard.rows]
    return inputs._replace(**out), shard


def localize_logits(policy_logits, ref_logits):
    """(policy, ref, shard) for ``epsilon_dpo_loss``: with ``policy_logits`` a DTensor sharded
    on its last (vocabulary) dimension (a ColwiseParallel lm_head with use_local_output=False),
    the local shards (``ref_logits`` sharded alike, or whole and sliced here); otherwise the
    inputs unchanged and no shard."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(policy_logits, dtensor):
        return policy_logits, ref_logits, None
    shard = shard_of("policy_logits", policy_logits, -1)
    if isinstance(ref_logits, dtensor):
        other = shard_of("ref_logits", ref_logits, -1)
        if (other.offset, other.rows) != (shard.offset, shard.rows):
            raise TypeError("ref_logits must be sharded over the vocabulary as policy_logits is")
        ref_logits = ref_logits.to_local()
    elif isinstance(ref_logits, torch.Tensor):
        if ref_logits.shape[-1] != shard.vocab:
            raise ValueError(
                f"ref_logits must have {shard.vocab} vocabulary entries (those of the sharded "
                f"policy_logits), got shape {tuple(ref_logits.shape)}"
            )
        ref_logits = ref_logits[..., shard.offset : shard.offset + shard.rows]
    return policy_logits.to_local(), ref_logits, shard


def check_vocab_group(shard: VocabShard, labels: torch.Tensor, options) -> None:
    """The ranks sharing the vocabulary must hold the same tokens and options. A weight that
    is FSDP-sharded over data-parallel ranks (a Shard(0) too, but with other data on every
    rank) fails here instead of merging unrelated tokens."""
    flat = labels.reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=labels.device)
    values = {
        "tokens": labels.numel(),
        "label checksum": (flat * weights.remainder(9973)).sum(),
        **options.agreed_values(),
    }
    check_ranks_agree(
        shard.group,
        labels.device,
        values,
        "policy_weight",
        "the ranks sharing the vocabulary-sharded lm_head must hold the same tokens (replicated "
        "hidden states and labels) and options; is the weight FSDP-sharded over data-parallel "
        "ranks instead? Then gather it (LinearEpsilonDPOHead)",
    )


def merge_partials(maxes: torch.Tensor, sums: torch.Tensor, shard: VocabShard) -> None:
    """This rank's per-token partials (layout.py, ``SHARD_*``) → every shard's, in place: a
    MAX all-reduce of the 4 maxes, then each rank rescales its 4 Σexp (and Σ exp(2h), by the
    square) to the merged max, and the ranks' sums are added with the label outputs (0 where
    not owned) and Σh.

    The addition is an all-gather and a sum in rank order, the same on every rank, not a SUM
    all-reduce: that adds each element in an order that depends on where it lies in the buffer
    (a ring reduces each chunk starting from another rank), so from three ranks on the four
    streams' Σexp of equal logits (policy == reference) could round apart, and u − a would not
    be exactly 0 (docs/SPEC.md). Each rank receives the other W − 1 ranks' 8 floats per token
    instead of about twice its own: small beside the hidden-state gradient's H."""
    import torch.distributed as dist

    local = maxes.clone()
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=shard.group)
    safe = torch.where(torch.isfinite(maxes), maxes, 0.0)
    rescale = torch.where(torch.isfinite(local), (local - safe).exp(), 0.0)
    sums[L.SHARD_EXP_SUMS : L.SHARD_EXP_SUMS + 4] *= rescale
    sums[L.SHARD_SQUARES] *= rescale[0] * rescale[0]  # the policy's Σ exp(2(h − m)), or 0
    parts = [torch.empty_like(sums) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, sums, group=shard.group)
    sums.copy_(parts[0])
    for part in parts[1:]:
        sums += part


def complete_hidden_gradient(grad_hidden: torch.Tensor, shard: VocabShard | None) -> None:
    """This shard's part of ∂hidden = Σ_v G[:, v]·W[v] → the whole sum, in place."""
    if shard is not None:
        import torch.distributed as dist

        dist.all_reduce(grad_hidden, group=shard.group)
