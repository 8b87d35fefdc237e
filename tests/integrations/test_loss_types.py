"""Every TRL 1.16 loss type and f-divergence on the fused sums (``preference_losses``).

At ε = 0 the trainer equals TRL's own DPOTrainer on the same model and batch, padded and packed:
the loss, TRL's logged metrics and every parameter gradient. At ε > 0 each pair's β̃ takes β's
place in TRL's formula, checked against the formulas evaluated in float64 on the reference's
sums. A tiny Llama from a config and token-id pairs; no download.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from epsdpo_kernels import epsilon_dpo_loss, preference_losses  # noqa: E402
from epsdpo_kernels.loss_types import LOSS_TYPES, f_divergence_scores  # noqa: E402
from epsdpo_kernels.reference import reference_epsilon_dpo  # noqa: E402
from epsdpo_kernels.trl import DataCollatorForPackedPreference  # noqa: E402
from tests.helpers.parity import fp32_sum_rel_error, sequence_logp_disagreement  # noqa: E402
from tests.helpers.trl import dpo_trainer, make_trainer, token_pairs  # noqa: E402

# One xdist worker runs the whole module: its module-scoped runs are computed once.
pytestmark = pytest.mark.xdist_group("integrations/test_loss_types")

# (loss_type list, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef)
CASES = {
    **{t: ([t], None, 0.0, "reverse_kl", 1.0) for t in LOSS_TYPES if t != "exo_pair"},
    "exo_pair": (["exo_pair"], None, 1e-3, "reverse_kl", 1.0),
    "robust-ls": (["robust"], None, 0.2, "reverse_kl", 1.0),
    "aot-ls": (["aot"], None, 0.1, "reverse_kl", 1.0),
    "sft": (["sft"], None, 0.0, "reverse_kl", 1.0),
    "sigmoid+sppo+sft": (["sigmoid", "sppo_hard", "sft"], [1.0, 0.3, 0.5], 0.0, "reverse_kl", 1.0),
    "sigmoid+sppo": (["sigmoid", "sppo_hard"], [1.0, 0.3], 0.0, "reverse_kl", 1.0),
    "sigmoid-forward_kl": (["sigmoid"], None, 0.0, "forward_kl", 1.0),
    "sigmoid-js": (["sigmoid"], None, 0.0, "js_divergence", 1.0),
    "sigmoid-alpha0.5": (["sigmoid"], None, 0.0, "alpha_divergence", 0.5),
    "ipo-forward_kl": (["ipo"], None, 0.0, "forward_kl", 1.0),
    "discopop-js": (["discopop"], None, 0.0, "js_divergence", 1.0),
}
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "num_tokens",
)


def _set_loss(ours, theirs, case):
    """Point both trainers at one case: the attributes each reads in its loss (building two
    trainers per case would cost more than every comparison together)."""
    loss_types, weights, ls, f_div, alpha = case
    weights = weights or [1.0] * len(loss_types)
    for args in (ours.args, theirs.args):
        args.label_smoothing, args.f_divergence_type = ls, f_div
        args.f_alpha_divergence_coef = alpha
    ours.weighted_loss_types = list(zip(loss_types, weights))
    theirs.loss_types, theirs.loss_weights = loss_types, weights
    theirs.label_smoothing, theirs.f_divergence_type = ls, f_div
    theirs.f_alpha_divergence_coef = alpha


@pytest.fixture(scope="module")
def pair_of_trainers(tmp_path_factory):
    return _pair_of_trainers(tmp_path_factory.mktemp("loss_types"))


def _pair_of_trainers(tmp, **overrides):
    """EpsilonDPOTrainer at ε = 0 and TRL's DPOTrainer on equal, equally perturbed policies,
    and one batch of ragged token pairs (one with an empty prompt), padded and packed."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours = make_trainer(tmp / "eps", train=token_pairs(n=6), epsilon=0.0, **overrides)
    theirs = dpo_trainer(tmp / "dpo", **overrides)
    for trainer in (ours, theirs):
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        trainer.model.train()
    examples = list(ours.train_dataset)
    padded = DataCollatorForPreference(pad_token_id=258)(examples)
    packed = DataCollatorForPackedPreference()(examples)
    return ours, theirs, padded, packed


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    return loss.detach(), grads


