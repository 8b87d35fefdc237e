"""Per-token forward and backward in plain torch: the backend CPU users get.

Same contract as token_kernels.py. Only scored rows are touched, in chunks of rows sized so that
the fp32 temporaries of one chunk stay under ``TORCH_CHUNK_BYTES``; nothing here builds an
autograd graph over V-sized tensors (the autograd Functions call it under no_grad).
"""

from __future__ import annotations

import torch

from . import layout as L

# Budget for the fp32 temporaries of one chunk (about 8 live V-sized rows per token row).
TORCH_CHUNK_BYTES = 64 * 2**20
_LIVE_ROWS_PER_TOKEN = 8


def _chunk_rows(vocab: int) -> int:
    return max(1, TORCH_CHUNK_BYTES // (_LIVE_ROWS_PER_TOKEN * 4 * vocab))


def _scored_positions(labels: torch.Tensor, ignore_index: int):
    flat = (labels != ignore_index).flatten().nonzero().squeeze(1)
    t = labels.shape[1]
    return flat, flat // t, flat % t


@torch.no_grad()
def token_forward_torch(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    ignore_index: int,
) -> torch.Tensor:
    n, t, v = policy_logits.shape
    stats = torch.zeros((L.TOKEN_FIELDS, n * t), dtype=torch.float32, device=policy_logits.device)
    flat, rows, cols = _scored_positions(labels, ignore_index)
    step = _chunk_rows(v)
    for start in range(0, flat.numel(), step):
        sl = slice(start, start + step)
        r, c = rows[sl], cols[sl]
        h = policy_logits[r, c].float()
        g = ref_logits[r, c].float()
        y = labels[r, c].long().unsqueeze(1)
        streams = (h, g, (1 + epsilon) * h - epsilon * g, (1 - epsilon) * h + epsilon * g)
        fields = (L.TOK_LOGP, L.TOK_REF_LOGP, L.TOK_P_EPS_LOGP, L.TOK_N_EPS_LOGP)
        for field, x in zip(fields, streams):
            lse = torch.logsumexp(x, dim=-1)
            stats[field, flat[sl]] = (x.gather(1, y).squeeze(1) - lse).clamp(max=0.0)
            if field == L.TOK_LOGP:
                stats[L.TOK_LSE, flat[sl]] = lse
        stats[L.TOK_LOGIT_SUM, flat[sl]] = h.sum(-1)
    return stats


@torch.no_grad()
def token_backward_torch(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    row_coef: torch.Tensor,
    *,
    ignore_index: int,
    inplace: bool,
) -> torch.Tensor:
    n, t, v = policy_logits.shape
    flat, rows, cols = _scored_positions(labels, ignore_index)
    if inplace:
        grad = policy_logits
    else:
        grad = torch.zeros_like(policy_logits)
    step = _chunk_rows(v)
    # Scored rows first: in place, each chunk reads its own logits before overwriting them.
    for start in range(0, flat.numel(), step):
        sl = slice(start, start + step)
        r, c = rows[sl], cols[sl]
        h = policy_logits[r, c].float()
        probs = torch.exp(h - stats[L.TOK_LSE, flat[sl]].unsqueeze(1))
        probs.scatter_add_(1, labels[r, c].long().unsqueeze(1), torch.full_like(probs[:, :1], -1.0))
        grad[r, c] = (probs * -row_coef[r].float().unsqueeze(1)).to(grad.dtype)
    if inplace:
        ignored = (labels == ignore_index).flatten().nonzero().squeeze(1)
        for start in range(0, ignored.numel(), step):
            idx = ignored[start : start + step]
            grad[idx // t, idx % t] = 0
    return grad
