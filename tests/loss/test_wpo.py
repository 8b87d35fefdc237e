"""``wpo_weights=True``: WPO's per-pair weights (TRL's ``use_weighting``) from one more running
sum of the same pass over V. Both entry points and both backends against the float64 reference:
the weights and every other field and gradient, padded and packed, fp32 and bf16, V not a power
of two, logits of ±1e4, a V split across programs, and the plain kernels' outputs unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels import layout as L
from epsdpo_kernels.params import LossParams
from tests.helpers.batches import make_batch, make_linear_batch
from tests.helpers.checks import compare_linear, compare_to_reference
from tests.helpers.compare import assert_close
from tests.helpers.packing import pack

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 8),
    v=st.sampled_from([7, 65, 507]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale=st.sampled_from([1.0, 8.0]),
    epsilon=st.sampled_from([0.0, 0.1]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_logits_entry_point_matches_reference(
    backend, device, b, t, v, dtype, scale, epsilon, packed, seed
):
    policy, ref, labels = make_batch(b, t, v, dtype=dtype, device=device, scale=scale, seed=seed)
    compare_to_reference(
        policy,
        ref,
        labels,
        backend=backend,
        packing=pack(labels.cpu(), seed=seed, mode="tokens", fillers=2) if packed else None,
        beta=0.2,
        epsilon=epsilon,
        wpo_weights=True,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 6),
    v=st.sampled_from([3, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk_size=st.sampled_from([None, 1, 5]),
    softcap=st.sampled_from([None, 2.0]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_entry_point_matches_reference(
    backend, device, b, t, v, dtype, chunk_size, softcap, packed, seed
):
    inputs = make_linear_batch(b, t, 8, v, dtype=dtype, device=device, bias=True, seed=seed)
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=chunk_size,
        packing=pack(inputs["labels"].cpu(), seed=seed, fillers=1) if packed else None,
        beta=0.2,
        epsilon=0.1,
        logit_softcap=softcap,
        wpo_weights=True,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_of_ten_thousand_keep_the_weights_finite(backend, device):
    """log Σp² near 0 (one logit far above the rest) and far below it (a flat row): the sums of
    squared exponentials neither overflow nor lose the row."""
    policy, ref, labels = make_batch(2, 6, 301, dtype=torch.float32, device=device, seed=3)
    policy = policy * 1e4
    policy[0] = 0.0  # flat rows: Σp² = 1/V
    compare_to_reference(
        policy, ref, labels, backend=backend, beta=0.1, epsilon=0.1, wpo_weights=True
    )


def test_a_split_row_gives_the_unsplit_wpo_term(device):
    """Few rows: the forward splits V over programs and the merge kernel combines their sums of
    squares (each at its own max) as it combines the lanes of one program."""
    from epsdpo_kernels.triton_backend.forward import token_forward
    from tests.helpers.interpreter import interpreter_problem

    if device.type == "cpu" and interpreter_problem():
        pytest.skip(interpreter_problem())
    policy, ref, labels = make_batch(1, 3, 9000, dtype=torch.float32, device=device, seed=6)
    labels[:, 0] = 5
    params = LossParams(
        beta=0.1,
        epsilon=0.1,
        label_smoothing=0.0,
        ignore_index=-100,
        average_log_prob=False,
        backend="triton",
        scored_count=int((labels != -100).sum()),
        wpo_weights=True,
    )
    one = token_forward(policy, ref, labels, params, splits=1)
    for splits in (2, 3):
        split = token_forward(policy, ref, labels, params, splits=splits)
        assert_close(
            split[L.TOK_WPO_LOGP],
            one[L.TOK_WPO_LOGP],
            name=f"{splits} splits",
            rtol=1e-5,
            atol=1e-5,
        )
    assert (one[L.TOK_WPO_LOGP][labels.flatten().cpu() != -100] != 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_the_option_nothing_else_changes(backend, device):
    """wpo_weights only adds: the other fields and the gradient are bitwise those of a call
    without it, and without it there are no weights."""
    policy, ref, labels = make_batch(2, 6, 65, dtype=torch.float32, device=device, seed=1)
    results = []
    for wpo in (False, True):
        leaf = policy.detach().clone().requires_grad_()
        out = epsilon_dpo_loss(
            leaf, ref, labels, beta=0.1, epsilon=0.1, backend=backend, wpo_weights=wpo
        )
        out.loss.backward()
        results.append((out, leaf.grad))
    (plain, g_plain), (wpo, g_wpo) = results
    assert plain.wpo_weights is None and wpo.wpo_weights.shape == (2,)
    for name in ("losses", "chosen_logps", "ref_rejected_logps", "p_epsilon_logratios", "steps"):
        assert torch.equal(getattr(plain, name), getattr(wpo, name)), name
    assert torch.equal(g_plain, g_wpo)
    assert not wpo.wpo_weights.requires_grad


def test_a_uniform_policy_gives_weight_one(device):
    """Every row uniform over V: log p(y) = −log V = log Σp² at every token, so w = 1 exactly
    in the math; the kernels' rounding of it stays within a few ulps of log V."""
    policy = torch.zeros(4, 5, 101, device=device)
    labels = torch.randint(0, 101, (4, 5), device=device)
    out = epsilon_dpo_loss(policy, policy, labels, beta=0.1, wpo_weights=True)
    assert_close(out.wpo_weights, torch.ones(2), name="w", rtol=0, atol=64 * math.log(101) * 2**-24)


def test_the_option_is_checked():
    policy, ref, labels = make_batch(1, 3, 9, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(TypeError, match="wpo_weights must be a bool"):
        epsilon_dpo_loss(policy, ref, labels, beta=0.1, wpo_weights=1)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    with pytest.raises(TypeError, match="wpo_weights must be a bool"):
        linear_epsilon_dpo_loss(hidden, weight, hidden, weight, labels, beta=0.1, wpo_weights="y")
