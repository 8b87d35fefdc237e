"""Baseline: the per-token Triton kernels as they were before the roofline rewrite (commit
9c61c40), kept only so that a GPU run can measure the rewrite against them in the same process
(benchmarks/bench_kernels.py, which the GPU campaign's `kernels` phase runs) and kernel_report.py
can show both. Not used by the library.

Their stats layout is the old one (u and d, not u − a and d − a); the benchmark times them and
does not compare their outputs.

Both kernels see their input as ``rows = N·T`` token rows of a ``(N, T, V)`` tensor with arbitrary
strides on the first two dimensions and unit stride over V, so ``logits[:, :-1]`` slices and the
linear path's compact ``(C, 1, V)`` chunks go through without a copy. Offsets are computed in
int64: 2B·T·V passes 2^31 at realistic sizes (8 × 2048 × 128256 ≈ 2.1e9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOK_LSE, TOK_LOGIT_SUM, TOKEN_FIELDS = 4, 5, 6

# Blocks large enough to amortise the per-block reductions (8 per block in the forward), with
# 256 elements per warp so the four fp32 streams stay in registers. Not tuned on a GPU yet; chosen
# from ptxas's static counts for sm_90 (bf16): forward 4096 × 16 warps = 63 registers, backward
# 8192 × 16 warps = 56, no spills (at 8 warps the forward needs 110), so two 512-thread programs
# fit an SM. tests/kernels/test_compile.py holds every launched configuration to zero spills.
MAX_BLOCK_V_FWD = 4096
MAX_BLOCK_V_BWD = 8192


@triton.jit
def _online_lse_update(run_max, run_sum, x):
    """Fold one block into a running (max, Σexp(x − max)); masked lanes hold −inf."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
    return new_max, run_sum


