"""Numerical guarantees of the per-token pass beyond the float64 parity tests (docs/SPEC.md,
Numerics): exact steps at policy == reference, step decisions exact to fp32 on long
completions, non-finite inputs, absent vocabulary entries, and the split-V path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo_kernels import epsilon_dpo_loss
from epsdpo_kernels import layout as L
from epsdpo_kernels import steps as loss_steps
from epsdpo_kernels.params import LossParams
from epsdpo_kernels.sequences import padded_sequences
from tests.helpers.batches import make_batch
from tests.helpers.checks import compare_to_reference
from tests.helpers.compare import VALUE_TOL, assert_close

BACKENDS = ["torch", "triton"]


def token_forward(policy_logits, ref_logits, labels, params):
    return loss_steps.backend(params).token_forward(policy_logits, ref_logits, labels, params)


def _params(backend, epsilon=0.01):
    # scored_count is the linear path's; the per-token steps tested here do not read it.
    return LossParams(
        beta=0.1,
        epsilon=epsilon,
        label_smoothing=0.0,
        ignore_index=-100,
        average_log_prob=False,
        backend=backend,
        scored_count=0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [300, 5000], ids=["V300-tail-only", "V5000-blocks-and-tail"])
def test_policy_equal_to_reference_gives_exactly_zero_steps(backend, device, dtype, v):
    """At the first training step the policy is the reference: the mixes h ± ε(h − g) are then
    bitwise h, so the four per-token log-probabilities are bitwise equal and every step is 0
    (the exact answer), whatever rounding the log-sum-exps have."""
    policy, _, labels = make_batch(4, 6, v, dtype=dtype, device=device, seed=5)
    stats = token_forward(policy, policy.clone(), labels, _params(backend, 0.05))
    assert torch.equal(stats[L.TOK_LOGP], stats[L.TOK_REF_LOGP])
    assert (stats[L.TOK_P_EPS_DELTA] == 0).all() and (stats[L.TOK_N_EPS_DELTA] == 0).all()
    out = epsilon_dpo_loss(policy, policy.clone(), labels, beta=0.1, epsilon=0.05, backend=backend)
    assert (out.steps == 0).all()
    assert torch.equal(out.p_epsilon_logratios, out.logratios)
    assert torch.equal(out.n_epsilon_logratios, out.logratios)


def _float64_gaps(policy, ref, labels, epsilon):
    """ℓ⁺ − ℓ and ℓ⁻ − ℓ per pair, in float64 straight from the definition."""
    h, g = policy.double(), ref.double()
    scored = labels != -100
    y = labels.clamp(min=0).unsqueeze(-1)

    def seq(x):
        return (torch.log_softmax(x, -1).gather(-1, y).squeeze(-1) * scored).sum(-1)

    a, u, d = seq(h), seq(h + epsilon * (h - g)), seq(h - epsilon * (h - g))
    b = len(a) // 2
    return (u - a)[:b] - (u - a)[b:], (d - a)[:b] - (d - a)[b:]


@pytest.mark.parametrize("backend", [*BACKENDS[:1], pytest.param("triton", marks=pytest.mark.slow)])
def test_step_decisions_on_long_completions_agree_with_float64(backend, device):
    """T = 512 scored tokens, policy close to the reference, ε = 0.01: the step compares ℓ⁺, ℓ
    and ℓ⁻, sums of ~−2000 whose gaps are ~1e-3. Decisions must agree with float64 wherever
    the float64 margin exceeds the fp32 error of the summed differences.

    Error model (measured with the torch backend: max per-token error 1.04 × 2^-24 ×
    max|h|): each token's u − a is one rounding at the scale of the row's logits, so a pair's
    gap errs by at most Σ over its scored tokens of 2^-22 × max_v(|h|, |g|) (4× margin)."""
    b = 2 if backend == "triton" else 16  # the interpreter runs ~8 ms per token row
    gen = torch.Generator().manual_seed(2)
    policy = torch.randn(2 * b, 512, 256, generator=gen) * 2
    ref = policy + 0.02 * torch.randn(2 * b, 512, 256, generator=gen)
    labels = torch.randint(0, 256, (2 * b, 512), generator=gen)
    epsilon = 0.01
    p_gap, n_gap = _float64_gaps(policy, ref, labels, epsilon)
    expected = ((p_gap > 0) & (n_gap < 0)).long() - ((n_gap > 0) & (p_gap < 0)).long()

    params = _params(backend, epsilon)
    stats = token_forward(policy.to(device), ref.to(device), labels.to(device), params)
    stats = stats.cpu().view(L.TOKEN_FIELDS, 2 * b, 512)
    scale = torch.maximum(policy.abs().amax(-1), ref.abs().amax(-1)).double().sum(-1)
    bound = 2.0**-22 * (scale[:b] + scale[b:])
    dp = stats[L.TOK_P_EPS_DELTA].double().sum(-1)
    dn = stats[L.TOK_N_EPS_DELTA].double().sum(-1)
    assert ((dp[:b] - dp[b:]) - p_gap).abs().le(bound).all()
    assert ((dn[:b] - dn[b:]) - n_gap).abs().le(bound).all()

    # The steps from these stats, as the entry points take them (steps.pair_buffer): a second
    # forward through epsilon_dpo_loss would repeat the interpreter's slowest part.
    labels = labels.to(device)
    sums = loss_steps.backend(params).sequence_sums(
        stats.view(L.TOKEN_FIELDS, -1).to(device), labels, padded_sequences(labels), params
    )
    steps = loss_steps.backend(params).pair_head(sums, params)[L.PAIR_STEP].cpu().long()
    decided = torch.minimum(p_gap.abs(), n_gap.abs()) > bound
    assert decided.sum() >= b // 2, "too few pairs clear the bound for the test to mean much"
    assert torch.equal(steps[decided], expected[decided])


def test_summed_differences_are_far_more_exact_than_separate_sums():
    """Why the token stats hold u − a (layout.py): summing u and a per sequence in fp32 and
    subtracting errs on ℓ⁺ − ℓ ~100× more than summing the per-token differences, as much as
    the gaps themselves at ε = 0.01."""
    b, gen = 16, torch.Generator().manual_seed(2)
    policy = torch.randn(2 * b, 512, 256, generator=gen) * 2
    ref = policy + 0.02 * torch.randn(2 * b, 512, 256, generator=gen)
    labels = torch.randint(0, 256, (2 * b, 512), generator=gen)
    p_gap, _ = _float64_gaps(policy, ref, labels, 0.01)
    stats = token_forward(policy, ref, labels, _params("torch")).view(L.TOKEN_FIELDS, 2 * b, 512)
    a, du = stats[L.TOK_LOGP], stats[L.TOK_P_EPS_DELTA]
    summed = du.sum(-1)
    separate = (a + du).sum(-1) - a.sum(-1)
    new_err = ((summed[:b] - summed[b:]).double() - p_gap).abs().max()
    old_err = ((separate[:b] - separate[b:]).double() - p_gap).abs().max()
    assert old_err > 10 * new_err, (old_err, new_err)
    assert old_err > 0.05 * p_gap.abs().median(), "the old error is not negligible next to the gaps"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["policy", "reference"])
def test_nan_in_a_scored_row_gives_a_non_finite_loss(backend, device, where):
    """Never a silently finite loss from NaN logits. (On the GPU, max.f32 drops NaN where the
    interpreter propagates it; the kernels never let a NaN reach a max unguarded: a NaN entry
    makes its stream's sum NaN through exp2 on both, and the final clamps are selects.)"""
    policy, ref, labels = make_batch(2, 5, 300, device=device, seed=9)
    n, t = (labels != -100).nonzero()[0].tolist()  # a scored position
    (policy if where == "policy" else ref)[n, t, 17] = float("nan")
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.1, epsilon=0.1, backend=backend)
    assert not torch.isfinite(out.loss)
    # An ignored row's NaN is never read.
    policy, ref, labels = make_batch(2, 5, 300, device=device, seed=9)
    n, t = (labels == -100).nonzero()[0].tolist()
    policy[n, t, 17] = float("nan")
    assert torch.isfinite(epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend=backend).loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_entries_minus_inf_in_both_are_absent(backend, device, dtype):
    """A vocabulary entry that is −inf in policy and reference (masked out of the vocabulary)
    contributes nothing: the loss, every output and the gradient on the other entries equal
    those of the same batch without that entry; no NaN anywhere."""
    v = 4100  # several blocks and a tail under every dtype's tile
    policy, ref, labels = make_batch(2, 4, v, dtype=dtype, device=device, seed=4)
    absent = torch.tensor([0, 1, 2000, v - 1], device=device)
    labels[(labels.unsqueeze(-1) == absent).any(-1)] = 5
    keep = torch.ones(v, dtype=torch.bool, device=device)
    keep[absent] = False
    masked_policy, masked_ref = policy.clone(), ref.clone()
    masked_policy[..., absent] = -float("inf")
    masked_ref[..., absent] = -float("inf")
    remap = torch.cumsum(keep, 0) - 1

    leaf = masked_policy.clone().requires_grad_()
    out = epsilon_dpo_loss(leaf, masked_ref, labels, beta=0.1, epsilon=0.2, backend=backend)
    out.loss.backward()
    small_leaf = policy[..., keep].clone().requires_grad_()
    small_labels = torch.where(labels == -100, labels, remap[labels.clamp(min=0)])
    expected = epsilon_dpo_loss(
        small_leaf, ref[..., keep], small_labels, beta=0.1, epsilon=0.2, backend=backend
    )
    expected.loss.backward()
    for name in (
        "losses",
        "chosen_logps",
        "rejected_logps",
        "p_epsilon_logratios",
        "n_epsilon_logratios",
        "ref_logratios",
    ):
        assert_close(getattr(out, name), getattr(expected, name), name=name, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.steps, expected.steps)
    assert (leaf.grad[..., absent] == 0).all()
    assert_close(
        leaf.grad[..., keep].float(), small_leaf.grad.float(), name="grad", rtol=2**-7, atol=1e-7
    )


