"""EpsilonDPOTrainer under every engine TRL users scale with, on 2 CPU ranks (gloo).

Each engine is launched once (tests/helpers/engines.py: torchrun for DDP, ``accelerate launch``
with TRL's configs for DeepSpeed ZeRO-2/ZeRO-3 and FSDP1/FSDP2) and trains, in one process per
rank, TRL's DPOTrainer, EpsilonDPOTrainer at ε = 0, at ε > 0 with checkpoints, and at ε > 0
resumed from the step-2 checkpoint (tests/helpers/engine_run.py). The tests then hold:

- ε = 0 logs every metric DPOTrainer logs (but the two it cannot compute), equal, in training
  and in the evaluation after it;
- ε > 0 logs what DDP logs, at every step and in the evaluation, and ends with DDP's β;
- the resumed run logs what the uninterrupted run logs from step 3 on, bit for bit;
- the engine is the one asked for (accelerate falls back to DDP silently), and under ZeRO-3
  the loss finds the lm_heads gathered and nothing else of the models it need not have.

The values are compared to a bound from fp32 rounding: each is a function of fp32 sums over
the batch's tokens, and two evaluations in another order (another kernel at ε = 0; another
reduction of the gradients under another engine, which SGD carries into the parameters
linearly) differ by a few units of 1e-7 of the magnitude of what was summed. That magnitude is
~500 for the sequence log-probs (nats over ~10² scored tokens) and for the gradient norm (the
same tokens' terms, each of norm below 1), ~β·1000 for the rewards and the loss derived from
two log-probs each, ~1 for the mean logits. 1e-6 of it allows for four steps.
"""

from __future__ import annotations

import pytest

from tests.helpers.engines import ENGINES, HEAD_COLUMNS, HEAD_ROWS, launch, save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_process")]

ENGINE_NAMES = list(ENGINES)
# Against DDP at ε > 0: the engines that train the same models (not the PEFT one).
SHARDED = [name for name in ENGINE_NAMES if name != "ddp" and not name.endswith("-peft")]

# Counts and fractions of pairs: equal exactly.
EXACT = {
    "num_tokens",
    "rewards/accuracies",
    "kl/p_epsilon_steps",
    "kl/n_epsilon_steps",
    "kl/avg_steps",
    "kl/beta",
    "displacement/chosen_below_ref",
    "learning_rate",
    "epoch",
    "step",
}
BETA = 0.1
# What each value is summed from (see the module's docstring).
SUMMED_MAGNITUDE = {
    "logps/chosen": 500.0,
    "logps/rejected": 500.0,
    "displacement/chosen_logratio": 1000.0,
    "rewards/chosen": BETA * 1000,
    "rewards/rejected": BETA * 1000,
    "rewards/margins": BETA * 1000,
    "loss": BETA * 1000,
    "grad_norm": 500.0,
    "logits/chosen": 1.0,
    "logits/rejected": 1.0,
}
# TRL's per-token metrics the fused loss does not compute (docs/TRL.md).
NOT_LOGGED = {"entropy", "mean_token_accuracy"}
# Wall-clock values of an evaluation.
TIMINGS = {"runtime", "samples_per_second", "steps_per_second"}


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("engines") / "model")
    cache = {}

    def results(engine: str) -> dict:
        if (ENGINES[engine] or {}).get("distributed_type") == "DEEPSPEED":
            # The test extra installs it; a GPU image without network may lack it.
            pytest.importorskip("deepspeed")
        if engine not in cache:
            cache[engine] = launch(engine, model, tmp_path_factory.mktemp(engine) / "out")
        return cache[engine]

    return results


def assert_equal_values(want: dict, have: dict, keys, at: str) -> None:
    for key in keys:
        name = key.removeprefix("eval_")
        if name in EXACT:
            assert have[key] == want[key], f"{at}, {key}"
        else:
            bound = 1e-6 * SUMMED_MAGNITUDE[name]
            assert have[key] == pytest.approx(want[key], rel=0, abs=bound), f"{at}, {key}"


def assert_logs_equal(expected: list[dict], got: list[dict], keys, where: str) -> None:
    assert [e["step"] for e in got] == [e["step"] for e in expected], where
    for want, have in zip(expected, got):
        assert_equal_values(want, have, keys, f"{where}, step {want['step']}")


