"""The log-sum-exp math every Triton kernel of the forward shares: per-token (max, Σexp) states
over parts of V, their merges, the model's logit transform, and a token row's stats from its
merged states.

Every per-token statistic the loss needs is a function of four log-sum-exps over the vocabulary
(policy h, reference g, the two mixes h ± ε(h − g)) and of the label's h_y, g_y. A log-sum-exp over
V splits exactly over any partition of V: each part keeps (m_k, s_k) = (max, Σ exp(x − m_k)), and
the parts combine as m = max_k m_k, s = Σ_k s_k·exp(m_k − m). Three places merge such states:

- the lanes of one forward program, once per row after the loop (``merge_lanes``, forward.py);
- the V-splits of a row when the forward splits the vocabulary across programs
  (``token_merge_kernel``, forward.py, reading the ``(splits, PARTIAL_FIELDS, N)`` buffer);
- vocabulary shards on other ranks (tensor parallelism), merged by all-reduces
  (distributed/vocab_shard.py) and finished by ``token_finish_kernel`` (vocab_shard.py).

The four streams travel stacked, [..., 2, 2] (``stack``), so one update serves all four;
``finish_row`` turns a row's merged states into the ``(TOKEN_FIELDS, N)`` token stats (layout.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fields import (
    TOK_LOGIT_SUM,
    TOK_LOGP,
    TOK_LSE,
    TOK_N_EPS_DELTA,
    TOK_P_EPS_DELTA,
    TOK_REF_LOGP,
    TOK_WPO_LOGP,
    TOKEN_FIELDS,
)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Inside the forward's loop a lane's sums are relative to 2^k, k = round(max·log2e) an integer,
# not to its max: kept as the float k + 1.5·2^23, which one FFMA of max·log2e + 1.5·2^23 rounds
# (the binade [2^23, 2^24) has unit spacing), the difference of two such floats' bit patterns is
# the integer difference of their k, and a rescale by 2^(k_old − k_new) is an exact power of two
# built with integer ops (``pow2``), not an exp on the SFU, which bounds the forward
# (docs/PERFORMANCE.md). The loop's exps are 2^(x·log2e − k) ≤ √2. The
# running max starts at MAX_FLOOR instead of −inf (so k is always in range) and k is capped at
# 2^22 − 1: a row's logits are to stay within ±2^21 ≈ ±2.1e6 (docs/SPEC.md, Range).
SHIFT_MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: k = 0
SHIFT_FLOOR = tl.constexpr(9557361.0)  # round(MAX_FLOOR·log2e) + SHIFT_MAGIC
SHIFT_CEILING = tl.constexpr(16777215.0)  # 2^24 − 1: k = 2^22 − 1
MAX_FLOOR = tl.constexpr(-2097152.0)  # −2^21


@triton.jit
def exp2(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def pow2(d):
    """2^d for an int32 tensor d ≤ 0, exactly, from the exponent bits; 0 below 2^-126 (the
    flush-to-zero ``ex2`` gives 0 there too)."""
    return ((tl.maximum(d, -127) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def shift_bits(shift):
    """The bits of a magic-offset shift (see SHIFT_MAGIC): differences of these are the
    differences of the integers k."""
    return shift.to(tl.int32, bitcast=True)


@triton.jit
def model_logits(z, LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr, FAST_MATH: tl.constexpr):
    """The model's logits from lm_head outputs z (LossParams.logit_scale, logit_softcap; both
    compile-time, so the plain kernels are unchanged): scale·z, then cap·tanh(·/cap). The tanh
    is cap − 2·cap / (1 + 2^(2·log2e·x/cap)): one ex2 and one reciprocal per element, exactly
    ±cap where the exponential overflows or underflows (also for x = ±inf), NaN kept; near 0
    its absolute error is a few ulps of the cap, the rounding of logits of that size."""
    if LOGIT_SCALE != 1.0:
        z = z * LOGIT_SCALE
    if SOFTCAP > 0.0:
        e = exp2(z * (2.0 * LOG2E / SOFTCAP), FAST_MATH)
        z = SOFTCAP - (2.0 * SOFTCAP) / (1.0 + e)
    return z


@triton.jit
def model_logits_slope(y, LOGIT_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """d logits / d z at the model's logits y: scale·(1 − (y/cap)²), tanh' from tanh itself."""
    if SOFTCAP > 0.0:
        t = y * (1.0 / SOFTCAP)
        return LOGIT_SCALE * (1.0 - t * t)
    else:
        return LOGIT_SCALE


@triton.jit
def unstack(x):
    """(h, g, mix_p, mix_n) values of a [2, 2] stacked state (see forward._fold_block)."""
    hg, mixes = tl.split(x)
    h, g = tl.split(hg)
    mix_p, mix_n = tl.split(mixes)
    return h, g, mix_p, mix_n


@triton.jit
def stack(h, g, mix_p, mix_n):
    return tl.join(tl.join(h, g), tl.join(mix_p, mix_n))


@triton.jit
def merge_lanes(run_max, run_sum, FAST_MATH: tl.constexpr):
    """Combine per-lane (or per-split) states along axis 0 into one (max, sum) each."""
    row_max = tl.max(run_max, axis=0)
    shift = tl.where(row_max == -float("inf"), 0.0, row_max) * LOG2E
    return row_max, tl.sum(run_sum * exp2(run_max * LOG2E - shift, FAST_MATH), axis=0)


@triton.jit
def merge_squares(part_max_h, part_squares, row_max_h, FAST_MATH: tl.constexpr):
    """Σ exp(2(h − m)) of parts (lanes or splits, axis 0) each at its own policy max, brought to
    the row's max m: the square of the rescale the sums get."""
    shift = tl.where(row_max_h == -float("inf"), 0.0, row_max_h) * (2.0 * LOG2E)
    return tl.sum(part_squares * exp2(part_max_h * (2.0 * LOG2E) - shift, FAST_MATH), axis=0)


