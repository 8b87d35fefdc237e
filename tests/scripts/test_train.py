"""train/run.py end to end on CPU (gloo): ranks, resume, model loading, data formats."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from tests.helpers.scripts import FAST, ROOT, metrics, run, script_env  # noqa: E402
from train.hh_format import write_hh_jsonl_gz  # noqa: E402
from train.tokenizer import byte_tokenizer  # noqa: E402

# Every test here runs a script of train/ in a subprocess.
pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("multi_process")
def test_two_processes_match_one(tmp_path):
    proc = run(["--max-steps", "3", "--output-dir", str(tmp_path / "one"), *FAST])
    # What the reported times and memory depend on, and the peak memory on a CPU too.
    assert "torch threads, load average" in proc.stdout
    assert "peak memory" in proc.stdout and "(resident set, rank 0)" in proc.stdout
    run(["--max-steps", "3", "--output-dir", str(tmp_path / "two"), *FAST], nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["kl/beta"] == pytest.approx(b["kl/beta"], rel=1e-9)
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"])
    assert one[0]["kl/beta"] == 0.1  # the β the step used (the initial β at step 1)
    required = {
        "step",
        "loss",
        "kl/beta",
        "lr",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl/p_epsilon_steps",
        "kl/n_epsilon_steps",
        "tokens_per_s",
    }
    assert required <= set(one[0])
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
    assert (tmp_path / "two" / "metrics.png").exists()


def _assert_same_steps(a_rows, b_rows):
    """Two runs of the same pairs whose reductions run in other orders (other layouts, other
    process counts): every metric agrees to fp32 rounding. Rewards and margins are β·(differences
    of ~300-nat sums): their rounding scales with those sums, not with the small result."""
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        operands = b["kl/beta"] * (abs(b["logps/chosen"]) + abs(b["logps/rejected"]))
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], abs=1e-5 * operands), (a["step"], key)
        assert a["kl/beta"] == pytest.approx(b["kl/beta"], rel=1e-9)
        assert a["rewards/accuracies"] == b["rewards/accuracies"]


@pytest.mark.parametrize("loss", ["linear", "logits"])
def test_packed_run_trains_the_padded_run_steps(tmp_path, loss):
    """--padding-free and --no-padding-free (the default) train the same pairs per step, so
    every metric agrees to fp32 rounding (the models see different layouts, so not bitwise)."""
    args = ["--max-steps", "3", "--loss", loss, *FAST]
    run([*args, "--output-dir", str(tmp_path / "packed"), "--padding-free"])
    run([*args, "--output-dir", str(tmp_path / "padded"), "--no-padding-free"])
    packed, padded = metrics(tmp_path / "packed"), metrics(tmp_path / "padded")
    assert [r["step"] for r in packed] == [1, 2, 3]
    _assert_same_steps(packed, padded)
    for a, b in zip(packed, padded):
        # At --max-length 96 no two of these sequences share a row: the same padding.
        assert 0 <= a["padding_share"] <= b["padding_share"] < 1


def test_a_soft_capped_gemma2_trains_the_same_steps_with_either_loss(tmp_path):
    """train/configs/tiny-gemma2.json (final_logit_softcapping 30), on rows in Anthropic HH's
    published format (the paper's setting for this model family; .jsonl.gz as distributed):
    --loss linear caps inside the fused loss, --loss logits reads the model's own capped logits
    (and caps the reference's, formed from its hidden states): the same steps to fp32
    rounding."""
    hh = tmp_path / "hh-train.jsonl.gz"
    write_hh_jsonl_gz(hh, n=64)
    args = ["--model", str(ROOT / "train" / "configs" / "tiny-gemma2.json"), "--max-steps", "3"]
    args += [*FAST, "--padding-free", "--dataset", str(hh)]
    run([*args, "--output-dir", str(tmp_path / "linear"), "--loss", "linear"])
    run([*args, "--output-dir", str(tmp_path / "logits"), "--loss", "logits"])
    _assert_same_steps(metrics(tmp_path / "linear"), metrics(tmp_path / "logits"))


def test_interrupted_run_resumes_to_the_same_losses(tmp_path):
    args = [
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--max-length",
        "96",
    ]
    run([*args, "--output-dir", str(tmp_path / "straight")])

    # Kill a second run (SIGKILL, no clean-up) once its step-2 checkpoint is complete.
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train" / "run.py"), *args, "--output-dir", str(out)]
    proc = subprocess.Popen(
        cmd, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_2" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be interrupted"

    run([*args, "--output-dir", str(out), "--resume"])
    straight, resumed = metrics(tmp_path / "straight"), metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["kl/beta"] == pytest.approx(b["kl/beta"], rel=1e-12), a["step"]
        if "eval/loss" in a:
            assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-6)


def _save_untied_llama(path, vocab_size: int = 260) -> str:
    """A tiny Llama with its own lm_head and the byte tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.models import BYTE_TOKENS, TINY_DECODER

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        **TINY_DECODER,
        **BYTE_TOKENS,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def test_loads_a_saved_model_by_path_and_logits_loss(tmp_path):
    _save_untied_llama(tmp_path / "model")
    for loss in ("linear", "logits"):
        proc = run(
            [
                "--model",
                str(tmp_path / "model"),
                "--max-steps",
                "2",
                "--loss",
                loss,
                "--output-dir",
                str(tmp_path / loss),
                *FAST,
            ]
        )
        assert "done: 2 steps" in proc.stdout
    linear, logits = metrics(tmp_path / "linear"), metrics(tmp_path / "logits")
    for a, b in zip(linear, logits):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.xdist_group("multi_process")
def test_tensor_parallel_trains_the_one_process_steps_and_resumes(tmp_path):
    """--tp 2 on 2 processes (blocks, tied embedding and lm_head split; the vocabulary-parallel
    linear loss) trains the steps of one process, exports the same model, and a checkpoint
    made under --tp resumes under --tp to the same steps."""
    import shutil

    from safetensors.torch import load_file

    args = ["--max-steps", "4", *FAST, "--save-every", "2"]
    run([*args, "--output-dir", str(tmp_path / "one")])
    proc = run([*args, "--tp", "2", "--output-dir", str(tmp_path / "tp")], nproc=2)
    assert "data-parallel 1 × tensor-parallel 2" in proc.stdout
    # The export's gather once warned "suboptimal" on every rank (one message per run, rank 0).
    assert "While redistributing" not in proc.stderr
    one, tp = metrics(tmp_path / "one"), metrics(tmp_path / "tp")
    assert [r["step"] for r in tp] == [1, 2, 3, 4]
    _assert_same_steps(tp, one)
    # Tokens are counted once per data-parallel rank, not once per tensor rank.
    assert tp[0]["padding_share"] == pytest.approx(one[0]["padding_share"], abs=1e-12)
    # Adam moves a weight by about lr = 2e-3 a step; rounding apart, the runs move them alike.
    exported = load_file(tmp_path / "tp" / "final" / "model.safetensors")
    expected = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert exported.keys() == expected.keys()  # one copy of the tied weight, as without --tp
    for name, weight in expected.items():
        assert exported[name].shape == weight.shape
        assert (exported[name] - weight).abs().max() < 1e-4, name

    # As if cut off after the step-2 checkpoint: resume under --tp.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "tp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    shutil.rmtree(resumed / "final")
    proc = run([*args, "--tp", "2", "--output-dir", str(resumed), "--resume"], nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    again = metrics(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again, tp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["kl/beta"] == pytest.approx(b["kl/beta"], rel=1e-12), a["step"]


@pytest.mark.xdist_group("multi_process")
def test_tensor_parallel_logits_loss_on_packed_rows_and_uneven_vocabulary(tmp_path):
    """--tp 2 with an untied lm_head over a vocabulary of 263 (shards of 132 and 131), the
    logits loss on vocabulary-sharded logits, packed rows and evaluation: one process's steps."""
    args = [
        "--model",
        _save_untied_llama(tmp_path / "model", vocab_size=263),
        "--loss",
        "logits",
        "--padding-free",
        "--max-steps",
        "3",
        *FAST,
        "--eval-every",
        "3",
    ]
    run([*args, "--output-dir", str(tmp_path / "one")])
    run([*args, "--tp", "2", "--output-dir", str(tmp_path / "tp")], nproc=2)
    one, tp = metrics(tmp_path / "one"), metrics(tmp_path / "tp")
    assert "eval/loss" in tp[-1]
    _assert_same_steps(tp, one)


def test_tensor_parallel_refuses_a_model_it_cannot_split():
    from types import SimpleNamespace

    from train.cli import UsageError
    from train.parallel import check_model_splits

    llama = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    check_model_splits(SimpleNamespace(**llama), 2)
    with pytest.raises(UsageError, match=r"--tp 4 must divide the model's num_key_value_heads"):
        check_model_splits(SimpleNamespace(**llama), 4)
    with pytest.raises(UsageError, match=r"--tp 3 must divide the model's num_attention_heads"):
        check_model_splits(SimpleNamespace(**llama), 3)
