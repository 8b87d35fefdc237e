"""One launched rank of tests/distributed/test_engines.py: TRL's DPOTrainer and
EpsilonDPOTrainer, one after the other, under the engine the launcher set up (DDP, DeepSpeed,
FSDP1/FSDP2 through accelerate).

``python -m tests.helpers.engine_run OUT MODEL ENGINE``, started on every rank by torchrun or
``accelerate launch``. In order, each from the model saved at MODEL (with ENGINE ``*-peft``, a
LoRA adapter on it and no reference model), on 16 embedded pairs, 2 pairs per rank and step,
fp32, SGD:

- ``dpo``: TRL's ``DPOTrainer``, 4 steps;
- ``eps0``: ``EpsilonDPOTrainer`` at ε = 0, 4 steps;
- ``eps``: ``EpsilonDPOTrainer`` at ε > 0, 4 steps, with checkpoints at steps 2 and 4;
- ``resumed``: the same, resumed from ``eps``'s step-2 checkpoint;
- under DDP, ``eps-no-momentum``: ``eps`` with SGD without momentum (``momentum``);

each then evaluated on 8 more pairs (4 per rank).

Rank 0 alone writes OUT/results.json (the ranks never share a stdout): each run's logged steps,
its evaluation's metrics, its final β, the engine's wrapper, and what the engine did to the
lm_head (how it was sharded, and at each fused loss call how much of the models' sharded
parameters was held whole).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if os.environ.get("EPSDPO_TEST_FSDP_ON_CPU") == "1":
    import tests.helpers.fsdp_on_cpu  # noqa: F401

import torch
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

import epsdpo_kernels.integrations.trl.trainer as epsdpo_trl
from epsdpo_kernels.trl import EpsilonDPOConfig, EpsilonDPOTrainer
from tests.helpers.trl import pairs
from train.launch import exit_process
from train.tokenizer import byte_tokenizer

EPSILON = 0.05
STEPS = 4


def options(out: Path, engine: str, momentum: bool) -> dict:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        # SGD: the parameters move linearly in the gradients, so the engines' different
        # reduction orders move the logged values by rounding only (Adam's first steps are ±lr
        # whatever a gradient's size, which turns a rounding-size gradient into a step).
        optim="sgd",
        optim_args="momentum=0.9" if momentum else None,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        data_seed=0,
        beta=0.1,
        dataloader_num_workers=0,
        bf16=False,
        # DDP is torchrun with the CPU; DeepSpeed and FSDP come from accelerate's config, on
        # gloo (without ddp_backend accelerate records a single process, and DeepSpeed's batch
        # size check fails).
        use_cpu=engine == "ddp" or engine.startswith("fsdp"),
        ddp_backend="gloo",
    )


def momentum(engine: str) -> bool:
    """SGD with momentum, but for FSDP1: torch's FSDP2 full-state-dict resume fails on an
    optimizer without a state ("Expected device to be set"), and FSDP1's sharded optimizer
    state comes back without its momentum on CPU (TRL's own DPOTrainer resumes as wrongly)."""
    return not engine.startswith("fsdp1")


def models(model_dir: str, engine: str):
    """The policy and the reference (None with PEFT: the policy with its adapter disabled), and
    the PEFT config for the trainer, or None. From ``from_pretrained``, so that
    ``zero3_init_flag`` partitions them as they load, as for users."""

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    if engine.endswith("-peft"):
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0)
        return load(), None, lora
    return load(), load(), None


def sharded_numel(model) -> int:
    """Elements of ``model``'s parameters held whole now that ZeRO-3 partitions (0 for others,
    and for ZeRO-3's persistent small parameters, which are never partitioned)."""
    from epsdpo_kernels.engines import _is_zero3_partitioned

    return sum(
        p.ds_numel
        for p in model.parameters()
        if hasattr(p, "ds_status") and not p.ds_persist and not _is_zero3_partitioned(p)
    )


def watch_loss(policy, reference, seen: list) -> None:
    """From now on, record at every fused loss call how many elements of the policy's and the
    reference's ZeRO-3-partitioned parameters are gathered (their lm_heads alone, if the
    engine's gathering is where it belongs)."""
    loss = _UNWATCHED_LOSS

    def watched(*args, **kwargs):
        seen.append([sharded_numel(policy), sharded_numel(reference)])
        return loss(*args, **kwargs)

    epsdpo_trl.linear_epsilon_dpo_loss = watched


_UNWATCHED_LOSS = epsdpo_trl.linear_epsilon_dpo_loss


def head_sharding(trainer) -> str:
    weight = trainer.accelerator.unwrap_model(trainer.model_wrapped).lm_head.weight
    if hasattr(weight, "ds_numel"):
        return f"zero3 {tuple(weight.ds_tensor.shape)} of {tuple(weight.ds_shape)}"
    if hasattr(weight, "full_tensor"):
        return f"dtensor {weight.placements}"
    return f"plain {tuple(weight.shape)}"


def main(out: Path, model_dir: str, engine: str) -> None:
    train = pairs(16)
    runs = {}

    def run(name, trainer, resume=None):
        seen = []
        watch_loss(trainer.model, trainer.ref_model or trainer.model, seen)
        trainer.train(resume_from_checkpoint=resume)
        runs[name] = dict(
            logs=[e for e in trainer.state.log_history if "loss" in e],
            beta=getattr(getattr(trainer, "adaptive_beta", None), "beta", None),
            distributed_type=str(trainer.accelerator.distributed_type),
            wrapped=type(trainer.model_wrapped).__name__,
            # As training left it (an evaluation's forward leaves FSDP2's root unsharded).
            lm_head=head_sharding(trainer),
            gathered=seen,
        )
        runs[name]["evaluation"] = trainer.evaluate()

    with_momentum = momentum(engine)
    policy, reference, peft = models(model_dir, engine)
    args = DPOConfig(**options(out / "dpo", engine, with_momentum))
    run("dpo", DPOTrainer(policy, reference, args=args, peft_config=peft, **_data(train)))
    plan = [
        ("eps0", 0.0, with_momentum, {}, None),
        ("eps", EPSILON, with_momentum, dict(save_strategy="steps", save_steps=2), None),
        ("resumed", EPSILON, with_momentum, {}, str(out / "eps" / "checkpoint-2")),
    ]
    if engine == "ddp":  # the reference of the engines that train without momentum
        plan.append(("eps-no-momentum", EPSILON, False, {}, None))
    for name, epsilon, with_momentum, extra, resume in plan:
        args = {**options(out / name, engine, with_momentum), **extra, "epsilon": epsilon}
        policy, reference, peft = models(model_dir, engine)
        config = EpsilonDPOConfig(**args)
        run(
            name,
            EpsilonDPOTrainer(policy, reference, config, peft_config=peft, **_data(train)),
            resume,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(runs))


def _data(train) -> dict:
    return dict(
        train_dataset=train, eval_dataset=pairs(8, offset=16), processing_class=byte_tokenizer()
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
    import torch.distributed as dist

    # As train/run_trl.py ends: the ranks meet, tear the group down, and skip the interpreter's
    # teardown (where gloo's threads can abort a finished rank).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(0)
