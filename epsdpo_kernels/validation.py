"""Argument checks shared by both entry points, run before any kernel is launched.

Every error names the argument and says what was expected, so a mistake in a training script
fails on the first call with a message instead of a NaN or an illegal memory access later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossParams:
    """Non-tensor options of one loss call: what the dispatch functions and the autograd
    Functions receive, as one object."""

    beta: float
    epsilon: float
    label_smoothing: float
    ignore_index: int
    average_log_prob: bool
    backend: str  # resolved: "triton" or "torch"
    inplace_backward: bool = False  # logits path: write the gradient over the logits
    chunk_rows: int = 0  # linear path: scored rows per forward chunk
    vocab_chunk_rows: int = 0  # linear path: vocabulary rows per backward slice
    scored_count: int = -1  # labels != ignore_index, counted by count_scored_labels


def loss_params(options: dict, device: torch.device, **extra) -> LossParams:
    """``LossParams`` from checked options (see ``check_scalars``), the backend resolved for
    ``device``; ``extra`` sets the entry point's own fields."""
    options = dict(options, backend=resolve_backend(options["backend"], device))
    for name in ("beta", "epsilon", "label_smoothing"):
        options[name] = float(options[name])
    return LossParams(**options, **extra)


def _is_real_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_scalars(
    *, beta, epsilon, label_smoothing, ignore_index, average_log_prob, backend
) -> None:
    if isinstance(beta, torch.Tensor):
        raise TypeError("beta must be a Python float (use AdaptiveBeta.beta), got a torch.Tensor")
    if not _is_real_number(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not _is_real_number(epsilon) or not (0 <= epsilon < 1):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
    if not _is_real_number(label_smoothing) or not (0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    check_ignore_index(ignore_index)
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob must be a bool, got {type(average_log_prob).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → Triton on CUDA, torch elsewhere; ``triton`` on CPU needs the interpreter."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    if device.type != "cuda" and not triton_interpreter_active():
        raise ValueError(
            f"backend='triton' got tensors on {device}; Triton runs on CUDA tensors, or on CPU "
            "tensors only when TRITON_INTERPRET=1 was set before triton was imported. "
            "Use backend='torch' (or 'auto') for CPU tensors."
        )
    return "triton"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_active() -> bool:
    """True when our kernels were built by the interpreter (TRITON_INTERPRET=1 before import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .token_kernels import token_forward_kernel

    return isinstance(token_forward_kernel, InterpretedFunction)
