"""Per-token forward and backward in plain torch: the backend CPU users get.

Same contract as triton_backend/token.py. Only scored rows are touched, a few rows at a time: each
V-sized fp32 temporary of a sub-chunk stays under ``TORCH_CHUNK_BYTES`` for its device: on a CPU
small enough for the L2 cache, so the several elementwise passes torch makes over a sub-chunk run
from cache; on a GPU large enough to fill it. Either way the extra memory is a constant, not a
share of the input. The four log-sum-exps come from
``torch.log_softmax`` (one fused, vectorised kernel per row) rather than composed ops. Nothing
here builds an autograd graph over V-sized tensors (the autograd Functions call it under
no_grad). Where every row is scored (the linear path's chunks) rows are sliced as views instead
of gathered, so no copy of the logits is made.
"""

from __future__ import annotations

import torch

from .. import layout as L

# Bytes of one V-sized fp32 temporary of a sub-chunk, by device (the forward keeps about five
# alive: the upcast rows, h − g, a mix, a log_softmax; the backward two). On a CPU, 512 KiB is 4
# rows at V = 32k: measured on 2 cores, 5× faster than 16 MiB sub-chunks, whose passes go to
# DRAM. On a GPU each sub-chunk is a handful of kernel launches, so it must be large enough to
# fill the device: 64 MiB is 130 rows at V = 128k (512 KiB would be one row per launch).
TORCH_CHUNK_BYTES = {"cpu": 512 * 2**10, "cuda": 64 * 2**20}


def _chunk_rows(vocab: int, device: torch.device) -> int:
    budget = TORCH_CHUNK_BYTES.get(device.type, TORCH_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(1, vocab)))


class _ScoredRows:
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
        self.step = _chunk_rows(vocab, labels.device)

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


def _nonpositive(x: torch.Tensor) -> torch.Tensor:
    # A log-probability is ≤ 0: rounding must not make one positive (a select, so NaN stays).
    return torch.where(x > 0, 0.0, x)


@torch.no_grad()
def token_forward(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, params
) -> torch.Tensor:
    """The same fields as the Triton forward (layout.py), from the same formulas: mixes
    h ± ε(h − g) with NaN (from infinities) read as −inf; u − a as the difference of the two
    label log-probabilities of one row, never of per-sequence sums."""
    epsilon, ignore_index = params.epsilon, params.ignore_index
    n, t, v = policy_logits.shape
    stats = torch.zeros((L.TOKEN_FIELDS, n * t), dtype=torch.float32, device=policy_logits.device)
    rows = _ScoredRows(labels, ignore_index, v, policy_logits, ref_logits)
    for sel, r, c in rows.chunks():
        h = rows.take(policy_logits, sel, r, c).float()
        g = rows.take(ref_logits, sel, r, c).float()
        if params.transformed:  # a copy first: .float() of fp32 views is the input itself
            h, g = logit_transform(h.clone(), params), logit_transform(g.clone(), params)
        y = rows.take(labels.unsqueeze(-1), sel, r, c).long()
        out = stats[:, sel]
        log_p = torch.log_softmax(h, -1)
        a = _nonpositive(log_p.gather(1, y).squeeze(1))
        # lse = max(h) − max(log_softmax(h)): max + log Σexp(h − max) with one rounding. (Taken
        # at the label instead, h_y − a, it would round at |a|, 1e-3 for logits of 1e4.)
        out[L.TOK_LSE] = h.amax(-1) - log_p.amax(-1)
        if params.wpo_weights:
            # log Σ p² = logsumexp(2·log p): ≤ 0, the max term exactly 2·max(log p).
            out[L.TOK_WPO_LOGP] = a - torch.logsumexp(2 * log_p, -1)
        del log_p
        out[L.TOK_LOGP] = a
        out[L.TOK_REF_LOGP] = _nonpositive(torch.log_softmax(g, -1).gather(1, y).squeeze(1))
        out[L.TOK_LOGIT_SUM] = h.sum(-1)
        diff = torch.sub(h, g)
        for field, sign in ((L.TOK_P_EPS_DELTA, 1.0), (L.TOK_N_EPS_DELTA, -1.0)):
            mix = torch.add(h, diff, alpha=sign * epsilon).nan_to_num_(
                nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf
            )
            delta = torch.log_softmax(mix, -1).gather(1, y).squeeze(1) - a
            out[field] = torch.where(delta > -a, -a, delta)  # u = a + (u − a) ≤ 0
        if r is not None:
            stats[:, sel] = out  # advanced indexing returned a copy
    return stats


@torch.no_grad()
def token_backward(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    token_coef: torch.Tensor,
    params,
    *,
    inplace: bool,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """``token_coef`` (N·T,) is each token row's c_n. Column j of the logits is vocabulary
    entry ``vocab_offset + j`` (a slice of V in the linear path); labels are full-vocabulary
    indices."""
    ignore_index = params.ignore_index
    n, t, v = policy_logits.shape
    grad = policy_logits if inplace else torch.zeros_like(policy_logits)
    rows = _ScoredRows(labels, ignore_index, v, policy_logits, grad)
    coef = token_coef.float()
    # Scored rows first: in place, each sub-chunk reads its own logits before overwriting them.
    for sel, r, c in rows.chunks():
        h = rows.take(policy_logits, sel, r, c)
        y = rows.take(labels.unsqueeze(-1), sel, r, c).long()
        logits = logit_transform(h.float().clone(), params) if params.transformed else h.float()
        # c·(onehot − p), with p = exp(h − lse) from the forward's lse: one exp per element.
        g = torch.sub(logits, stats[L.TOK_LSE, sel].unsqueeze(1)).exp_()
        local = y - vocab_offset  # the label's column, if it falls in this slice
        inside = (local >= 0) & (local < v)
        g.scatter_add_(1, local.clamp(0, v - 1), -inside.float())
        g.mul_(-coef[sel].unsqueeze(1))
        if params.transformed:  # through the model's transform: ∂logits/∂z per element
            g.mul_(logit_transform_slope(logits, params))
        if r is None:
            grad.reshape(-1, v)[sel] = g
        else:
            grad[r, c] = g.to(grad.dtype)
    if inplace and not rows.all_scored:
        ignored = (labels == ignore_index).flatten().nonzero().squeeze(1)
        for start in range(0, ignored.numel(), rows.step):
            idx = ignored[start : start + rows.step]
            grad[idx // t, idx % t] = 0
    return grad
