"""ches_scores against the float64 definition, and the displacement metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo_kernels import EpsilonDPOOutput, ches_scores
from epsdpo_kernels.reference import reference_ches_scores


@st.composite
def ches_case(draw):
    pairs = draw(st.integers(1, 4))
    tokens = draw(st.integers(1, 12))
    size = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, tokens, size, generator=gen) * scale
    # Ragged responses: each row scores a random contiguous span (possibly empty).
    labels = torch.full((2 * pairs, tokens), -100)
    for n in range(2 * pairs):
        start = draw(st.integers(0, tokens))
        end = draw(st.integers(start, tokens))
        labels[n, start:end] = torch.randint(0, 50, (end - start,), generator=gen)
    return hidden, labels


@settings(max_examples=60, deadline=None)
@given(case=ches_case(), normalized=st.booleans(), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_ches_equals_the_float64_definition(case, normalized, dtype):
    hidden, labels = case
    hidden = hidden.to(getattr(torch, dtype))
    got = ches_scores(hidden, labels, length_normalized=normalized)
    expected = reference_ches_scores(hidden, labels, length_normalized=normalized)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # The inputs are exact (bf16 values upcast exactly); only fp32 accumulation differs. The
    # score is a difference of two terms of size ‖c‖·‖r‖, so the error scales with that.
    pairs = labels.shape[0] // 2
    for i in range(pairs):
        if math.isnan(expected[i]):
            assert math.isnan(got[i]), (got, expected)
            continue
        mask = labels != -100
        c = (hidden[i].double() * mask[i, :, None]).sum(0)
        r = (hidden[pairs + i].double() * mask[pairs + i, :, None]).sum(0)
        if normalized:
            c, r = c / mask[i].sum(), r / mask[pairs + i].sum()
        magnitude = float(c.norm() * (c.norm() + r.norm())) + 1e-30
        assert abs(float(got[i]) - float(expected[i])) <= 1e-5 * magnitude, (got, expected)


def test_identical_responses_score_exactly_zero():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 33, generator=gen) * 5
    hidden[1] = hidden[0]
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6, -100]] * 2)
    for normalized in (False, True):
        assert ches_scores(hidden.bfloat16(), labels, length_normalized=normalized).item() == 0.0
        assert ches_scores(hidden, labels, length_normalized=normalized).item() == 0.0


def test_a_case_worked_by_hand():
    # Pair 0: chosen vectors (1, 0), (1, 1) → c = (2, 1); rejected (0, 2) → r = (0, 2).
    #   ⟨c, r⟩ − ‖c‖² = 2 − 5 = −3; means: c̄ = (1, 0.5), r̄ = (0, 2): 1 − 1.25 = −0.25.
    # Pair 1: chosen (3, 0) → c = (3, 0); rejected (1, 1), (2, 0) → r = (3, 1): 9 − 9 = 0;
    #   means: c̄ = (3, 0), r̄ = (1.5, 0.5): 4.5 − 9 = −4.5.
    hidden = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]],
            [[3.0, 0.0], [7.0, 7.0], [7.0, 7.0]],
            [[0.0, 2.0], [8.0, 8.0], [8.0, 8.0]],
            [[1.0, 1.0], [2.0, 0.0], [float("inf"), 0.0]],
        ]
    )
    labels = torch.tensor([[5, 6, -100], [5, -100, -100], [5, -100, -100], [5, 6, -100]])
    assert ches_scores(hidden, labels).tolist() == [-3.0, 0.0]
    assert ches_scores(hidden, labels, length_normalized=True).tolist() == [-0.25, -4.5]


def test_empty_response_is_nan_only_when_normalised():
    hidden = torch.ones(2, 3, 4)
    labels = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    assert ches_scores(hidden, labels).item() == -(3.0**2) * 4  # c = (3, 3, 3, 3), r = 0
    assert math.isnan(ches_scores(hidden, labels, length_normalized=True).item())


@pytest.mark.parametrize(
    "hidden, labels, error, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), ValueError, "hidden must have 3"),
        (torch.zeros(3, 3, 4), torch.zeros(3, 3, dtype=torch.long), ValueError, "2B > 0"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ValueError, "labels must"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), TypeError, "integer"),
        (
            torch.zeros(2, 3, 4, dtype=torch.long),
            torch.zeros(2, 3, dtype=torch.long),
            TypeError,
            "hidden must be float32",
        ),
        ([[0.0]], torch.zeros(2, 3, dtype=torch.long), TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(hidden, labels, error, match):
    with pytest.raises(error, match=match):
        ches_scores(hidden, labels)


def _output(chosen, ref_chosen):
    chosen, ref_chosen = torch.tensor(chosen), torch.tensor(ref_chosen)
    zeros = torch.zeros_like(chosen)
    return EpsilonDPOOutput(
        loss=zeros.sum(),
        losses=zeros,
        steps=zeros.long(),
        beta_used=zeros + 0.1,
        chosen_logps=chosen,
        rejected_logps=zeros,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=zeros,
        chosen_rewards=zeros,
        rejected_rewards=zeros,
        logratios=zeros,
        ref_logratios=zeros,
        p_epsilon_logratios=zeros,
        n_epsilon_logratios=zeros,
        mean_chosen_logits=zeros.sum(),
        mean_rejected_logits=zeros.sum(),
        chosen_tokens=zeros + 1,
        rejected_tokens=zeros + 1,
        beta=0.1,
    )


def test_displacement_metrics_on_a_hand_built_batch():
    # Chosen log-probs vs the reference's: fell by 2, rose by 1, unchanged, fell by 0.5.
    out = _output([-12.0, -9.0, -7.0, -3.5], [-10.0, -10.0, -7.0, -3.0])
    metrics = out.metrics()
    assert metrics["displacement/chosen_below_ref"].item() == 0.5  # 2 of 4 fell (ties don't)
    assert metrics["displacement/chosen_logratio"].item() == pytest.approx((-2 + 1 + 0 - 0.5) / 4)
    per_pair = out.pair_metrics()
    assert per_pair["displacement/chosen_below_ref"].tolist() == [1.0, 0.0, 0.0, 1.0]