def evaluation_keys(evaluation: dict) -> list[str]:
    """An evaluation's metrics, but the wall-clock ones and those the fused loss lacks."""
    return sorted(
        key
        for key in evaluation
        if key.removeprefix("eval_") not in NOT_LOGGED | TIMINGS and key != "epoch"
    )


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_engine_is_the_one_asked_for(engine_results, engine):
    results = engine_results(engine)
    expected = {
        "ddp": ("MULTI_CPU", "DistributedDataParallel"),
        "zero2": ("DEEPSPEED", "DeepSpeedEngine"),
        "zero3": ("DEEPSPEED", "DeepSpeedEngine"),
        "zero3-peft": ("DEEPSPEED", "DeepSpeedEngine"),
        "zero3-offload": ("DEEPSPEED", "DeepSpeedEngine"),
        "fsdp1": ("FSDP", "FullyShardedDataParallel"),
        "fsdp1-flat": ("FSDP", "FullyShardedDataParallel"),
        "fsdp2": ("FSDP", "FSDPLlamaForCausalLM"),
    }[engine]
    for name, run in results.items():
        assert run["distributed_type"] == f"DistributedType.{expected[0]}", name
        assert run["wrapped"] == expected[1], name
        if engine.startswith("zero3"):  # a partition of half the head on each rank
            head = (HEAD_ROWS, HEAD_COLUMNS)
            assert run["lm_head"] == f"zero3 ({HEAD_ROWS * HEAD_COLUMNS // 2},) of {head}", name
        if engine == "fsdp2":
            assert run["lm_head"] == "dtensor (Shard(dim=0),)", name


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_at_epsilon_zero_every_metric_equals_dpo_trainers(engine_results, engine):
    results = engine_results(engine)
    dpo, ours = results["dpo"]["logs"], results["eps0"]["logs"]
    assert len(dpo) == 4
    trl_keys = set(dpo[0]) - NOT_LOGGED
    assert trl_keys <= set(ours[0]), trl_keys - set(ours[0])
    assert_logs_equal(dpo, ours, sorted(trl_keys), f"{engine}: DPOTrainer against ε = 0")
    trl_evaluation = results["dpo"]["evaluation"]
    keys = evaluation_keys(trl_evaluation)
    assert "eval_rewards/margins" in keys and set(keys) <= set(results["eps0"]["evaluation"])
    assert_equal_values(
        trl_evaluation, results["eps0"]["evaluation"], keys, f"{engine}: evaluation at ε = 0"
    )


@pytest.mark.parametrize("engine", SHARDED)
def test_above_epsilon_zero_every_metric_equals_ddps(engine_results, engine):
    """FSDP1 trains without momentum (tests/helpers/engine_run.momentum), against DDP's run
    without momentum."""
    ddp = engine_results("ddp")
    expected = ddp["eps-no-momentum" if engine.startswith("fsdp1") else "eps"]
    got = engine_results(engine)["eps"]
    assert any(e["kl/avg_steps"] != 0 for e in expected["logs"]), "β must move"
    keys = sorted(set(expected["logs"][0]) - {"train_runtime"})
    assert_logs_equal(expected["logs"], got["logs"], keys, f"{engine} against DDP at ε > 0")
    assert got["beta"] == expected["beta"] != BETA
    keys = evaluation_keys(expected["evaluation"])
    assert_equal_values(
        expected["evaluation"], got["evaluation"], keys, f"{engine}: evaluation at ε > 0"
    )


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_resumed_run_logs_what_the_uninterrupted_run_logs(engine_results, engine):
    results = engine_results(engine)
    straight, resumed = results["eps"], results["resumed"]
    # The resumed history starts with the checkpoint's own steps 1-2; steps 3-4 are new.
    assert [e["step"] for e in resumed["logs"]] == [1, 2, 3, 4]
    assert resumed["logs"] == straight["logs"]
    assert resumed["beta"] == straight["beta"]
    keys = evaluation_keys(straight["evaluation"])
    assert {k: resumed["evaluation"][k] for k in keys} == {
        k: straight["evaluation"][k] for k in keys
    }


@pytest.mark.parametrize("engine", ["zero3", "zero3-offload"])
def test_zero3_loss_gathers_the_lm_heads_and_nothing_else(engine_results, engine):
    """At every fused loss call, the reference (TRL's ZeRO-3 inference engine) holds its lm_head
    whole and nothing else; the policy holds its lm_head, and at the first call, before
    DeepSpeed's prefetching has a trace to follow, nothing else either (later it prefetches
    what the backward needs next, as in any ZeRO-3 forward)."""
    head = HEAD_ROWS * HEAD_COLUMNS
    for name in ("eps0", "eps"):
        gathered = engine_results(engine)[name]["gathered"]
        assert len(gathered) == 5, name  # 4 steps, 1 evaluation batch
        assert gathered[0] == [head, head], name
        assert all(policy >= head and reference == head for policy, reference in gathered), name
