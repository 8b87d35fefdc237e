"""What the torch backend's per-token steps share: the scored rows of an ``(N, T, V)`` tensor,
walked in sub-chunks (views where possible), and the model's logit transform.

Only scored rows are touched, a few rows at a time: each V-sized fp32 temporary of a sub-chunk
stays under ``TORCH_CHUNK_BYTES`` for its device: on a CPU small enough for the L2 cache, so the
several elementwise passes torch makes over a sub-chunk run from cache; on a GPU large enough to
fill it. Either way the extra memory is a constant, not a share of the input. Where every row is
scored (the linear path's chunks) rows are sliced as views instead of gathered, so no copy of the
logits is made.
"""

from __future__ import annotations

import torch

# Bytes of one V-sized fp32 temporary of a sub-chunk, by device (the forward keeps about five
# alive: the upcast rows, h − g, a mix, a log_softmax; the backward two). On a CPU, 512 KiB is 4
# rows at V = 32k: measured on 2 cores, 5× faster than 16 MiB sub-chunks, whose passes go to
# DRAM. On a GPU each sub-chunk is a handful of kernel launches, so it must be large enough to
# fill the device: 64 MiB is 130 rows at V = 128k (512 KiB would be one row per launch).
TORCH_CHUNK_BYTES = {"cpu": 512 * 2**10, "cuda": 64 * 2**20}


def chunk_rows(vocab: int, device: torch.device) -> int:
    budget = TORCH_CHUNK_BYTES.get(device.type, TORCH_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(1, vocab)))


class ScoredRows:
    """Sub-chunks of the scored rows of an ``(N, T, V)`` tensor, as views where possible."""

    def __init__(self, labels: torch.Tensor, ignore_index: int, vocab: int, *tensors):
        n, t = labels.shape
        scored = labels != ignore_index
        self.t = t
        self.all_scored = bool(scored.all())
        # Views need contiguous tensors (reshape of a strided slice would copy, and a write
        # through the copy would be lost); otherwise every row is gathered by index.
        self.views = self.all_scored and all(x.is_contiguous() for x in (labels, *tensors))
        self.flat = None if self.views else scored.flatten().nonzero().squeeze(1)
        self.count = n * t if self.views else self.flat.numel()
        self.step = chunk_rows(vocab, labels.device)

    def chunks(self):
        """Yield (flat row indices or a slice, rows of dim 0, rows of dim 1)."""
        for start in range(0, self.count, self.step):
            stop = min(self.count, start + self.step)
            if self.views:
                yield slice(start, stop), None, None
            else:
                idx = self.flat[start:stop]
                yield idx, idx // self.t, idx % self.t

    @staticmethod
    def take(x: torch.Tensor, sel, rows, cols) -> torch.Tensor:
        if rows is None:
            return x.reshape(-1, x.shape[-1])[sel]  # a view when x is contiguous
        return x[rows, cols]


def logit_transform(z: torch.Tensor, params) -> torch.Tensor:
    """The model's logits from fp32 lm_head outputs z (``LossParams.logit_scale`` and
    ``logit_softcap``); z itself when there is neither. In place on z."""
    if params.logit_scale != 1.0:
        z.mul_(params.logit_scale)
    if params.logit_softcap is not None:
        cap = params.logit_softcap
        z.div_(cap).tanh_().mul_(cap)
    return z


def logit_transform_slope(logits: torch.Tensor, params) -> torch.Tensor | float:
    """d logits / d z at the transformed ``logits``: scale·(1 − (logits/cap)²) with a cap
    (tanh' from tanh itself, so nothing but the logits is needed), scale without."""
    if params.logit_softcap is None:
        return params.logit_scale
    t = logits / params.logit_softcap
    return params.logit_scale * (1 - t * t)


def nonpositive(x: torch.Tensor) -> torch.Tensor:
    # A log-probability is ≤ 0: rounding must not make one positive (a select, so NaN stays).
    return torch.where(x > 0, 0.0, x)