def _loss_bound(ours, batch, out, counts, vocab, wpo_rel=None):
    """First-order bound on |ΔL| between two fp32 implementations: Σ_k |∂L/∂x_k|·Δx_k over the
    4B sequence log-probs x (the loss depends on the logits only through them), Δx_k their
    disagreement (``sequence_logp_disagreement``), ∂L/∂x_k from our formula in float64; plus the
    fp32 rounding of evaluating the formula itself, a few ulps of its terms (|L| + 1). With
    WPO's weights w (``wpo_rel``: their relative disagreement per pair) they are B more x_k."""
    b = len(out.losses)
    leaves = [
        getattr(out, k).detach().double().requires_grad_()
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    ]
    chosen, rejected, ref_chosen, ref_rejected = leaves
    weights = {}
    if wpo_rel is not None:
        weights["wpo_weights"] = out.wpo_weights.detach().double().requires_grad_()
    beta = out.beta_used.double()
    ls = ours.args.label_smoothing
    z = beta * ((chosen - rejected) - (ref_chosen - ref_rejected))
    out64 = dataclasses.replace(
        out,
        losses=-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z),
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        beta_used=beta,
        chosen_tokens=out.chosen_tokens.double(),
        rejected_tokens=out.rejected_tokens.double(),
        **weights,
    )
    loss = ours._weighted_loss(out64, batch, *_labels_and_packing(batch))
    grads = torch.autograd.grad(loss, leaves + list(weights.values()), allow_unused=True)
    bound = 0.0
    for x, g, n in zip(leaves, grads, (counts[:b], counts[b:], counts[:b], counts[b:])):
        if g is not None:
            bound += float((g.abs() * sequence_logp_disagreement(x, n, vocab)).sum())
    if weights:
        w, g = weights["wpo_weights"], grads[-1]
        bound += float((g.abs() * w.detach() * wpo_rel).sum())
    return bound + 16 * 2.0**-24 * (abs(float(loss.detach())) + 1)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_epsilon_zero_equals_trl_dpo_trainer(pair_of_trainers, case, layout):
    """Loss, TRL's logged metrics and parameter gradients of each loss type equal TRL's
    DPOTrainer's at ε = 0 (ours packed or padded, TRL's padded: TRL 1.16 cannot pack)."""
    ours, theirs, padded, packed = pair_of_trainers
    _set_loss(ours, theirs, CASES[case])
    batch = padded if layout == "padded" else packed
    ours._metric_sums["train"] = None
    theirs._metrics["train"].clear()

    loss_a, grads_a = _loss_and_grads(ours, batch)
    loss_b, grads_b = _loss_and_grads(theirs, padded)
    ours_metrics = ours._reduced_metrics("train")
    theirs_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}

    with torch.no_grad():
        _, out = ours.compute_loss(ours.model, batch, return_outputs=True)
        logits = ours.model(**{k: padded[k] for k in ("input_ids", "attention_mask")}).logits
    ours._metric_sums["train"] = None
    counts = torch.cat([out.chosen_tokens, out.rejected_tokens])
    vocab = ours.model.config.vocab_size
    atol = _loss_bound(ours, batch, out, counts, vocab)
    assert abs(loss_a.item() - loss_b.item()) <= atol, (loss_a.item(), loss_b.item(), atol)

    # Metrics: the log-prob sums disagree by Δx (above); the rewards are β·(A − R) of them.
    d_policy = sequence_logp_disagreement(
        torch.cat([out.chosen_logps, out.rejected_logps]), counts, vocab
    )
    d_ref = sequence_logp_disagreement(
        torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]), counts, vocab
    )
    b, beta = len(out.losses), ours.args.beta
    d_reward = beta * (d_policy + d_ref)
    scored = padded["completion_mask"][:, 1:].bool()
    # logits/*: a mean of n·V fp32 logits, within γ(n·V) of the mean of their magnitudes.
    mean_abs = logits[:, :-1][scored].abs().mean()
    tolerances = {
        "logps/chosen": d_policy[:b].mean(),
        "logps/rejected": d_policy[b:].mean(),
        "rewards/chosen": d_reward[:b].mean(),
        "rewards/rejected": d_reward[b:].mean(),
        "rewards/margins": (d_reward[:b] + d_reward[b:]).mean(),
        "logits/chosen": 2 * fp32_sum_rel_error(int(scored.sum()) * vocab) * mean_abs,
        "logits/rejected": 2 * fp32_sum_rel_error(int(scored.sum()) * vocab) * mean_abs,
    }
    margins = (out.chosen_rewards - out.rejected_rewards).abs()
    assert (margins > d_reward[:b] + d_reward[b:]).all()  # no accuracy within rounding of a tie
    for name in METRICS:
        got, want = ours_metrics[name], theirs_metrics[name]
        assert abs(got - want) <= float(tolerances.get(name, 0.0)) + 1e-12, (name, got, want)

    for name, grad in grads_a.items():
        scale = float(grads_b[name].abs().max())
        assert scale > 0, name
        # As test_trl's ε = 0 comparison: each element sums tokens and features in another
        # order in the two trainers, an error of the order of the tensor's largest elements.
        torch.testing.assert_close(
            grad, grads_b[name], rtol=1e-4, atol=1e-7 + 4e-6 * scale, msg=name
        )