@triton.jit
def _log_ratio(s, s_ref):
    """ln(s / s_ref), correctly rounded division, exactly 0 where s == s_ref (see finish_row)."""
    ratio = tl.math.div_rn(s, s_ref)
    return tl.where(ratio == 1.0, 0.0, tl.log2(ratio) * LN2)


@triton.jit
def zero_row(stats_ptr, row, n_rows):
    """An ignored token row's stats: zeros (its logits are never read)."""
    for field in tl.static_range(TOKEN_FIELDS):
        tl.store(stats_ptr + field * n_rows + row, 0.0)


@triton.jit
def finish_row(
    stats_ptr,
    row,
    n_rows,
    h_y,
    g_y,
    epsilon,
    row_max,
    row_sum,
    logit_sum,
    squares,
    SUM_SQUARES: tl.constexpr,
):
    """Write one token row's stats from its four (max, sum) states, stacked as the merges leave
    them (``row_max``, ``row_sum``: [2, 2], see ``stack``), and the label's logits.

    u − a = ε·(h_y − g_y) − (lse_p − lse_h), with lse_p − lse_h = (m_p − m_h) + ln(s_p / s_h):
    a small number computed from small numbers, never the difference of two rounded ~log V
    log-sum-exps. A log-probability is ≤ 0: rounding must not make a, r, u or d positive (the
    clamps are selects, so a NaN stays NaN).

    At policy == reference every mix is bitwise h, so s_p == s_h and u − a must be exactly 0:
    the ratio is divided with round-to-nearest (``/`` compiles to ``div.full.f32``, an
    approximate reciprocal times s_p, for which x / x need not be 1), and a ratio of exactly 1
    gives exactly 0 without relying on the approximate ``lg2`` at 1.

    With ``SUM_SQUARES``, ``squares`` = Σ exp(2(h − m_h)), so log Σp² = ln(squares) − 2·ln(s_h)
    (both ≥ 1: the max entry adds 1 to each), and WPO's a − log Σp² is stored (0 otherwise)."""
    m_h, m_g, m_p, m_n = unstack(row_max)
    s_h, s_g, s_p, s_n = unstack(row_sum)
    lse_h = m_h + tl.log2(s_h) * LN2
    lse_g = m_g + tl.log2(s_g) * LN2
    a = h_y - lse_h
    a = tl.where(a > 0.0, 0.0, a)
    r = g_y - lse_g
    r = tl.where(r > 0.0, 0.0, r)
    label_diff = epsilon * (h_y - g_y)
    du = label_diff - ((m_p - m_h) + _log_ratio(s_p, s_h))
    dd = -label_diff - ((m_n - m_h) + _log_ratio(s_n, s_h))
    du = tl.where(du > -a, -a, du)
    dd = tl.where(dd > -a, -a, dd)
    tl.store(stats_ptr + TOK_LOGP * n_rows + row, a)
    tl.store(stats_ptr + TOK_REF_LOGP * n_rows + row, r)
    tl.store(stats_ptr + TOK_P_EPS_DELTA * n_rows + row, du)
    tl.store(stats_ptr + TOK_N_EPS_DELTA * n_rows + row, dd)
    tl.store(stats_ptr + TOK_LSE * n_rows + row, lse_h)
    tl.store(stats_ptr + TOK_LOGIT_SUM * n_rows + row, logit_sum)
    wpo = 0.0
    if SUM_SQUARES:
        wpo = a - (tl.log2(squares) - 2.0 * tl.log2(s_h)) * LN2
    tl.store(stats_ptr + TOK_WPO_LOGP * n_rows + row, wpo)
