"""``token_weights``: each scored token's log-probabilities enter its sequence's sums times its
weight (LD-DPO's ``ld_alpha``, token masks). Both entry points and both backends against the
float64 reference with the same weights: every field and gradient, padded and packed, fp32 and
bf16, zero weights, NaN weights at unscored tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from tests.helpers.batches import make_batch, make_linear_batch
from tests.helpers.checks import compare_linear, compare_to_reference
from tests.helpers.packing import pack

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.slow)]


def _weights(labels, seed, zero_frac=0.2):
    """Weights in [0, 1.5] with some zeros at scored tokens and NaN at every unscored one (never
    read: the sums and the gradient see only scored tokens)."""
    gen = torch.Generator().manual_seed(seed)
    w = 1.5 * torch.rand(labels.shape, generator=gen)
    w[torch.rand(labels.shape, generator=gen) < zero_frac] = 0.0
    w[labels.cpu() == -100] = float("nan")
    return w.to(labels.device)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 8),
    v=st.sampled_from([7, 65, 507]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    epsilon=st.sampled_from([0.0, 0.05, 0.5]),
    average_log_prob=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_logits_entry_point_matches_reference(
    backend, device, b, t, v, dtype, epsilon, average_log_prob, packed, seed
):
    policy, ref, labels = make_batch(b, t, v, dtype=dtype, device=device, seed=seed)
    compare_to_reference(
        policy,
        ref,
        labels,
        backend=backend,
        packing=pack(labels.cpu(), seed=seed, mode="tokens", fillers=2) if packed else None,
        beta=0.3,
        epsilon=epsilon,
        average_log_prob=average_log_prob,
        token_weights=_weights(labels, seed),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 7),
    v=st.sampled_from([3, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk_size=st.sampled_from([None, 1, 5]),
    vocab_chunk_size=st.sampled_from([None, 2, 100]),
    epsilon=st.sampled_from([0.0, 0.1]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_entry_point_matches_reference(
    backend, device, b, t, v, dtype, chunk_size, vocab_chunk_size, epsilon, packed, seed
):
    inputs = make_linear_batch(b, t, 8, v, dtype=dtype, device=device, bias=True, seed=seed)
    labels = inputs["labels"]
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        packing=pack(labels.cpu(), seed=seed, fillers=1) if packed else None,
        beta=0.2,
        epsilon=epsilon,
        token_weights=_weights(labels, seed),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unit_weights_are_bitwise_no_weights(backend, device):
    policy, ref, labels = make_batch(2, 6, 65, dtype=torch.float32, device=device, seed=1)
    results = []
    for weights in (None, torch.ones(labels.shape, device=device)):
        leaf = policy.detach().clone().requires_grad_()
        out = epsilon_dpo_loss(
            leaf, ref, labels, beta=0.1, epsilon=0.1, backend=backend, token_weights=weights
        )
        out.loss.backward()
        results.append((out, leaf.grad))
    (a, ga), (b, gb) = results
    for name in ("losses", "chosen_logps", "ref_rejected_logps", "p_epsilon_logratios", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(ga, gb)


def test_zero_weights_make_a_row_count_nothing(device):
    """A row whose weights are all 0 has log-probs 0 (as if unscored) and no gradient, while
    its tokens still count for average_log_prob's divisor and the logit metrics."""
    policy, ref, labels = make_batch(2, 5, 33, dtype=torch.float32, device=device, seed=2)
    labels[:, 0] = 3  # every row scores at least one token
    weights = torch.ones(labels.shape, device=device)
    weights[1] = 0.0
    leaf = policy.detach().clone().requires_grad_()
    out = epsilon_dpo_loss(leaf, ref, labels, beta=0.1, token_weights=weights, backend="torch")
    out.loss.backward()
    assert out.chosen_logps[1] == 0 and out.ref_chosen_logps[1] == 0
    assert out.chosen_tokens[1] == (labels[1] != -100).sum()
    assert (leaf.grad[1] == 0).all() and (leaf.grad[3] != 0).any()


@pytest.mark.parametrize(
    "weights, error, match",
    [
        ([[1.0]], TypeError, "token_weights must be a torch.Tensor"),
        (torch.ones(4, 5, dtype=torch.long), TypeError, "token_weights must be a float tensor"),
        (torch.ones(4, 4), ValueError, r"token_weights must have the shape of labels \(4, 5\)"),
        (torch.full((4, 5), -1.0), ValueError, "finite and >= 0 wherever the label is scored"),
        (torch.full((4, 5), float("inf")), ValueError, "finite and >= 0"),
    ],
)
def test_bad_weights_name_the_argument(weights, error, match):
    policy, ref, labels = make_batch(2, 5, 9, dtype=torch.float32, device=torch.device("cpu"))
    labels[:, -1] = 1  # a scored token in every row
    with pytest.raises(error, match=match):
        epsilon_dpo_loss(policy, ref, labels, beta=0.1, token_weights=weights)
    hidden, weight = torch.randn(4, 5, 3), torch.randn(9, 3)
    with pytest.raises(error, match=match):
        linear_epsilon_dpo_loss(
            hidden, weight, hidden, weight, labels, beta=0.1, token_weights=weights
        )