def _formula(loss_type, e, beta, ls=0.0, lengths=None, tau=0.05):
    """TRL 1.16's formula in float64 on the reference's sums, β a (B,) tensor (TRL's, with its
    scalar β replaced)."""
    c, j = e["chosen_logps"] - e["ref_chosen_logps"], e["rejected_logps"] - e["ref_rejected_logps"]
    d = c - j
    ls_sigmoid = lambda z: -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)  # noqa: E731
    if loss_type == "sigmoid_norm":
        return ls_sigmoid(beta * (c / lengths[0] - j / lengths[1]))
    if loss_type == "ipo":
        return (c / lengths[0] - j / lengths[1] - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * j)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * j)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (j + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * j)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * d)
    if loss_type == "discopop":
        m = torch.sigmoid(beta * d / tau)
        return -F.logsigmoid(beta * d) * (1 - m) + torch.exp(-beta * d) * m
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        z = beta * d
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    raise AssertionError(loss_type)


@pytest.mark.parametrize(
    "loss_type", [t for t in LOSS_TYPES if t not in ("sigmoid", "aot", "aot_unpaired")]
)
def test_each_pair_takes_its_own_beta(loss_type):
    """At ε > 0 every loss is TRL's formula with β̃ = β/(1+ε·s) of its own pair: the values
    and their gradient on the logits against the float64 reference, with steps of both signs."""
    gen = torch.Generator().manual_seed(3)
    b, t, v = 6, 5, 37
    policy = torch.randn(2 * b, t, v, generator=gen, dtype=torch.float64)
    ref = policy + 0.8 * torch.randn(2 * b, t, v, generator=gen, dtype=torch.float64)
    ref[[0, b]] = policy[[0, b]]  # pair 0: the policy is its reference, so its step is 0
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    labels[:, :1] = -100
    labels[3, 3:] = -100
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    kw = dict(beta=0.5, epsilon=0.2)
    leaf = policy.float().requires_grad_()
    out = epsilon_dpo_loss(leaf, ref.float(), labels, backend="torch", **kw)
    got = preference_losses(out, loss_type, label_smoothing=ls)
    got.sum().backward()

    h = policy.clone().requires_grad_()
    e = reference_epsilon_dpo(h, ref, labels, **kw)
    assert set(e["steps"].tolist()) == {-1, 0, 1}  # β̃ takes all three values
    assert torch.equal(out.steps, e["steps"])
    lengths = (e["chosen_tokens"], e["rejected_tokens"])
    want = _formula(loss_type, e, e["beta_used"], ls=ls, lengths=lengths)
    want.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), h.grad, rtol=1e-4, atol=1e-6)


