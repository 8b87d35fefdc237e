"""Both backends of epsilon_dpo_loss against the float64 reference (reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from epsdpo_kernels import epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo
from tests.helpers.batches import make_batch
from tests.helpers.checks import compare_to_reference
from tests.helpers.compare import VALUE_TOL, assert_close

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", [*BACKENDS[:1], pytest.param("triton", marks=pytest.mark.slow)])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    v=st.sampled_from([1, 2, 7, 64, 65, 507, 1000, 2053]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    epsilon=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9]),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.3]),
    average_log_prob=st.booleans(),
    beta=st.sampled_from([0.01, 0.1, 1.0]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    backend,
    device,
    b,
    t,
    v,
    dtype,
    scale,
    epsilon,
    label_smoothing,
    average_log_prob,
    beta,
    strided,
    seed,
):
    policy, ref, labels = make_batch(b, t, v, dtype=dtype, device=device, scale=scale, seed=seed)
    compare_to_reference(
        policy,
        ref,
        labels,
        backend=backend,
        strided=strided,
        beta=beta,
        epsilon=epsilon,
        label_smoothing=label_smoothing,
        average_log_prob=average_log_prob,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "case",
    [
        dict(id="B2-T13-V507", b=2, t=13, v=507),
        dict(id="V-above-both-blocks", b=1, t=3, v=8195),
        dict(id="all-ignored-rows", b=3, t=6, v=300, empty_rows=(0, 4)),
        dict(id="mostly-prompt", b=2, t=16, v=129, prompt_frac=0.9),
        dict(id="average-log-prob", b=2, t=9, v=257, average_log_prob=True),
        dict(id="label-smoothing", b=2, t=9, v=257, label_smoothing=0.25),
        dict(id="logits-1e4", b=2, t=5, v=333, scale=1e4),
        dict(id="custom-ignore-index", b=2, t=7, v=100, ignore_index=0),
    ],
    ids=lambda c: c["id"],
)
def test_named_cases(backend, device, dtype, case):
    case = dict(case)
    case.pop("id")
    loss_kw = {k: case.pop(k) for k in ("average_log_prob", "label_smoothing") if k in case}
    ignore_index = case.get("ignore_index", -100)
    policy, ref, labels = make_batch(dtype=dtype, device=device, **case)
    compare_to_reference(
        policy,
        ref,
        labels,
        backend=backend,
        beta=0.1,
        epsilon=0.1,
        ignore_index=ignore_index,
        **loss_kw,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_epsilon_zero_is_plain_dpo(backend, device):
    policy, ref, labels = make_batch(3, 8, 300, device=device, seed=3)
    beta = 0.2
    out = epsilon_dpo_loss(policy, ref, labels, beta=beta, epsilon=0.0, backend=backend)
    assert (out.steps == 0).all()
    # TRL's sigmoid DPO loss, written from the reference's per-sequence log-probs.
    exp = reference_epsilon_dpo(policy, ref, labels, beta=beta, epsilon=0.0)
    logits = (exp["chosen_logps"] - exp["rejected_logps"]) - (
        exp["ref_chosen_logps"] - exp["ref_rejected_logps"]
    )
    dpo = -torch.nn.functional.logsigmoid(beta * logits)
    assert_close(out.losses, dpo, name="losses", **VALUE_TOL)
    assert_close(out.beta_used, torch.full((3,), beta), name="beta_used", **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_pair(backend, device):
    """One pair, V = 2, worked by hand.

    chosen: h = [0, 0], g = [0, 0], label 0: a = r = u = d = log(1/2).
    rejected: h = [log 3, 0], g = [0, 0], label 1: a = log(1/4), r = log(1/2),
      u = −log(1 + 3^(1+ε)), d = −log(1 + 3^(1−ε)).
    With ε = 0.5: ℓ = log 2 = 0.6931, ℓ⁺ = log((1 + 3^1.5)/2) = 1.1308, ℓ⁻ = log((1 + 3^0.5)/2)
    = 0.3119, so ℓ⁺ > ℓ > ℓ⁻: s = +1, β̃ = 0.3/1.5 = 0.2. ℓ_ref = 0, z = log 2,
    L = −log σ(0.2·log 2) = log(1 + 2^-0.2). ∂L/∂h_chosen = c·(onehot(0) − [1/2, 1/2]) with
    c = −β̃·σ(−β̃z) = −0.2 / (1 + 2^0.2).
    """
    log3 = math.log(3.0)
    policy = torch.tensor([[[0.0, 0.0]], [[log3, 0.0]]], device=device, requires_grad=True)
    ref = torch.zeros(2, 1, 2, device=device)
    labels = torch.tensor([[0], [1]], device=device)
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.3, epsilon=0.5, backend=backend)
    out.loss.backward()

    assert out.steps.tolist() == [1]
    assert out.beta_used.item() == pytest.approx(0.2, rel=1e-6)
    assert out.logratios.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.p_epsilon_logratios.item() == pytest.approx(math.log((1 + 3**1.5) / 2), rel=1e-6)
    assert out.n_epsilon_logratios.item() == pytest.approx(math.log((1 + 3**0.5) / 2), rel=1e-6)
    assert out.loss.item() == pytest.approx(math.log(1 + 2**-0.2), rel=1e-6)
    c = -0.2 / (1 + 2**0.2)
    expected_grad = torch.tensor([[[c / 2, -c / 2]], [[-c * 0.25, c * 0.25]]])
    # rejected row: −c·(onehot(1) − [3/4, 1/4]) = −c·[−3/4, 3/4]
    expected_grad[1, 0] = torch.tensor([0.75 * c, -0.75 * c])
    assert_close(policy.grad, expected_grad, rtol=1e-5, atol=1e-7, name="grad")
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(0.2 * math.log(0.5), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_ignored_gives_log2_and_zero_grad(backend, device):
    policy, ref, labels = make_batch(2, 4, 50, device=device)
    labels[:] = -100
    policy.requires_grad_()
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.1, label_smoothing=0.2, backend=backend)
    out.loss.backward()
    assert_close(out.losses, torch.full((2,), math.log(2)), name="losses", **VALUE_TOL)
    assert (policy.grad == 0).all()
    assert (out.steps == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_reuses_logits_storage(backend, device):
    policy, ref, labels = make_batch(2, 6, 300, device=device, seed=5)
    out, _ = compare_to_reference(
        policy, ref, labels, backend=backend, inplace=True, beta=0.1, epsilon=0.1
    )
    leaf = policy.clone().requires_grad_()
    logits = leaf * 1
    arriving = []  # the storage of the gradient the loss hands back for the logits
    logits.register_hook(lambda grad: arriving.append(grad.data_ptr()))
    epsilon_dpo_loss(
        logits, ref, labels, beta=0.1, backend=backend, inplace_backward=True
    ).loss.backward()
    assert arriving == [logits.data_ptr()], "the gradient is not the logits' own storage"
    assert torch.equal(logits.detach(), leaf.grad), "gradient was not written into the logits"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reader", ["another-consumer", "second-backward"])
def test_inplace_backward_is_visible_to_autograd(backend, device, reader):
    """With inplace_backward the logits' storage holds their gradient after the backward: what
    still reads the logits must fail as after an in-place torch op, on both backends (the
    Triton kernel's write once left the version counter alone, and a retained graph or a
    second consumer silently read the gradient as logits)."""
    policy, ref, labels = make_batch(2, 6, 300, device=device, seed=5)
    leaf = policy.clone().requires_grad_()
    logits = leaf * 1
    # A consumer made before the loss: autograd runs its backward after the loss's, when the
    # storage it saved (pow saves its input) holds the gradient.
    other = logits.pow(2).sum() * 1e-3
    out = epsilon_dpo_loss(logits, ref, labels, beta=0.1, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        if reader == "another-consumer":
            (out.loss + other).backward()
        else:
            out.loss.backward(retain_graph=True)
            out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_frozen_policy(backend, device):
    policy, ref, labels = make_batch(2, 6, 100, device=device, seed=7)
    policy.requires_grad_()
    with torch.no_grad():
        out = epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend=backend)
    assert out.loss.grad_fn is None and not out.loss.requires_grad
    train = epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend=backend)
    assert train.loss.requires_grad
    assert torch.equal(out.losses, train.losses.detach())
    frozen = epsilon_dpo_loss(policy.detach(), ref, labels, beta=0.1, backend=backend)
    assert not frozen.loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_requiring_grad_gets_none(backend, device):
    policy, ref, labels = make_batch(2, 5, 70, device=device, seed=11)
    policy.requires_grad_()
    ref.requires_grad_()
    epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend=backend).loss.backward()
    assert ref.grad is None and policy.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_slice_in_place(backend, device):
    """logits[:, :-1] (the usual shift) is strided over T; no copy is needed, results match,
    also when the gradient is written over them (the hypothesis test covers a new gradient)."""
    policy, ref, labels = make_batch(2, 8, 200, device=device, seed=13)
    compare_to_reference(
        policy, ref, labels, backend=backend, strided=True, inplace=True, beta=0.1, epsilon=0.2
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_strided_logits_every_token_scored(backend, device, inplace):
    policy, ref, labels = make_batch(
        2, 6, 150, device=device, seed=23, prompt_frac=0.0, ragged=False
    )
    compare_to_reference(
        policy, ref, labels, backend=backend, inplace=inplace, strided=True, beta=0.1, epsilon=0.2
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_reproducible(backend, device):
    policy, ref, labels = make_batch(3, 7, 600, device=device, seed=17)
    runs = []
    for _ in range(2):
        leaf = policy.clone().requires_grad_()
        out = epsilon_dpo_loss(leaf, ref, labels, beta=0.1, epsilon=0.05, backend=backend)
        out.loss.backward()
        runs.append((out.losses, out.steps, leaf.grad))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_metrics_names_and_values(device):
    policy, ref, labels = make_batch(4, 6, 90, device=device, seed=19)
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.1, epsilon=0.3)
    metrics = out.metrics(prefix="eval/")
    expected_names = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "kl/p_epsilon_steps",
        "kl/n_epsilon_steps",
        "kl/avg_steps",
        "kl/beta",
        "displacement/chosen_below_ref",
        "displacement/chosen_logratio",
    }
    assert set(metrics) == {"eval/" + n for n in expected_names}
    steps = out.steps.float()
    assert metrics["eval/kl/p_epsilon_steps"].item() == pytest.approx(
        (steps == 1).float().mean().item()
    )
    assert metrics["eval/kl/avg_steps"].item() == pytest.approx(steps.mean().item())
    acc = (out.chosen_rewards > out.rejected_rewards).float().mean()
    assert metrics["eval/rewards/accuracies"].item() == pytest.approx(acc.item())
    assert metrics["eval/kl/beta"].item() == pytest.approx(0.1)
    assert metrics["eval/loss"].item() == pytest.approx(out.loss.item())
    assert all(v.shape == (4,) for v in out.pair_metrics().values())


def test_auto_backend_is_triton_on_cuda_and_torch_elsewhere():
    """The resolution itself (devices as objects: no GPU needed): 'auto' picks Triton for CUDA
    tensors when Triton imports, torch for anything else; an explicit choice is kept."""
    from epsdpo_kernels.params import resolve_backend, triton_available

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    expected = "triton" if triton_available() else "torch"
    assert resolve_backend("auto", torch.device("cuda", 1)) == expected
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"
