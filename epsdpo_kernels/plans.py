"""The plans of the two paths, and the tensors the linear path carries.

A plan says how a path walks its work: the logits path's backward in place or not; the linear
path's token chunks, vocabulary slices and matmul dtype, sized from a memory budget per device
(the sizing lives here so that the call's plan is complete when the call is built, call.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class LogitsPlan:
    """How the logits path runs its backward: into the logits' storage (``inplace``) or not."""

    inplace: bool = False


class LinearInputs(NamedTuple):
    """The six tensors of ``linear_epsilon_dpo_loss`` besides the labels, in one order: the
    first three are the policy's (they may get gradients), the others the reference's."""

    policy_hidden: torch.Tensor
    policy_weight: torch.Tensor
    policy_bias: torch.Tensor | None
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    ref_bias: torch.Tensor | None


# Budget for one chunk's or slice's temporaries. On CUDA, 256 MiB holds 512 rows of bf16
# policy + reference logits at V = 128k, or an 8192 × 16384 bf16 slice: enough for the GEMMs
# to run near peak. On CPU a smaller chunk costs no matmul efficiency and stays nearer the caches.
DEFAULT_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}
# Chunks and slices are multiples of this many rows (GEMM tiles) when the budget allows.
ROW_MULTIPLE = 256
# The linear backward reads and writes its S × H fp32 ∂hidden accumulator once per vocabulary
# slice of Vb rows, 8·S·H bytes, beside the slice's three GEMMs (recompute, ∂hidden, ∂weight),
# 6·S·H·Vb FLOPs: accumulator time / GEMM time = (4/3)·(F/B)/Vb, whatever S and H. An H100's
# bf16 dense F = 989 TFLOP/s at B = 3.0 TB/s copy gives F/B ≈ 330 (an H200's ≈ 230), so ≤ 5%
# needs Vb ≥ 8800: on CUDA a slice has at least 9216 rows (36 × 256; more than two of the
# backward kernel's 4096-column bf16 tiles) whatever the budget, over every scored token
# (stepping through the tokens would add a Vb × H fp32 read-modify-write of ∂weight per step).
# That slice's logits are S·9216·2 bytes in bf16: 151 MB at S = 8192, 1.2 GB at S = 65536, let
# past the budget up to a sixteenth of the device's memory (5 GB on an 80 GB H100).
CUDA_MIN_SLICE_ROWS = 9216
# fp32 copies per logit where the GEMM cannot accumulate a bf16/fp16 product into fp32 (CPU).
_UPCAST_BYTES = 4


@dataclass(frozen=True)
class LinearPlan:
    """How the linear path walks its work: scored rows per forward chunk, and vocabulary rows
    per backward slice (0: as many as the budget allows, see ``slice_plan``)."""

    chunk_rows: int
    vocab_chunk_rows: int = 0
    # The matmuls' dtype under autocast (None: each weight's own). Inputs are cast as they are
    # read: the forward's weights once per call (freed with it), the backward's per slice; the
    # gradients are accumulated in fp32 and rounded once, to the inputs' own dtypes.
    matmul_dtype: torch.dtype | None = None

    def cast(self, t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """``t`` in the matmul dtype of ``like``'s (a weight's) matmuls; itself if it has it."""
        return None if t is None else t.to(self.matmul_dtype or like.dtype)


def _round_rows(rows: int, limit: int) -> int:
    """``rows`` rounded down to a multiple of ROW_MULTIPLE when it is at least that; in
    [1, limit]."""
    if rows >= ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(1, min(rows, limit))


def _budget(device_type: str) -> int:
    return DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])


def default_chunk_rows(vocab: int, element_size: int, device_type: str) -> int:
    """Forward rows per chunk: the chunk's policy and reference logits fit the device's budget.
    (The per-token passes' own temporaries are bounded by their sub-chunks, not by this.)"""
    return _round_rows(_budget(device_type) // (2 * vocab * element_size), 2**31)


def slice_plan(
    scored: int,
    vocab: int,
    element_size: int,
    device_type: str,
    vocab_rows: int = 0,
    device_memory: int = 0,
) -> tuple[int, int]:
    """(vocabulary rows per backward slice, scored tokens per step within a slice).

    A slice covers every scored token when its logits (and an fp32 upcast where the GEMM needs
    one) fit the budget; when even the narrowest slice (ROW_MULTIPLE vocabulary rows, on CUDA
    ``CUDA_MIN_SLICE_ROWS`` with the budget raised to ``device_memory`` / 16) over all S tokens
    does not, the slice's tokens are stepped through too. ``vocab_rows`` > 0 fixes the slice
    width (the token steps still follow the budget)."""
    per_logit = element_size
    if device_type != "cuda" and element_size < 4:
        per_logit += _UPCAST_BYTES
    budget = _budget(device_type)
    if vocab_rows <= 0:
        # Never narrower than the floor (or V): a thinner slice starves the GEMMs and, on
        # CUDA, makes the accumulator traffic count; stepping through the tokens keeps the
        # budget instead.
        fit = _round_rows(budget // max(1, scored * per_logit), vocab)
        floor = ROW_MULTIPLE
        if device_type == "cuda":
            floor = CUDA_MIN_SLICE_ROWS
            budget = max(budget, device_memory // 16)
        vocab_rows = min(vocab, max(floor, fit))
    if scored * vocab_rows * per_logit <= budget:
        return vocab_rows, max(1, scored)
    return vocab_rows, _round_rows(budget // (vocab_rows * per_logit), max(1, scored))