@triton.jit
def token_forward_kernel(
    # data ptrs
    policy_ptr,  # (N, T, V) policy logits h, any float dtype, read once
    ref_ptr,  # (N, T, V) reference logits g, read once
    labels_ptr,  # (N, T) integer labels
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 out, see layout.py
    # shapes
    T,
    V,
    n_rows,  # N·T, the stride between fields of stats
    # strides (elements; V has unit stride)
    stride_pn,
    stride_pt,
    stride_rn,
    stride_rt,
    stride_ln,
    stride_lt,
    # runtime constants (not constexpr: a new ε must not recompile)
    epsilon,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program owns one token row: it streams h and g over V once and writes the label's
    log-probability under the policy, the reference and the two ε-mixes, plus logsumexp(h) for
    backward and Σh for the logits metrics. A row whose label is ignore_index reads no logits."""
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        for field in tl.static_range(6):
            tl.store(stats_ptr + field * n_rows + row, 0.0)
        return

    policy_row = policy_ptr + n * stride_pn + t * stride_pt
    ref_row = ref_ptr + n * stride_rn + t * stride_rt
    w_plus = 1.0 + epsilon
    w_minus = 1.0 - epsilon

    # Running (max, sum) per stream. All arithmetic in fp32 whatever the load dtype: the sums
    # run over 1e5+ terms and bf16 would lose the label's probability entirely.
    # Loop-carried values must enter the loop as fp32 tensors: a Python float would be a
    # constexpr whose type changes on the first iteration.
    zero = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    m_h = zero - float("inf")
    m_g = zero - float("inf")
    m_p = zero - float("inf")
    m_n = zero - float("inf")
    s_h = zero
    s_g = zero
    s_p = zero
    s_n = zero
    logit_sum = zero
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        h = tl.load(policy_row + cols, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(ref_row + cols, mask=valid, other=0.0).to(tl.float32)
        logit_sum += tl.sum(h, axis=0)
        # Mix before masking: (1+ε)(−inf) − ε(−inf) would be NaN.
        mix_p = tl.where(valid, w_plus * h - epsilon * g, -float("inf"))
        mix_n = tl.where(valid, w_minus * h + epsilon * g, -float("inf"))
        h = tl.where(valid, h, -float("inf"))
        g = tl.where(valid, g, -float("inf"))
        m_h, s_h = _online_lse_update(m_h, s_h, h)
        m_g, s_g = _online_lse_update(m_g, s_g, g)
        m_p, s_p = _online_lse_update(m_p, s_p, mix_p)
        m_n, s_n = _online_lse_update(m_n, s_n, mix_n)

    h_y = tl.load(policy_row + label).to(tl.float32)
    g_y = tl.load(ref_row + label).to(tl.float32)
    lse_h = m_h + tl.log(s_h)
    lse_g = m_g + tl.log(s_g)
    lse_p = m_p + tl.log(s_p)
    lse_n = m_n + tl.log(s_n)
    # min(·, 0): a log-probability is ≤ 0; rounding in the last ulp must not make it positive.
    tl.store(stats_ptr + 0 * n_rows + row, tl.minimum(h_y - lse_h, 0.0))
    tl.store(stats_ptr + 1 * n_rows + row, tl.minimum(g_y - lse_g, 0.0))
    tl.store(stats_ptr + 2 * n_rows + row, tl.minimum(w_plus * h_y - epsilon * g_y - lse_p, 0.0))
    tl.store(stats_ptr + 3 * n_rows + row, tl.minimum(w_minus * h_y + epsilon * g_y - lse_n, 0.0))
    tl.store(stats_ptr + 4 * n_rows + row, lse_h)
    tl.store(stats_ptr + 5 * n_rows + row, logit_sum)


# Backward. With p = softmax(h) and A_n = Σ_t log p[y_t], ∂A_n/∂h_t = onehot(y_t) − p_t, and the
# loss reaches A_n only through one scalar per sequence row, c_n = ∂L/∂A_n (SPEC.md, Gradients).
# So each token row needs h, its saved lse and c_n: p = exp(h − lse) costs one exp per element
# and no second reduction.
@triton.jit
def token_backward_kernel(
    # data ptrs
    policy_ptr,  # (N, T, V) policy logits h
    labels_ptr,  # (N, T)
    stats_ptr,  # (TOKEN_FIELDS, N·T) fp32 from the forward; only the lse field is read
    row_coef_ptr,  # (N,) fp32, c_n per sequence row (upstream gradient and averaging folded in)
    grad_ptr,  # (N, T, V) out, policy dtype; may alias policy_ptr (in-place backward)
    # shapes
    T,
    V,
    n_rows,
    # strides
    stride_pn,
    stride_pt,
    stride_ln,
    stride_lt,
    stride_gn,
    stride_gt,
    # runtime constants
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program owns one token row and writes its whole gradient row: zeros for an ignored
    row (without reading its logits), c·(onehot(y) − exp(h − lse)) otherwise."""
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    label = tl.load(labels_ptr + n * stride_ln + t * stride_lt).to(tl.int64)
    grad_row = grad_ptr + n * stride_gn + t * stride_gt
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(grad_row + cols, zeros.to(grad_ptr.dtype.element_ty), mask=cols < V)
        return

    policy_row = policy_ptr + n * stride_pn + t * stride_pt
    lse = tl.load(stats_ptr + 4 * n_rows + row)
    coef = tl.load(row_coef_ptr + n)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        h = tl.load(policy_row + cols, mask=valid, other=0.0).to(tl.float32)
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = coef * (onehot - tl.exp(h - lse))
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def launch_config(vocab: int, max_block: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary: 256 elements per warp, 4 to 16 warps."""
    block = min(max_block, triton.next_power_of_2(vocab))
    return block, min(16, max(4, block // 256))


def token_forward(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    ignore_index: int,
) -> torch.Tensor:
    """Launch the forward over all N·T token rows; returns the ``(TOKEN_FIELDS, N·T)`` stats."""
    assert TOK_LSE == 4 and TOK_LOGIT_SUM == 5 and TOKEN_FIELDS == 6  # the kernel hard-codes them
    policy_logits = _unit_stride_v(policy_logits)
    ref_logits = _unit_stride_v(ref_logits)
    n, t, v = policy_logits.shape
    stats = torch.empty((TOKEN_FIELDS, n * t), dtype=torch.float32, device=policy_logits.device)
    block_v, num_warps = launch_config(v, MAX_BLOCK_V_FWD)
    token_forward_kernel[(n * t,)](
        policy_logits,
        ref_logits,
        labels,
        stats,
        t,
        v,
        n * t,
        policy_logits.stride(0),
        policy_logits.stride(1),
        ref_logits.stride(0),
        ref_logits.stride(1),
        labels.stride(0),
        labels.stride(1),
        float(epsilon),
        int(ignore_index),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return stats


def token_backward(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    row_coef: torch.Tensor,
    *,
    ignore_index: int,
    inplace: bool,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the ``(N, T, V)`` policy logits, in their dtype."""
    policy_logits = _unit_stride_v(policy_logits)
    n, t, v = policy_logits.shape
    grad = policy_logits if inplace else torch.empty_like(policy_logits)
    block_v, num_warps = launch_config(v, MAX_BLOCK_V_BWD)
    token_backward_kernel[(n * t,)](
        policy_logits,
        labels,
        stats,
        row_coef.float().contiguous(),
        grad,
        t,
        v,
        n * t,
        policy_logits.stride(0),
        policy_logits.stride(1),
        labels.stride(0),
        labels.stride(1),
        grad.stride(0),
        grad.stride(1),
        int(ignore_index),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad


def _unit_stride_v(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