def test_split_v_matches_one_program_per_row(device):
    """Few rows: the forward splits V across programs and merges partial (max, sum) states;
    the backward splits the columns. Both equal the unsplit kernels."""
    from epsdpo_kernels import triton_backend as K

    policy, ref, labels = make_batch(2, 3, 9000, device=device, seed=6)
    params = _params("triton", 0.1)
    one = K.token_forward(policy, ref, labels, params, splits=1)
    # Σh nearly cancels: its rounding (summation order differs between splits) scales with
    # Σ|h|, not with the result.
    logit_sum_atol = VALUE_TOL["rtol"] * policy.abs().sum(-1).flatten()
    for splits in (2, 3):
        split = K.token_forward(policy, ref, labels, params, splits=splits)
        fields = [f for f in range(L.TOKEN_FIELDS) if f != L.TOK_LOGIT_SUM]
        assert_close(split[fields], one[fields], name=f"stats, {splits} splits", **VALUE_TOL)
        assert_close(
            split[L.TOK_LOGIT_SUM],
            one[L.TOK_LOGIT_SUM],
            name="logit sum",
            rtol=0,
            atol=logit_sum_atol,
        )
    coef = torch.randn(labels.numel(), device=device)  # one c_n per token row
    grad_one = K.token_backward(policy, labels, one, coef, params, inplace=False, splits=1)
    grad_split = K.token_backward(policy, labels, one, coef, params, inplace=False, splits=3)
    assert torch.equal(grad_one, grad_split)


