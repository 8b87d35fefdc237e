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
        (["--weight-decay", "nan"], "error: --weight-decay must be a finite number ≥ 0, got nan"),
        (["--weight-decay", "inf"], "error: --weight-decay must be a finite number ≥ 0, got inf"),
        (["--lr", "inf"], "error: --lr must be a finite number > 0, got inf"),
        (["--max-grad-norm", "nan"], "error: --max-grad-norm must be a finite number > 0"),
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
        "weight-decay-nan",
        "weight-decay-inf",
        "lr-inf",
        "max-grad-norm-nan",
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


@pytest.mark.xdist_group("multi_process")
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


def _thesis(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("two years of work")
    return thesis


@pytest.mark.parametrize("script", SCRIPTS)
def test_overwrite_refuses_a_directory_that_holds_no_run(tmp_path, capsys, monkeypatch, script):
    """--overwrite on a directory no run made (a typo, the wrong folder) deletes nothing."""
    thesis = _thesis(tmp_path)
    code, out, err = run_in_process(
        script, ["--output-dir", str(thesis), "--overwrite"], capsys, monkeypatch
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"--overwrite: {thesis} holds no run" in lines[0] and "chapter1.tex" in lines[0]
    assert (thesis / "chapter1.tex").read_text() == "two years of work"


def test_overwrite_refuses_a_run_directory_with_files_no_run_writes(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "runs"
    (out_dir / "checkpoints").mkdir(parents=True)
    (out_dir / "run.json").write_text("{}")
    (out_dir / "notes.txt").write_text("mine")
    code, _, err = run_in_process(
        "run.py", ["--output-dir", str(out_dir), "--overwrite"], capsys, monkeypatch
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "notes.txt, which no run writes" in lines[0], err
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoints", "notes.txt", "run.json"]


def test_overwrite_clears_exactly_the_previous_runs_outputs(tmp_path):
    from train.outputs import start_run_dir

    out_dir = tmp_path / "runs"
    (out_dir / "checkpoints" / "step_2").mkdir(parents=True)
    (out_dir / "final").mkdir()
    for name in (
        "run.json",
        "metrics.jsonl",
        "metrics.png",
        "scores.jsonl",
        "pairs.filtered.jsonl",
    ):
        (out_dir / name).write_text("old")
    start_run_dir(out_dir, {"max_steps": 1}, overwrite=True)
    assert [p.name for p in out_dir.iterdir()] == ["run.json"]
    assert json.loads((out_dir / "run.json").read_text()) == {"max_steps": 1}


@pytest.mark.parametrize("script", SCRIPTS)
def test_overwrite_refuses_an_output_dir_holding_the_dataset(tmp_path, capsys, monkeypatch, script):
    """score.py --dataset runs/x/filtered --output-dir runs/x rewrote its own input."""
    out_dir = tmp_path / "x"
    (out_dir / "filtered").mkdir(parents=True)
    (out_dir / "run.json").write_text("{}")
    data = out_dir / "filtered" / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    before = data.read_text()
    args = ["--dataset", str(out_dir / "filtered"), "--output-dir", str(out_dir), "--overwrite"]
    code, _, err = run_in_process(script, args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "write over the data it reads" in lines[0], err
    assert data.read_text() == before


def test_score_refuses_an_output_dir_holding_another_run(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "x"
    out_dir.mkdir()
    (out_dir / "scores.jsonl").write_text("earlier\n")
    code, _, err = run_in_process("score.py", ["--output-dir", str(out_dir)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"--output-dir {out_dir} is not empty" in lines[0]
    assert "--overwrite" in lines[0] and "--resume" not in lines[0]
    assert (out_dir / "scores.jsonl").read_text() == "earlier\n"


def test_a_torn_metrics_line_is_dropped_with_a_note_and_resume_goes_on(tmp_path, capsys):
    """A real ENOSPC during an append left half a row; every later --resume failed with a
    JSONDecodeError traceback."""
    from train.metrics import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "note: metrics.jsonl: dropped line 4, which did not parse" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_truncating_metrics_replaces_the_file_whole(tmp_path, monkeypatch):
    """A kill while the rows are rewritten (here: before the rename) leaves the old file
    intact, not a half-written one."""
    import os

    from train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(original)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        truncate_metrics(path, 1)
    assert path.read_text() == original


def test_the_load_warning_says_what_to_do(monkeypatch, capsys):
    """At load 5 on 2 cores the default 2 threads ran train/run.py 7-8× slower than one; the
    warning said the times were slow, not how to fix it."""
    import torch

    import train.metrics as m

    monkeypatch.setattr(m, "load_average", lambda: 100.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    m.machine_note()
    assert "run with OMP_NUM_THREADS=1" in capsys.readouterr().err


def _checkpoint(root, step):
    from train.fsdp import write_marker

    path = root / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"metadata" * 10)
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (path / "run.json").write_text("{}")
    write_marker(path)
    return path


@pytest.mark.parametrize("damage", ["truncated-shard", "missing-metadata", "flipped-byte"])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, damage):
    """A checkpoint with its COMPLETE marker but a truncated shard or no .metadata gave a raw
    DCP traceback and no fallback; flipped bytes in tensor data loaded silently."""
    from train.fsdp import latest_checkpoint

    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    shard = newest / "__0_0.distcp"
    if damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing-metadata":
        (newest / ".metadata").unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[500] ^= 0x10
        shard.write_bytes(bytes(data))
    notes = []
    found = latest_checkpoint(tmp_path, checksums=True, note=notes.append)
    assert found.name == "step_2"
    assert len(notes) == 1 and notes[0].startswith("note: checkpoint step_4 does not verify (")
    if damage == "flipped-byte":  # the same size: only the checksum tells
        assert latest_checkpoint(tmp_path).name == "step_4"
        assert "does not match its checksum" in notes[0]


def test_a_checkpoint_marker_from_before_manifests_is_trusted(tmp_path):
    from train.fsdp import latest_checkpoint

    path = _checkpoint(tmp_path, 2)
    (path / "COMPLETE").write_text("")  # as earlier versions wrote it (touch)
    assert latest_checkpoint(tmp_path, checksums=True) == path


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    """ENOSPC inside dcp.save surfaced as "RuntimeError: [enforce fail at
    inline_container.cc:672] unexpected pos …" with a traceback."""
    from types import SimpleNamespace

    import train.fsdp as fsdp
    from train.cli import UsageError

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0")

    monkeypatch.setattr(fsdp, "training_state", lambda state: {})
    monkeypatch.setattr(fsdp.dcp, "save", full)
    with pytest.raises(
        UsageError, match=r"saving checkpoint step_3 failed \(\[enforce fail.*GiB free"
    ):
        fsdp.save_checkpoint(SimpleNamespace(step=3), tmp_path, 0, {})
    assert not (tmp_path / "checkpoints" / "step_3" / "COMPLETE").exists()


def test_an_unloadable_model_id_is_one_line_without_the_hubs_retry_log(caplog):
    """huggingface_hub logged each retry of a failed HEAD request before the error line."""
    import logging

    from train.cli import UsageError
    from train.models import _from_pretrained

    class Unreachable:
        @staticmethod
        def from_pretrained(name, **kwargs):
            logging.getLogger("huggingface_hub.utils._http").warning(
                "'[Errno -2] Name or service not known' thrown while requesting HEAD ..."
            )
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    before = logging.getLogger("huggingface_hub").level
    with pytest.raises(UsageError, match="could not load it .We couldn't connect"):
        _from_pretrained(Unreachable, "no-such-org/no-such-model")
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()]
    assert logging.getLogger("huggingface_hub").level == before  # restored