def test_aot_sorts_over_the_batch_with_each_sorted_pairs_beta():
    """aot and aot_unpaired sort the batch's log-ratios (TRL); each sorted position takes the β̃
    of the pair that sorted there (by policy log-ratio, by chosen log-ratio)."""
    gen = torch.Generator().manual_seed(5)
    b, t, v = 6, 4, 23
    policy = torch.randn(2 * b, t, v, generator=gen)
    ref = policy + 0.8 * torch.randn(2 * b, t, v, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    out = epsilon_dpo_loss(policy, ref, labels, beta=0.5, epsilon=0.2, backend="torch")
    assert len(set(out.beta_used.tolist())) > 1
    for loss_type, key, other in (
        ("aot", out.logratios, out.ref_logratios),
        (
            "aot_unpaired",
            out.chosen_logps - out.ref_chosen_logps,
            out.rejected_logps - out.ref_rejected_logps,
        ),
    ):
        got = preference_losses(out, loss_type, label_smoothing=0.1)
        order = torch.argsort(key.detach())
        delta = key.detach()[order] - torch.sort(other.detach())[0]
        z = out.beta_used[order] * delta
        want = -0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)
        torch.testing.assert_close(got.detach(), want)


def test_f_divergence_scores_are_trls_derivatives():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0], dtype=torch.float64)
    t = torch.exp(x)
    torch.testing.assert_close(f_divergence_scores(x, "reverse_kl", 1.0), x)
    torch.testing.assert_close(f_divergence_scores(x, "forward_kl", 1.0), 1 - 1 / t)
    torch.testing.assert_close(
        f_divergence_scores(x, "js_divergence", 1.0), torch.log(2 * t / (t + 1))
    )
    torch.testing.assert_close(
        f_divergence_scores(x, "alpha_divergence", 0.5), (t ** (-0.5) - 1) / (-0.5)
    )
    torch.testing.assert_close(f_divergence_scores(x, "alpha_divergence", 1.0), x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss_type="kto"), ValueError, "loss_type must be one of"),
        (dict(loss_type="sft"), ValueError, "loss_type must be one of"),
        (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
        (
            dict(loss_type="nca_pair", f_divergence_type="forward_kl"),
            ValueError,
            "f_divergence_type='forward_kl' is defined for",
        ),
        (dict(loss_type="exo_pair"), ValueError, "label_smoothing must be > 0"),
        (dict(label_smoothing=0.5), ValueError, "label_smoothing must be"),
        (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
        (dict(f_alpha_divergence_coef="1"), TypeError, "f_alpha_divergence_coef"),
        (dict(chosen_lengths=torch.ones(3), loss_type="ipo"), ValueError, "chosen_lengths"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, match):
    labels = torch.randint(0, 7, (4, 3))
    out = epsilon_dpo_loss(torch.randn(4, 3, 7), torch.randn(4, 3, 7), labels, beta=0.1)
    with pytest.raises(error, match=match):
        preference_losses(out, **kwargs)
    with pytest.raises(TypeError, match="out must be an EpsilonDPOOutput"):
        preference_losses({"losses": out.losses}, "hinge")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ld_alpha_equals_trl_dpo_trainer(pair_of_trainers, layout):
    """LD-DPO (ld_alpha): the tail of the longer response past the shorter one's length counts
    α times, in the policy's and the reference's sums alike; at ε = 0 the loss and gradients
    equal TRL's, padded and packed, and differ from the unweighted loss."""
    ours, theirs, padded, packed = pair_of_trainers
    _set_loss(ours, theirs, CASES["sigmoid"])
    batch = padded if layout == "padded" else packed
    unweighted, _ = _loss_and_grads(ours, batch)
    for trainer in (ours, theirs):
        trainer.args.ld_alpha = 0.3
    theirs.ld_alpha = 0.3
    try:
        loss_a, grads_a = _loss_and_grads(ours, batch)
        loss_b, grads_b = _loss_and_grads(theirs, padded)
        with torch.no_grad():
            _, out = ours.compute_loss(ours.model, batch, return_outputs=True)
    finally:
        for trainer in (ours, theirs):
            trainer.args.ld_alpha = None
        theirs.ld_alpha = None
    ours._metric_sums["train"] = None
    assert abs(loss_a.item() - unweighted.item()) > 1e-3  # the weights bite
    # The weighted sums' fp32 error is bounded as the unweighted ones' (every w·a ≤ 0, so
    # Σ|w·a| = |Σ w·a|): the same first-order bound.
    counts = torch.cat([out.chosen_tokens, out.rejected_tokens])
    atol = _loss_bound(ours, batch, out, counts, ours.model.config.vocab_size)
    assert abs(loss_a.item() - loss_b.item()) <= atol, (loss_a.item(), loss_b.item(), atol)
    for name, grad in grads_a.items():
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(
            grad, grads_b[name], rtol=1e-4, atol=1e-7 + 4e-6 * scale, msg=name
        )


def test_ld_token_weights_down_weight_the_longer_tail():
    from epsdpo_kernels.integrations.trl.trainer import ld_token_weights

    # Pair 0: chosen scores 3 tokens, rejected 1 → chosen's last 2 get α. Pair 1: 2 and 2.
    labels = torch.tensor(
        [[-100, 5, 5, 5], [-100, -100, 5, 5], [-100, -100, -100, 5], [5, 5, -100, -100]]
    )
    w = ld_token_weights(labels, None, None, 0.5)
    assert w.tolist() == [[0, 1, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 0, 0]]
    # The same tokens packed in one row, sequences out of order and interleaved.
    ids = torch.tensor([2, 0, 1, 0, 3, 1, 0, 3, -1])
    flat = torch.tensor([5, 5, 5, 5, 5, 5, 5, 5, -100])
    packed = ld_token_weights(flat.view(1, -1), ids.view(1, -1), 2, 0.5)
    assert packed.flatten().tolist() == [1, 1, 1, 0.5, 1, 1, 0.5, 1, 0]


# Loss types under WPO's weighting (use_weighting): the plain one, a length-normalised one,
# another pair loss, and a weighted list. Not hinge or sft, where TRL 1.16 itself fails: it
# multiplies the per-sequence losses by the weights in place, which autograd refuses after
# hinge's relu ("modified by an inplace operation") and torch refuses on sft's expanded batch
# loss ("more than one element ... refers to a single memory location").
WPO_CASES = ["sigmoid", "ipo", "apo_zero", "sigmoid+sppo"]


@pytest.fixture(scope="module")
def pair_of_wpo_trainers(tmp_path_factory):
    return _pair_of_trainers(tmp_path_factory.mktemp("wpo"), use_weighting=True)


def _wpo_weight_disagreement(logits, labels, vocab):
    """(B,) relative disagreement of two fp32 implementations' WPO weights w = exp(M_c + M_j):
    each row's mean M of a − log Σp² is within 2·(γ(V) + γ(n)) of its terms' mean magnitude
    (each term reduces V entries, the mean n of them, in any order), in float64 from the
    logits."""
    log_p = torch.log_softmax(logits.double(), -1)
    scored = labels != -100
    a = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    magnitude = torch.where(scored, a.abs() + torch.logsumexp(2 * log_p, -1).abs(), 0.0)
    n = scored.sum(-1)
    rows = torch.tensor(
        [2 * (fp32_sum_rel_error(vocab) + fp32_sum_rel_error(int(k))) for k in n],
        dtype=torch.float64,
    )
    per_row = rows * magnitude.sum(-1) / n.clamp(min=1)
    b = len(n) // 2
    return per_row[:b] + per_row[b:]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", WPO_CASES)
def test_wpo_weighting_equals_trl_dpo_trainer(pair_of_wpo_trainers, case, layout):
    """use_weighting=True (WPO) at ε = 0: the loss and every parameter gradient equal TRL's
    DPOTrainer's, whose fused head computes the same log Σp² per token; the weights make a
    difference far above the comparison's bound."""
    ours, theirs, padded, packed = pair_of_wpo_trainers
    _set_loss(ours, theirs, CASES[case])
    batch = padded if layout == "padded" else packed
    loss_a, grads_a = _loss_and_grads(ours, batch)
    loss_b, grads_b = _loss_and_grads(theirs, padded)
    with torch.no_grad():
        _, out = ours.compute_loss(ours.model, batch, return_outputs=True)
        logits = ours.model(**{k: padded[k] for k in ("input_ids", "attention_mask")}).logits
        ours.args.use_weighting = False
        unweighted = ours._weighted_loss(out, batch, *_labels_and_packing(batch))
        ours.args.use_weighting = True
    ours._metric_sums["train"] = None
    theirs._metrics["train"].clear()
    vocab = ours.model.config.vocab_size
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)[:, 1:]
    rel = _wpo_weight_disagreement(logits[:, :-1], labels, vocab)
    counts = torch.cat([out.chosen_tokens, out.rejected_tokens])
    atol = _loss_bound(ours, batch, out, counts, vocab, wpo_rel=rel)
    assert abs(loss_a.item() - loss_b.item()) <= atol, (loss_a.item(), loss_b.item(), atol)
    assert abs(float(unweighted) - loss_b.item()) > 100 * atol, "the weights must matter"
    for name, grad in grads_a.items():
        scale = float(grads_b[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(
            grad, grads_b[name], rtol=1e-4, atol=1e-7 + 4e-6 * scale, msg=name
        )


def _labels_and_packing(batch):
    """The labels and packing arguments ``_weighted_loss`` takes, as ``_compute_loss`` forms
    them."""
    if "sequence_ids" not in batch:
        return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:], {}
    scored = (batch["completion_mask"] != 0) & (batch["position_ids"] != 0)
    labels = batch["input_ids"].masked_fill(~scored, -100)[:, 1:]
    return labels, dict(sequence_ids=batch["sequence_ids"][:, 1:], num_pairs=batch["num_pairs"])


@pytest.mark.parametrize("case", ["hinge", "sigmoid+sppo+sft"])
def test_wpo_weighting_where_trl_fails_weights_each_term_as_trl_means(pair_of_wpo_trainers, case):
    """TRL 1.16 cannot backpropagate these under use_weighting (see WPO_CASES); ours weights
    each pair's term by w_i and the sft term, one number per batch, by the mean weight, as
    TRL's per-sequence expansion of it means."""
    ours, theirs, padded, _ = pair_of_wpo_trainers
    _set_loss(ours, theirs, CASES[case])
    loss, grads = _loss_and_grads(ours, padded)
    assert all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        _, out = ours.compute_loss(ours.model, padded, return_outputs=True)
    ours._metric_sums["train"] = None
    labels, _ = _labels_and_packing(padded)
    w = out.wpo_weights
    expected = 0.0
    for loss_type, weight in ours.weighted_loss_types:
        if loss_type == "sft":
            nll = -out.chosen_logps.sum() / (labels[: len(w)] != -100).sum()
            expected = expected + weight * nll * w.mean()
        else:
            expected = expected + weight * (preference_losses(out, loss_type) * w).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert (w < 1).all() and (w > 0).all()