def test_split_count_fills_the_gpu_once():
    from epsdpo_kernels.triton_backend.launch import PROGRAMS_PER_SM, split_count

    slots = 132 * PROGRAMS_PER_SM
    assert split_count(rows=16384, vocab=128256, block=2048, sm_count=132) == 1
    assert split_count(rows=slots, vocab=128256, block=2048, sm_count=132) == 1
    assert split_count(rows=64, vocab=128256, block=2048, sm_count=132) == -(-slots // 64)
    # Never splits narrower than MIN_BLOCKS_PER_SPLIT blocks.
    assert split_count(rows=1, vocab=32000, block=2048, sm_count=132) == 32000 // (4 * 2048)
    assert split_count(rows=1, vocab=1000, block=2048, sm_count=132) == 1
    # The case: Gemma's vocabulary in bf16 on one row made 31 splits, 6 of them empty.
    assert split_count(rows=1, vocab=256000, block=2048, sm_count=132) == 25


@settings(max_examples=200, deadline=None)
@given(
    vocab=st.integers(1, 300_000),
    block=st.sampled_from([256, 1024, 2048, 4096]),
    splits=st.integers(1, 600),
)
def test_split_plan_leaves_no_split_empty(vocab, block, splits):
    from epsdpo_kernels.triton_backend.launch import split_plan

    count, width = split_plan(vocab, block, splits)
    assert 1 <= count <= splits
    assert width % block == 0 and width >= block
    # Every split starts inside the row, and together they cover it.
    assert (count - 1) * width < vocab <= count * width


def test_torch_backend_sub_chunks_follow_the_device():
    """A CPU sub-chunk stays within the cache; a GPU one holds enough rows to fill the device
    (at V = 128k, 512 KiB would be one row per kernel launch)."""
    from epsdpo_kernels.torch_backend.rows import TORCH_CHUNK_BYTES, chunk_rows

    vocab = 128256
    assert chunk_rows(vocab, torch.device("cpu")) == 1
    assert chunk_rows(vocab, torch.device("cuda", 1)) == TORCH_CHUNK_BYTES["cuda"] // (4 * vocab)
    assert chunk_rows(vocab, torch.device("cuda")) >= 128
    assert chunk_rows(32000, torch.device("cpu")) == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["normal", "logits-1e4"])
