"""train/run.py as a new user meets it: real data files train, mistakes end in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tests.helpers.scripts import FAST, ROOT, metrics, run, run_in_process  # noqa: E402
from train.hh_format import write_hh_jsonl_gz  # noqa: E402


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--beta", "0"], "error: --beta must be a finite number > 0"),
        (["--epsilon", "1.5"], "error: --epsilon must be a number in [0, 1), got 1.5"),
        (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
        (["--loss", "eager"], "argument --loss: invalid choice"),
        (["--model", "./no-such-model"], "error: --model ./no-such-model: no such file"),
        (["--dataset", "./no-such.jsonl"], "error: --dataset ./no-such.jsonl: no such file"),
        (["--max-prompt-length", "200"], "must be smaller than --max-length (128)"),
        (["--global-batch-size", "12", "--micro-batch-size", "8"], "must be a multiple of"),
        (["--tp", "2"], "error: --tp 2 must divide the number of processes (1)"),
        (["--tp", "0"], "error: --tp must be ≥ 1, got 0"),
    ],
    ids=[
        "beta-0",
        "epsilon-1.5",
        "beta-text",
        "loss-choice",
        "missing-model",
        "missing-dataset",
        "prompt-too-long",
        "batch-multiple",
        "tp-over-world",
        "tp-0",
    ],
)
def test_user_errors_are_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, args, match):
    code, _, err = run_in_process(
        "run.py", [*args, "--output-dir", str(tmp_path / "out")], capsys, monkeypatch
    )
    assert code == 2
    assert err.strip().count("\n") == 0, err  # exactly one line
    assert match in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "checked before the run started"


@pytest.mark.slow
def test_a_user_error_is_one_line_and_exit_status_2_from_the_command_line(tmp_path):
    """The contract as a shell sees it, in a fresh process: stderr is exactly one line (no
    warning or traceback from any import), the exit status 2."""
    proc = run(["--beta", "0", "--output-dir", str(tmp_path / "out")], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --beta must be a finite number > 0, got 0.0"
    ], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "data.jsonl: no rows"),
        (
            '{"prompt": "p", "chosen": " a", "rejected": " b"}\n' * 29 + '{"prompt": "p"}\n',
            "data.jsonl line 30: missing field 'chosen'",
        ),
        ('{"chosen": "same", "rejected": "same"}\n' * 30, "no training pairs left"),
    ],
    ids=["empty", "malformed", "nothing-pairable"],
)
def test_bad_data_files_are_one_line(tmp_path, capsys, monkeypatch, content, match):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    code, _, err = run_in_process(
        "run.py",
        ["--dataset", str(data), "--output-dir", str(tmp_path / "out"), *FAST],
        capsys,
        monkeypatch,
    )
    assert code == 2
    errors = _error_lines(err)
    assert errors == [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and match in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_under_torchrun_only_rank_zero_prints_the_error(tmp_path):
    """torchrun adds its own failure report after the workers exit; ours is one line."""
    proc = run(
        ["--beta", "0", "--output-dir", str(tmp_path / "out")], nproc=2, check=False, timeout=300
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: --beta")]
    assert len(ours) == 1, proc.stderr


@pytest.mark.slow
def test_hh_rlhf_file_trains_as_downloaded(tmp_path):
    """The done-when command of the first-contact issue: a gzipped JSONL in HH-RLHF's format
    (implicit prompts, multi-turn, prefix rows, one identical row) trains 20 steps."""
    data = tmp_path / "test.jsonl.gz"
    write_hh_jsonl_gz(data, n=200)
    out = tmp_path / "out"
    proc = run(["--dataset", str(data), "--max-steps", "20", "--output-dir", str(out)], timeout=600)
    assert "done: 20 steps" in proc.stdout
    assert (
        f"note: train: skipped 1 of 190 rows that cannot form a pair (chosen and rejected "
        f"are identical): {data} line 6"
    ) in proc.stdout
    # HH prompts are multi-turn: the default --max-prompt-length 64 cuts most of many of them.
    assert "--max-prompt-length 64 cut more than half of the prompt of" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_one_row_dataset_trains_without_evaluation(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    proc = run(
        [
            "--dataset",
            str(data),
            "--max-steps",
            "2",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert "evaluation is off" in proc.stdout and "done: 2 steps" in proc.stdout


def test_help_documents_every_flag_with_its_default(capsys, monkeypatch):
    code, out, _ = run_in_process("run.py", ["--help"], capsys, monkeypatch)
    assert code == 0
    import dataclasses

    from train.run import Config

    text = " ".join(out.split())
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata.get("help"), f"{flag} has no description"
    assert text.count("(default:") == len(dataclasses.fields(Config))


def test_training_docs_usage_line_lists_every_flag():
    import dataclasses

    from train.run import Config

    readme = (ROOT / "docs" / "TRAINING.md").read_text()
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in readme, f.name


def test_model_config_file_with_a_too_small_vocabulary_is_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    code, _, err = run_in_process(
        "run.py",
        ["--model", str(config), "--output-dir", str(tmp_path / "out")],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert "needs vocab_size ≥ 260, got 100" in err
    assert len(err.strip().splitlines()) == 1


SCRIPTS = ["run.py", "run_trl.py", "score.py"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["under-a-file", "virtual-file-system"])
def test_impossible_output_dir_is_one_line_before_anything_loads(
    tmp_path, capsys, monkeypatch, script, case
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target, match = {
        "under-a-file": (blocker / "out", f"{blocker} is not a directory"),
        # /proc takes no new files, even from root (permission bits cannot show that).
        "virtual-file-system": ("/proc/epsdpo-test/out", "cannot write in /proc"),
    }[case]
    code, out, err = run_in_process(script, ["--output-dir", str(target)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --output-dir {target}") and match in lines[0]
    assert not out.strip(), "nothing loaded or printed before the check"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_start_that_fails_late_leaves_no_directory(tmp_path, capsys, monkeypatch, script):
    """A malformed row is found after the model loads; the output directory (and its parents)
    are made only once everything has loaded, so nothing is left behind."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"prompt": "p", "chosen": " a", "rejected": " b"}\n' * 29
        + '{"prompt": "p", "chosen": " a"}\n'
    )
    out = tmp_path / "new" / "out"
    code, _, err = run_in_process(
        script, ["--dataset", str(data), "--output-dir", str(out)], capsys, monkeypatch
    )
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {data} line 30: missing field 'rejected' (fields: ['chosen', 'prompt'])"
    ], err
    assert not (tmp_path / "new").exists()


def test_git_lfs_pointer_as_data_says_so(tmp_path, capsys, monkeypatch):
    data = tmp_path / "test.jsonl.gz"
    data.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 743\n")
    code, _, err = run_in_process(
        "run.py",
        ["--dataset", str(data), "--output-dir", str(tmp_path / "out")],
        capsys,
        monkeypatch,
    )
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a Git LFS pointer, not the data itself" in errors[0], err
    assert "git lfs pull" in errors[0] and "gzip" not in errors[0]


@pytest.mark.slow
def test_make_dataset_help_writes_nothing():
    data = ROOT / "train" / "pairs" / "default"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in data.iterdir()}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "make_dataset.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in data.iterdir()} == before
    bad = subprocess.run(
        [sys.executable, str(ROOT / "train" / "make_dataset.py"), "--rows", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in data.iterdir()} == before
