"""AdaptiveBeta: β ← β / (1 + ε·mean(s)) per optimizer step, across micro-batches and ranks."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from epsdpo_kernels import AdaptiveBeta
from tests.helpers.distributed import gloo_group, rendezvous_file


def test_update_uses_mean_over_micro_batches():
    controller = AdaptiveBeta(beta=0.1, epsilon=0.02)
    controller.observe(torch.tensor([1, 1, 1]))
    controller.observe(torch.tensor([-1]))  # mean over 4 pairs = 0.5, not the mean of means
    assert controller.update() == pytest.approx(0.1 / (1 + 0.02 * 0.5))
    assert controller.beta == pytest.approx(0.1 / 1.01)


def test_update_without_observations_keeps_beta_and_resets():
    controller = AdaptiveBeta(beta=0.3, epsilon=0.1)
    assert controller.update() == 0.3
    controller.observe(torch.tensor([-1, -1]))
    controller.update()
    assert controller.update() == pytest.approx(0.3 / 0.9)  # second update saw nothing new


def test_state_dict_round_trip_including_pending():
    a = AdaptiveBeta(beta=0.1, epsilon=0.05)
    a.observe(torch.tensor([1, 0]))
    a.update()
    a.observe(torch.tensor([1, 1, -1]))
    state = a.state_dict()
    b = AdaptiveBeta(beta=1.0, epsilon=0.05)
    b.load_state_dict(state)
    assert b.beta == a.beta and b.epsilon == a.epsilon
    assert b.update() == a.update()


def test_state_from_another_epsilon_is_refused():
    saved = AdaptiveBeta(beta=0.1, epsilon=0.05).state_dict()
    other = AdaptiveBeta(beta=0.1, epsilon=0.01)
    with pytest.raises(
        ValueError,
        match=r"adapted with epsilon=0.05, this controller has "
        r"epsilon=0.01",
    ):
        other.load_state_dict(saved)
    assert other.epsilon == 0.01 and other.beta == 0.1


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="beta"):
        AdaptiveBeta(beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        AdaptiveBeta(beta=0.1, epsilon=1.5)
    with pytest.raises(TypeError, match="steps"):
        AdaptiveBeta(beta=0.1).observe([1, 0])


def _worker(rank, world, store, results):
    with gloo_group(rank, world, store):
        controller = AdaptiveBeta(beta=0.1, epsilon=0.1)
        # Rank 0 sees 3 pairs with s = +1, rank 1 one pair with s = -1: global mean = 0.5.
        controller.observe(torch.tensor([1, 1, 1]) if rank == 0 else torch.tensor([-1]))
        results[rank] = controller.update()


@pytest.mark.xdist_group("multi_process")
def test_update_all_reduces_across_ranks():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, rendezvous_file(), results), nprocs=2, join=True)
    expected = 0.1 / (1 + 0.1 * 0.5)
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


@pytest.mark.parametrize(
    "steps",
    [torch.tensor([-5, -5]), torch.tensor([1.0, float("nan")]), torch.tensor([0.5])],
    ids=["out-of-range", "nan", "fraction"],
)
def test_observed_values_outside_the_steps_are_refused_before_beta_moves(steps):
    """observe([-5, -5]) with ε = 0.5 once gave β = −0.067, NaN gave β = NaN, and the error
    appeared only at the next loss call. observe stays sync-free; update refuses."""
    controller = AdaptiveBeta(beta=0.1, epsilon=0.5)
    controller.observe(torch.tensor([1, 0]))
    controller.observe(steps)
    with pytest.raises(
        ValueError, match=r"outside \{-1, 0, \+1\} \(or NaN\) since the last update"
    ):
        controller.update()
    assert controller.beta == 0.1
    controller.observe(torch.tensor([1, 1]))  # the refused observations are gone
    assert controller.update() == pytest.approx(0.1 / 1.5)


def test_pairs_whose_logits_were_not_finite_are_left_out_of_the_update():
    """NaN logits at a scored position made a pair's loss NaN and its step silently 0, which
    the controller counted as "no step"; out.finite_pairs flags it on the device."""
    from epsdpo_kernels import epsilon_dpo_loss
    from tests.helpers.batches import make_batch

    policy, ref, labels = make_batch(3, 6, 50, seed=1)
    scored = (labels[1] != -100).nonzero()[0, 0]
    policy[1, scored, 7] = float("nan")  # pair 1's chosen response
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.1, epsilon=0.5, backend="torch")
    assert out.finite_pairs.tolist() == [True, False, True]
    assert not torch.isfinite(out.losses[1])

    masked, plain = AdaptiveBeta(beta=0.1, epsilon=0.5), AdaptiveBeta(beta=0.1, epsilon=0.5)
    masked.observe(out.steps, out.finite_pairs)
    plain.observe(out.steps[[0, 2]])
    assert masked.update() == plain.update()
    with pytest.raises(TypeError, match="mask must be a bool"):
        masked.observe(out.steps, out.finite_pairs.float())