def test_every_per_token_logprob_is_nonpositive(backend, device, scale):
    """Each of the four per-token log-probabilities is ≤ 0, even where rounding of the
    log-sum-exp could push the label's term above it (a shipped kernel elsewhere got this
    wrong and its training collapsed)."""
    from epsdpo_kernels import layout

    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(8, 16, 333, generator=gen) * scale
    policy[:, :, 7] += 40 * scale  # one dominant logit: its log-prob is within rounding of 0
    ref = policy + torch.randn(8, 16, 333, generator=gen) * scale * 0.01
    labels = torch.full((8, 16), 7)
    labels[:, ::2] = torch.randint(0, 333, (8, 8), generator=gen)
    stats = token_forward(
        policy.to(device), ref.to(device), labels.to(device), _params(backend, 0.3)
    )
    a = stats[layout.TOK_LOGP]
    # The perturbed streams are stored as u − a and d − a (layout.py).
    logps = torch.stack(
        [
            a,
            stats[layout.TOK_REF_LOGP],
            a + stats[layout.TOK_P_EPS_DELTA],
            a + stats[layout.TOK_N_EPS_DELTA],
        ]
    )
    assert torch.isfinite(logps).all() and (logps <= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rise", [0.37, 45.0, 150.0, -150.0], ids=lambda r: f"rise{r:g}")
def test_a_max_that_moves_block_by_block_rescales_the_sums_exactly(backend, device, dtype, rise):
    """The forward's lanes keep their sums relative to 2^k, k an integer near max·log2e, and
    rescale them by exact powers of two when a block raises the max (triton_backend/forward.py):
    logits that rise by ``rise`` per 1024 columns (more than one block of every dtype's tile)
    move k by fractions of a unit (0.37), by ~65 (45: a rescale of 2^-65) and past 2^-126 (150:
    the old sums vanish, as in float64); falling logits (−150) keep the first block's k. Every
    output and the gradient equal the float64 reference, the loss whatever the backend."""
    v = 4100
    policy, ref, labels = make_batch(2, 3, v, device=device, seed=11)
    ramp = rise * (torch.arange(v, device=device) // 1024).float()
    ramp -= ramp.max()  # the largest logits near 0: fp32 resolves their gradient to 1e-5
    compare_to_reference(
        (policy + ramp).to(dtype),
        (ref + ramp).to(dtype),
        labels,
        backend=backend,
        beta=0.1,
        epsilon=0.1,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e6, -1e6], ids=["plus-1e6", "minus-1e6"])
def test_logits_near_the_documented_range_stay_accurate(backend, device, offset):
    """Rows whose logits sit near ±1e6 (the Triton forward's range is ±2^21, docs/SPEC.md):
    finite, and each log-probability within the rounding of its log-sum-exp at that size (two
    ulps of 1e6, 0.125), as the float64 log-softmax of the same fp32 inputs has them."""
    gen = torch.Generator().manual_seed(12)
    policy = torch.randn(4, 5, 3000, generator=gen) * 3 + offset
    ref = policy + torch.randn(4, 5, 3000, generator=gen)
    labels = torch.randint(0, 3000, (4, 5), generator=gen)
    stats = token_forward(
        policy.to(device), ref.to(device), labels.to(device), _params(backend, 0.1)
    )
    y = labels.unsqueeze(-1)
    for field, logits in ((L.TOK_LOGP, policy), (L.TOK_REF_LOGP, ref)):
        expected = torch.log_softmax(logits.double(), -1).gather(-1, y).flatten()
        got = stats[field].cpu().double()
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max() <= 0.125, (got - expected).abs().max()
