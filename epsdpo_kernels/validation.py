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


def check_labels(labels, *, rows: int, tokens: int, name: str = "labels") -> None:
    """Type, dtype and shape of ``labels`` (or another per-token index tensor)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != (rows, tokens):
        raise ValueError(
            f"{name} must have shape (2B, T) = {(rows, tokens)} to match the logits/hidden "
            f"states, got {tuple(labels.shape)}"
        )


def check_packing(sequence_ids, num_pairs) -> bool:
    """Whether the call is packed (``sequence_ids`` and ``num_pairs`` given), after checking
    that they come together and that ``num_pairs`` is a positive int."""
    if (sequence_ids is None) != (num_pairs is None):
        raise ValueError(
            "sequence_ids and num_pairs must be given together (a packed stream) or not at "
            f"all (padded rows); got sequence_ids={'None' if sequence_ids is None else 'a tensor'}"
            f" and num_pairs={num_pairs!r}"
        )
    if num_pairs is None:
        return False
    if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    return True


def packed_stream(name: str, x) -> torch.Tensor:
    """A packed stream's ``(N, F)`` or ``(1, N, F)`` float tensor as ``(1, N, F)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(
            f"{name} must have shape (N, F) or (1, N, F) for a packed stream (sequence_ids "
            f"given), got {tuple(x.shape)}"
        )
    check_tensor(name, x, ndim=3, float_dtype=True)
    return x


def packed_index(name: str, x, tokens: int) -> torch.Tensor:
    """A packed stream's ``(N,)`` or ``(1, N)`` integer tensor (labels, sequence ids) as
    ``(1, N)``."""
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        x = x.unsqueeze(0)
    if isinstance(x, torch.Tensor) and tuple(x.shape) != (1, tokens):
        raise ValueError(
            f"{name} must have shape (N,) or (1, N) with N = {tokens} tokens for a packed "
            f"stream, got {tuple(x.shape)}"
        )
    check_labels(x, rows=1, tokens=tokens, name=name)
    return x


def packed_inputs(policy_name: str, policy, ref_name: str, ref, labels, sequence_ids):
    """Both entry points' packed inputs (logits or hidden states, labels, sequence ids), checked
    and viewed as one row of N tokens: ``(1, N, F)`` and ``(1, N)``."""
    policy = packed_stream(policy_name, policy)
    ref = packed_stream(ref_name, ref)
    tokens = policy.shape[1]
    return (
        policy,
        ref,
        packed_index("labels", labels, tokens),
        packed_index("sequence_ids", sequence_ids, tokens),
    )


def check_token_weights(token_weights, labels) -> None:
    """``token_weights``: None, or a float tensor of the labels' shape (as passed: padded
    ``(2B, T)``, or the packed stream's ``(N,)``/``(1, N)``). Its values are judged in the label
    scan, with the call's one host synchronisation."""
    if token_weights is None:
        return
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(
            f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}"
        )
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
    if isinstance(labels, torch.Tensor) and token_weights.shape != labels.shape:
        raise ValueError(
            f"token_weights must have the shape of labels {tuple(labels.shape)}, got "
            f"{tuple(token_weights.shape)}"
        )


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
