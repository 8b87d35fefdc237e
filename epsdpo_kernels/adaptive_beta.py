"""``AdaptiveBeta``: ε-DPO's β carried across optimizer steps (and ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .params import check_beta, check_epsilon


class AdaptiveBeta:
    """β ← β / (1 + ε·mean(s)) after every optimizer step, the mean over all pairs of the step.

    Call ``observe(out.steps)`` after each micro-batch and ``update()`` once per optimizer step,
    on every rank: the step sums and counts are all-reduced when torch.distributed is initialised,
    so all ranks move to the same β. ``observe`` does not synchronise with the device; ``update``
    does (once per step). The controller is training state: save ``state_dict()`` in checkpoints.

    Example:
        >>> controller = AdaptiveBeta(beta=0.1, epsilon=0.01)
        >>> controller.observe(torch.tensor([1, 1, 0, -1]))
        >>> round(controller.update(), 6)  # mean step 0.25: 0.1 / (1 + 0.01 * 0.25)
        0.099751
    """

    def __init__(self, beta: float, epsilon: float = 0.01):
        check_beta(beta)
        check_epsilon(epsilon)
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        # float64 [Σs, count, values outside {-1, 0, 1}] on the steps' device
        self._pending: torch.Tensor | None = None

    def observe(self, steps: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one micro-batch's per-pair steps (values in {-1, 0, +1}). Values are
        checked without a sync: any other (NaN included) is counted here and refused by the
        next ``update``, before β moves. ``mask`` (bool, the shape of ``steps``): observe only
        those pairs, e.g. ``out.finite_pairs``, so that a pair whose logits were not finite
        (its step 0 by default) does not pull β's update towards 0."""
        if not isinstance(steps, torch.Tensor):
            raise TypeError(f"steps must be a torch.Tensor, got {type(steps).__name__}")
        steps = steps.detach()
        valid = (steps == -1) | (steps == 0) | (steps == 1)
        if mask is None:
            # The count as a fill on the device (torch.tensor of a host number would be a
            # blocking host-to-device copy on CUDA, every micro-batch).
            count = torch.full((), steps.numel(), dtype=torch.float64, device=steps.device)
            step_sum = steps.sum().double()
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool torch.Tensor (e.g. out.finite_pairs)")
            if mask.shape != steps.shape:
                raise ValueError(f"mask must have the shape of steps {tuple(steps.shape)}")
            mask = mask.detach().to(steps.device)
            count = mask.sum().double()
            step_sum = torch.where(mask, steps, 0).sum().double()
            valid = valid | ~mask
        total = torch.stack([step_sum, count, (~valid).sum().double()])
        self._pending = (
            total if self._pending is None else self._pending + total.to(self._pending.device)
        )

    def update(self, group=None) -> float:
        """Apply the step's mean to β, reset the accumulator and return the new β."""
        pending = self._pending
        if pending is None:
            pending = torch.zeros(3, dtype=torch.float64, device=self._default_device(group))
        if dist.is_available() and dist.is_initialized():
            pending = pending.to(self._default_device(group))
            dist.all_reduce(pending, op=dist.ReduceOp.SUM, group=group)
        step_sum, count, invalid = pending.tolist()
        self._pending = None
        if invalid:
            raise ValueError(
                f"AdaptiveBeta.observe was given {int(invalid)} step values outside {{-1, 0, +1}} "
                f"(or NaN) since the last update; β stays {self.beta!r}: observe the loss's "
                "out.steps"
            )
        if count > 0:
            self.beta = self.beta / (1.0 + self.epsilon * step_sum / count)
        return self.beta

    @staticmethod
    def _default_device(group) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def state_dict(self) -> dict:
        pending = [0.0, 0.0] if self._pending is None else self._pending.tolist()
        return {
            "beta": self.beta,
            "epsilon": self.epsilon,
            "pending_sum": pending[0],
            "pending_count": pending[1],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore β (and a step's pending observations). The state must come from a controller
        with this one's ε: a β adapted under one ε and continued under another would follow
        neither run, so a mismatch is refused rather than one of the two silently kept."""
        if float(state["epsilon"]) != self.epsilon:
            raise ValueError(
                f"the saved β was adapted with epsilon={state['epsilon']!r}, this controller has "
                f"epsilon={self.epsilon!r}: continue with epsilon={state['epsilon']!r}, or start "
                "a new run"
            )
        self.beta = float(state["beta"])
        if state.get("pending_count", 0.0) > 0:
            self._pending = torch.tensor(
                [state["pending_sum"], state["pending_count"], 0.0], dtype=torch.float64
            )
        else:
            self._pending = None

    def __repr__(self) -> str:
        return f"AdaptiveBeta(beta={self.beta!r}, epsilon={self.epsilon!r})"
