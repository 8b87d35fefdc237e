"""Likelihood-displacement diagnostics: CHES scores of preference pairs.

Razin et al. (2024), "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (ICLR 2025), show that DPO-style training tends to lower the likelihood of the
chosen responses too, most for pairs whose two responses induce similar hidden embeddings, and
measure that similarity by the centered hidden embedding similarity

    CHES(x, y⁺, y⁻) = ⟨Σ_k h⁺_k, Σ_k h⁻_k⟩ − ‖Σ_k h⁺_k‖²

where h⁺_k (h⁻_k) is the last hidden state at each position that predicts a chosen (rejected)
response token. The length-normalised variant replaces each sum by a mean. Higher means more
displacement; filtering out the highest-scoring pairs mitigated it in their experiments.
"""

from __future__ import annotations

import torch

from . import validation as V
from .params import check_ignore_index

# fp32 working set of one token slice of the accumulation (the input may be bf16).
_SLICE_BYTES = 64 * 2**20


def ches_scores(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    length_normalized: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-pair CHES scores ``(B,)``, fp32, for the concatenated pair layout.

    Args:
        hidden: ``(2B, T, H)`` last hidden states (rows ``[0, B)`` chosen, ``[B, 2B)``
            rejected) in the loss layout: ``hidden[n, t]`` predicts ``labels[n, t]``. Any float
            dtype; sums accumulate in fp32 whatever it is.
        labels: ``(2B, T)`` integer labels; the response tokens are those ≠ ``ignore_index``.
        length_normalized: average each response's hidden states instead of summing them. A
            response with no scored token then has no mean and its pair scores NaN.
        ignore_index: label value of prompt and padding positions.

    Returns:
        ``⟨c, r⟩ − ‖c‖²`` per pair, computed as ``⟨c, r − c⟩`` (so a pair whose two responses
        have identical hidden states scores exactly 0), with ``c``, ``r`` the chosen and
        rejected sums (or means). No gradient flows (the scores are a diagnostic).

    Example:
        >>> hidden = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [5.0, 5.0]]])
        >>> labels = torch.tensor([[1, 1], [1, -100]])  # chosen: 2 tokens, rejected: 1
        >>> ches_scores(hidden, labels)  # c = (2, 1), r = (0, 2): ⟨c, r⟩ − ‖c‖² = 2 − 5
        tensor([-3.])
    """
    V.check_tensor("hidden", hidden, ndim=3, float_dtype=True)
    rows, tokens, _ = hidden.shape
    V.check_pair_rows("hidden", rows)
    V.check_labels(labels, rows=rows, tokens=tokens)
    check_ignore_index(ignore_index)
    if not isinstance(length_normalized, bool):
        raise TypeError(f"length_normalized must be a bool, got {type(length_normalized).__name__}")
    V.check_same_device(hidden=hidden, labels=labels)
    with torch.no_grad():
        mask = labels != ignore_index
        sums = _masked_row_sums(hidden.detach(), mask)
        if length_normalized:
            # 0/0 for a response without tokens: NaN, as documented.
            sums = sums / mask.sum(dim=1, keepdim=True).to(torch.float32)
        chosen, rejected = sums.chunk(2, dim=0)
        return (chosen * (rejected - chosen)).sum(dim=-1)


def _masked_row_sums(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask[n, t]·hidden[n, t] in fp32, ``(N, H)``, a token slice at a time so that the
    fp32 upcast of a bf16 input never exists whole."""
    rows, tokens, size = hidden.shape
    sums = torch.zeros(rows, size, dtype=torch.float32, device=hidden.device)
    step = max(1, _SLICE_BYTES // max(1, rows * size * 4))
    for start in range(0, tokens, step):
        part = hidden[:, start : start + step].float()
        # where, not a product: padding positions may hold non-finite values (0·inf = NaN).
        keep = mask[:, start : start + step].unsqueeze(-1)
        sums += torch.where(keep, part, 0.0).sum(dim=1)
    return sums
