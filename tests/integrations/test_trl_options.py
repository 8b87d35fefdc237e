"""TRL options around the loss: TR-DPO's moving reference (``sync_ref_model``) and precomputed
reference log-probs (``precompute_ref_log_probs``, at ε = 0), each against TRL's own DPOTrainer
over a few optimizer steps. A tiny Llama from a config; no download."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from tests.helpers.parity import loss_disagreement  # noqa: E402
from tests.helpers.trl import config, dpo_trainer, make_trainer, pairs, tiny_models  # noqa: E402
from train.tokenizer import byte_tokenizer  # noqa: E402


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.mark.parametrize("setup", ["gradient-accumulation", "peft", "ipo+accumulation"])
def test_training_runs_log_what_trl_logs(tmp_path, setup):
    """Three optimizer steps at ε = 0 beside TRL's DPOTrainer: with 2 accumulated micro-batches
    per step, with a LoRA adapter (the reference is the policy with it disabled), and IPO with
    accumulation. Every step's loss, rewards, log-probs and gradient norm agree; the tolerance
    is the fp32 rounding of two implementations carried through the steps' updates."""
    from epsdpo_kernels.trl import EpsilonDPOTrainer

    options = dict(max_steps=3)
    if "accumulation" in setup:
        options.update(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    if setup.startswith("ipo"):
        options.update(loss_type="ipo")
    peft_config = _lora() if setup == "peft" else None
    policy, reference = tiny_models()
    ours = EpsilonDPOTrainer(
        policy,
        ref_model=None if peft_config else reference,
        args=config(tmp_path / "eps", epsilon=0.0, **options),
        train_dataset=pairs(8),
        processing_class=byte_tokenizer(),
        peft_config=peft_config,
    )
    theirs = dpo_trainer(tmp_path / "dpo", peft_config=peft_config, **options)
    ours.train()
    theirs.train()
    logs = [_step_logs(t) for t in (ours, theirs)]
    assert len(logs[0]) == len(logs[1]) == 3
    assert logs[0][-1]["rewards/margins"] != 0.0
    for a, b in zip(*logs):
        for name in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
        assert a["num_tokens"] == b["num_tokens"]


def _step_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def test_sync_ref_model_trains_as_trl_tr_dpo(tmp_path):
    """TR-DPO (sync_ref_model): TRL's callback mixes the policy into the reference every
    ``ref_model_sync_steps``; the trainer reads the moved reference at the next step. At ε = 0
    three steps log what TRL's DPOTrainer logs; at ε > 0 β adapts against the moving reference."""
    sync = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    ours = make_trainer(tmp_path / "eps", epsilon=0.0, max_steps=3, **sync)
    initial = {n: p.detach().clone() for n, p in ours.ref_model.named_parameters()}
    theirs = dpo_trainer(tmp_path / "dpo", max_steps=3, **sync)
    ours.train()
    theirs.train()
    moved = [n for n, p in ours.ref_model.named_parameters() if not torch.equal(p, initial[n])]
    assert moved, "the reference never moved"
    logs = [_step_logs(t) for t in (ours, theirs)]
    assert len(logs[0]) == len(logs[1]) == 3
    # Step 1's reference is the initial model, so its rewards are 0 in both; steps 2 and 3 see
    # the mixed-in reference. fp32 rounding of two implementations, carried through 3 steps.
    assert logs[0][1]["rewards/margins"] != 0.0
    for a, b in zip(*logs):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_precomputed_reference_at_epsilon_zero_trains_as_trl(tmp_path, padding_free):
    """precompute_ref_log_probs at ε = 0: TRL computes the reference's sums over the dataset
    before training (and keeps no reference model); the fused loss takes them as the reference,
    so three steps log what TRL's DPOTrainer with the same option logs."""
    pre = dict(precompute_ref_log_probs=True, max_steps=3)
    ours = make_trainer(tmp_path / "eps", epsilon=0.0, padding_free=padding_free, **pre)
    assert ours.ref_model is not None  # an explicit ref_model is what TRL precomputes from
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(ours.train_dataset.column_names)
    theirs = dpo_trainer(tmp_path / "dpo", **pre)
    ours.train()
    theirs.train()
    logs = [_step_logs(t) for t in (ours, theirs)]
    assert len(logs[0]) == len(logs[1]) == 3
    assert logs[0][1]["rewards/margins"] != 0.0
    for a, b in zip(*logs):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name


def test_precomputed_reference_without_a_reference_model(tmp_path):
    """No ref_model, full fine-tune: TRL precomputes from the initial policy and keeps no copy;
    the first batch's loss is log 2 (the policy is its own reference) and training runs."""
    from epsdpo_kernels.trl import EpsilonDPOTrainer

    policy, _ = tiny_models()
    trainer = EpsilonDPOTrainer(
        policy,
        args=config(tmp_path, epsilon=0.0, precompute_ref_log_probs=True, max_steps=2),
        train_dataset=pairs(8),
        processing_class=byte_tokenizer(),
    )
    assert trainer.ref_model is None
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)
    trainer.train()
    assert len(_step_logs(trainer)) == 2


