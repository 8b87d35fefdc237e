"""Parameters of one loss call: each scalar checked on its own, then two typed objects.

The checks are per argument, so that everything else that takes the same values (``AdaptiveBeta``,
the TRL config, the command-line scripts) runs the same check and says the same thing. An entry
point puts its scalar arguments in a ``LossOptions``, which checks them when built; ``call.py``
resolves it into the call's ``LossParams`` once the labels have been counted, the backend
resolved for the inputs' device at the same moment.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossParams:
    """The non-tensor inputs every per-token and per-pair step of one call reads."""

    beta: float
    epsilon: float
    label_smoothing: float
    ignore_index: int
    average_log_prob: bool
    backend: str  # resolved: "triton" or "torch"
    scored_count: int  # labels != ignore_index
    # The model's own map from lm_head outputs z to its logits, applied to policy and
    # reference alike: logits = cap·tanh(scale·z / cap) (Gemma 2's final_logit_softcapping),
    # or scale·z without a cap (Cohere's logit_scale; Granite's 1 / logits_scaling).
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    # Also compute each token's a − log Σ_v p² (layout.TOK_WPO_LOGP) for WPO's weights: one more
    # running sum (of the policy's squared exponentials) in the same pass over V.
    wpo_weights: bool = False

    @property
    def transformed(self) -> bool:
        return self.logit_softcap is not None or self.logit_scale != 1.0


def _is_real_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_beta(beta) -> None:
    if isinstance(beta, torch.Tensor):
        raise TypeError("beta must be a Python float (use AdaptiveBeta.beta), got a torch.Tensor")
    if not _is_real_number(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_epsilon(epsilon) -> None:
    if not _is_real_number(epsilon) or not (0 <= epsilon < 1):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")


def check_label_smoothing(label_smoothing) -> None:
    if not _is_real_number(label_smoothing) or not (0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_logit_transform(logit_softcap, logit_scale) -> None:
    if logit_softcap is not None and (
        not _is_real_number(logit_softcap) or not math.isfinite(logit_softcap) or logit_softcap <= 0
    ):
        raise ValueError(
            f"logit_softcap must be None or a finite number > 0 (Gemma 2: 30.0), got "
            f"{logit_softcap!r}"
        )
    if not _is_real_number(logit_scale) or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of one loss call as its caller gave them, checked when built (each by
    its own check, in one order, before any tensor is looked at). The entry points build one
    and hand it down; ``resolve`` makes the call's ``LossParams`` once the labels are counted.
    The logit transform is the linear entry point's: logits come from the model transformed."""

    beta: float
    epsilon: float
    label_smoothing: float
    ignore_index: int
    average_log_prob: bool
    backend: str  # as given: "auto", "triton" or "torch"
    wpo_weights: bool = False
    logit_softcap: float | None = None
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        check_logit_transform(self.logit_softcap, self.logit_scale)
        check_beta(self.beta)
        check_epsilon(self.epsilon)
        check_label_smoothing(self.label_smoothing)
        check_ignore_index(self.ignore_index)
        check_flag("average_log_prob", self.average_log_prob)
        check_flag("wpo_weights", self.wpo_weights)
        check_backend(self.backend)

    def resolve(self, backend: str, scored_count: int) -> LossParams:
        """The call's ``LossParams``: these options with the backend resolved for the inputs'
        device (``resolve_backend``) and the count of scored labels."""
        return LossParams(
            beta=float(self.beta),
            epsilon=float(self.epsilon),
            label_smoothing=float(self.label_smoothing),
            ignore_index=self.ignore_index,
            average_log_prob=self.average_log_prob,
            backend=backend,
            scored_count=scored_count,
            logit_scale=float(self.logit_scale),
            logit_softcap=None if self.logit_softcap is None else float(self.logit_softcap),
            wpo_weights=self.wpo_weights,
        )

    def agreed_values(self) -> dict:
        """The options every rank of a group must share, by name, as numbers."""
        return dict(
            beta=self.beta,
            epsilon=self.epsilon,
            label_smoothing=self.label_smoothing,
            average_log_prob=self.average_log_prob,
            logit_scale=self.logit_scale,
            logit_softcap=self.logit_softcap or 0.0,  # None: no cap
            wpo_weights=float(self.wpo_weights),
        )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_interpreter_active() -> bool:
    """True when ``@triton.jit`` builds interpreted functions in this process (TRITON_INTERPRET=1
    was set before triton was imported), as it did for this package's kernels (which choose
    GPU-only instructions when compiled)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def probe():
        pass

    return isinstance(probe, InterpretedFunction)


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
