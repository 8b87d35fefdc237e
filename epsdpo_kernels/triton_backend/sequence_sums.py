"""Token statistics summed per sequence, in Triton (torch_backend/sequence_sums.py: the contract).

One program per sequence walks its run of token rows in blocks, in order (no atomics), so the
sums are bitwise reproducible. Padded rows are walked in place; a packed stream's through the
``order`` index of ``Sequences``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout as L
from ..sequences import Sequences
from .fields import (
    SEQ_COUNT,
    SEQ_LOGIT_SUM,
    SEQ_LOGP,
    SEQ_N_EPS_DELTA,
    SEQ_P_EPS_DELTA,
    SEQ_REF_LOGP,
    SEQ_WPO_LOGP,
    TOK_LOGIT_SUM,
    TOK_LOGP,
    TOK_N_EPS_DELTA,
    TOK_P_EPS_DELTA,
    TOK_REF_LOGP,
    TOK_WPO_LOGP,
)
from .launch import Launch, launch

# Token rows summed per step of the loop: 512 keeps the six fp32 accumulators of a 4-warp
# program in registers (1024 spills on sm_90; benchmarks/kernel_report.py).
MAX_BLOCK_T = 512


@triton.jit
def sequence_sums_kernel(
    stats_ptr,  # (TOKEN_FIELDS, n_rows) fp32 token stats
    labels_ptr,  # (N, T) integer labels
    order_ptr,  # (S,) int64 scored rows sorted by sequence (PACKED only)
    offsets_ptr,  # (n_seq + 1,) int64 start of each sequence's run in order (PACKED only)
    out_ptr,  # (SEQUENCE_FIELDS, n_seq) fp32 out
    T,
    n_rows,
    n_seq,
    stride_ln,
    stride_lt,
    ignore_index,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WPO: tl.constexpr = False,  # also Σ (a − log Σp²); its field is 0 otherwise
):
    """Σ over one sequence's token rows of a, r, u − a, d − a and the logit sum (and WPO's
    term), and its scored-token count. Ignored rows hold zeros in stats, so only the count
    looks at labels."""
    seq = tl.program_id(0)
    if PACKED:
        start = tl.load(offsets_ptr + seq)
        end = tl.load(offsets_ptr + seq + 1)
    else:
        start = seq * T
        end = start + T
    a = tl.zeros([BLOCK_T], dtype=tl.float32)
    r = tl.zeros([BLOCK_T], dtype=tl.float32)
    u = tl.zeros([BLOCK_T], dtype=tl.float32)
    d = tl.zeros([BLOCK_T], dtype=tl.float32)
    logit_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.float32)
    wpo = tl.zeros([BLOCK_T], dtype=tl.float32)
    for first in range(start, end, BLOCK_T):
        k = first + tl.arange(0, BLOCK_T)
        valid = k < end
        if PACKED:
            row = tl.load(order_ptr + k, mask=valid, other=0)
        else:
            row = k
        labels = tl.load(
            labels_ptr + (row // T) * stride_ln + (row % T) * stride_lt,
            mask=valid,
            other=ignore_index,
        )
        count += tl.where(labels != ignore_index, 1.0, 0.0)
        a += tl.load(stats_ptr + TOK_LOGP * n_rows + row, mask=valid, other=0.0)
        r += tl.load(stats_ptr + TOK_REF_LOGP * n_rows + row, mask=valid, other=0.0)
        u += tl.load(stats_ptr + TOK_P_EPS_DELTA * n_rows + row, mask=valid, other=0.0)
        d += tl.load(stats_ptr + TOK_N_EPS_DELTA * n_rows + row, mask=valid, other=0.0)
        logit_sum += tl.load(stats_ptr + TOK_LOGIT_SUM * n_rows + row, mask=valid, other=0.0)
        if WPO:
            wpo += tl.load(stats_ptr + TOK_WPO_LOGP * n_rows + row, mask=valid, other=0.0)
    tl.store(out_ptr + SEQ_LOGP * n_seq + seq, tl.sum(a, 0))
    tl.store(out_ptr + SEQ_REF_LOGP * n_seq + seq, tl.sum(r, 0))
    tl.store(out_ptr + SEQ_P_EPS_DELTA * n_seq + seq, tl.sum(u, 0))
    tl.store(out_ptr + SEQ_N_EPS_DELTA * n_seq + seq, tl.sum(d, 0))
    tl.store(out_ptr + SEQ_LOGIT_SUM * n_seq + seq, tl.sum(logit_sum, 0))
    tl.store(out_ptr + SEQ_WPO_LOGP * n_seq + seq, tl.sum(wpo, 0))
    tl.store(out_ptr + SEQ_COUNT * n_seq + seq, tl.sum(count, 0))


def sequence_sums_launch(stats, labels, sequences: Sequences, out, ignore_index, wpo=False):
    """The ``Launch``, shared by the launch and the compile check."""
    _, t = labels.shape
    packed = not sequences.padded
    # Padded rows use no index tensors: the output stands in for those pointers, never read.
    order = sequences.order if packed else out
    offsets = sequences.offsets if packed else out
    return Launch(
        sequence_sums_kernel,
        (sequences.count,),
        (
            stats,
            labels,
            order,
            offsets,
            out,
            t,
            stats.shape[1],
            sequences.count,
            labels.stride(0),
            labels.stride(1),
            ignore_index,
        ),
        dict(
            PACKED=packed,
            BLOCK_T=min(MAX_BLOCK_T, triton.next_power_of_2(sequences.longest)),
            WPO=wpo,
        ),
        4,
    )


def sequence_sums(
    stats: torch.Tensor, labels: torch.Tensor, sequences: Sequences, params
) -> torch.Tensor:
    out = torch.empty(
        (L.SEQUENCE_FIELDS, sequences.count), dtype=torch.float32, device=stats.device
    )
    spec = sequence_sums_launch(
        stats, labels, sequences, out, params.ignore_index, wpo=params.wpo_weights
    )
    launch(spec, stats.device)
    return out