def test_precomputed_reference_is_refused_at_positive_epsilon(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True with epsilon > 0"):
        config(tmp_path, epsilon=0.01, precompute_ref_log_probs=True)


def _tiny_mixtral(coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.helpers.models import BYTE_TOKENS, TINY_DECODER

    cfg = MixtralConfig(
        vocab_size=260,
        num_hidden_layers=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=coef,
        max_position_embeddings=512,
        **{**TINY_DECODER, "intermediate_size": 32},
        **BYTE_TOKENS,
    )
    torch.manual_seed(0)
    policy = MixtralForCausalLM(cfg)
    reference = MixtralForCausalLM(cfg)
    reference.load_state_dict(policy.state_dict())
    return policy, reference


def test_moe_router_aux_loss_is_added_as_trl_adds_it(tmp_path):
    """An MoE policy (TRL's default: the config's router_aux_loss_coef): the load-balancing loss
    of the policy's own forward is added times the coefficient and logged as ``aux_loss``. At
    ε = 0 one batch's loss, aux_loss and every gradient (the routers' too) equal TRL's."""
    from trl import DPOConfig, DPOTrainer

    from epsdpo_kernels.trl import EpsilonDPOTrainer

    results = []
    for cls, args_cls in ((EpsilonDPOTrainer, None), (DPOTrainer, DPOConfig)):
        args = config(tmp_path / cls.__name__, epsilon=0.0)
        if args_cls is not None:
            fields = {k for k in args.to_dict() if k in DPOConfig.__dataclass_fields__}
            args = DPOConfig(**{k: getattr(args, k) for k in fields})
        policy, reference = _tiny_mixtral(coef=0.5)
        trainer = cls(
            policy,
            ref_model=reference,
            args=args,
            train_dataset=pairs(8),
            processing_class=byte_tokenizer(),
        )
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
        if not results:
            batch = next(iter(trainer.get_train_dataloader()))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        if cls is EpsilonDPOTrainer:
            aux = trainer._reduced_metrics("train")["aux_loss"]
            with torch.no_grad():
                _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            trainer._metric_sums["train"] = None
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
            atol = loss_disagreement(out, (labels != -100).sum(-1), vocab=260)
        else:
            aux = trainer._metrics["train"]["aux_loss"][-1]
        results.append((loss.item(), aux, grads))
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = results
    # The same router logits through the same function: equal up to the backbones' rounding.
    assert aux_a == pytest.approx(aux_b, rel=1e-6) and aux_a > 0
    # The DPO term's fp32 disagreement (tests/helpers/parity.py), plus a few ulps for the sum.
    assert abs(loss_a - loss_b) <= atol + 4 * 2.0**-24 * abs(loss_b), (loss_a, loss_b, atol)
    router = [n for n in grads_a if "gate" in n and "proj" not in n]
    assert router and all(grads_a[n].abs().max() > 0 for n in router)
    for name, grad in grads_a.items():
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(
            grad, grads_b[name], rtol=1e-4, atol=1e-7 + 4e-6 * scale, msg=name
        )


def test_compute_metrics_receives_the_policys_logits_as_trl_passes_them(tmp_path):
    """compute_metrics gets the policy's logits and input_ids (TRL's EvalPrediction); at ε = 0
    a metric of them evaluates to what it does under TRL's DPOTrainer."""
    import numpy as np

    from epsdpo_kernels.trl import EpsilonDPOTrainer

    seen = {}

    def mean_top1_agreement(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen.setdefault("shapes", []).append((logits.shape, labels.shape))
        top1 = logits[:, :-1].argmax(-1)
        return {"top1": float(np.mean(top1 == labels[:, 1:]))}

    values = []
    for ours in (True, False):
        kind = "eps" if ours else "dpo"
        if ours:
            policy, reference = tiny_models()
            trainer = EpsilonDPOTrainer(
                policy,
                ref_model=reference,
                args=config(tmp_path / kind, epsilon=0.0, per_device_eval_batch_size=2),
                train_dataset=pairs(4),
                eval_dataset=pairs(4, offset=8),
                processing_class=byte_tokenizer(),
                compute_metrics=mean_top1_agreement,
            )
        else:
            trainer = dpo_trainer(tmp_path / kind, per_device_eval_batch_size=2)
            trainer.compute_metrics = mean_top1_agreement
            trainer.eval_dataset = trainer._prepare_dataset(
                pairs(4, offset=8), trainer.processing_class, trainer.args, "eval"
            )
        values.append(trainer.evaluate()["eval_top1"])
    assert values[0] == values[1] and 0 < values[0] < 1
    (logits_shape, labels_shape) = seen["shapes"][0]
    assert logits_shape[-1] == 260 and logits_shape[:2] == labels_shape
