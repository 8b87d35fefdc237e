"""train/score.py end to end: scores for every row, the filtered dataset, and training on it."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from tests.helpers.scripts import FAST, metrics, run, run_in_process

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "train" / "pairs" / "default"


def score(args, check=True):
    return run(args, check=check, script="score.py")


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_dataset_scored_filtered_and_trained_on(tmp_path):
    out = tmp_path / "ches"
    proc = score(["--output-dir", str(out), "--drop-top", "10", "--batch-size", "64"])
    assert "ches_normalized: n 1328" in proc.stdout
    rows = records(out)
    train_lines = (DEFAULT / "train.jsonl").read_text().splitlines()
    eval_lines = (DEFAULT / "eval.jsonl").read_text().splitlines()
    assert len(rows) == len(train_lines) + len(eval_lines)
    assert [(r["split"], r["line"]) for r in rows] == (
        [("train", i + 1) for i in range(len(train_lines))]
        + [("eval", i + 1) for i in range(len(eval_lines))]
    )
    assert all(math.isfinite(r["ches"]) and math.isfinite(r["ches_normalized"]) for r in rows)
    assert (out / "ches_hist.png").stat().st_size > 0

    # The filtered train file: the 10% highest length-normalised scores are gone, nothing else.
    filtered = out / "filtered"
    kept = (filtered / "train.jsonl").read_text().splitlines()
    n_drop = math.ceil(0.10 * len(train_lines))
    assert len(kept) == len(train_lines) - n_drop
    train_scores = [r["ches_normalized"] for r in rows if r["split"] == "train"]
    threshold = sorted(train_scores, reverse=True)[n_drop - 1]
    expected = [json.loads(line) for line, s in zip(train_lines, train_scores) if s < threshold]
    assert [json.loads(line) for line in kept] == expected
    assert (filtered / "eval.jsonl").read_text().splitlines() == eval_lines

    run(
        [
            "--dataset",
            str(filtered),
            "--max-steps",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
            *FAST,
        ]
    )
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    assert "displacement/chosen_below_ref" in metrics(tmp_path / "run")[-1]


@pytest.mark.slow
def test_single_gz_file_with_an_unpairable_row_and_batch_independence(tmp_path):
    lines = (DEFAULT / "train.jsonl").read_text().splitlines()[:9]
    lines.insert(4, json.dumps({"prompt": "same?", "chosen": " yes", "rejected": " yes"}))
    source = tmp_path / "prefs.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.write("\n".join(lines) + "\n")
    one = score(
        [
            "--dataset",
            str(source),
            "--output-dir",
            str(tmp_path / "b1"),
            "--batch-size",
            "1",
            "--drop-top",
            "20",
            "--rank-by",
            "ches",
        ]
    )
    score(["--dataset", str(source), "--output-dir", str(tmp_path / "b4"), "--batch-size", "4"])
    assert "1 rows cannot form a pair" in one.stdout
    a, b = records(tmp_path / "b1"), records(tmp_path / "b4")
    assert len(a) == len(b) == 10
    assert "identical" in a[4]["skipped"] and "ches" not in a[4]
    for x, y in zip(a, b):  # padding to the batch's longest pair changes nothing
        if "skipped" not in x:
            assert x["line"] == y["line"]
            assert x["ches"] == pytest.approx(y["ches"], rel=1e-4, abs=1e-3)
            assert x["ches_normalized"] == pytest.approx(y["ches_normalized"], rel=1e-4, abs=1e-5)
    # Ranked by plain CHES: ceil(20% of 9 scored) = 2 dropped, the unpairable row kept.
    with gzip.open(tmp_path / "b1" / "prefs.filtered.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f.read().splitlines()]
    top_two = sorted((r for r in a if "ches" in r), key=lambda r: r["ches"])[-2:]
    dropped_lines = {r["line"] for r in top_two}
    assert kept == [json.loads(line) for i, line in enumerate(lines) if i + 1 not in dropped_lines]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drop-top", "150"], "--drop-top must be a percentage in (0, 100)"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1"),
        (["--dataset", "./nowhere.jsonl"], "no such file or directory"),
        (["--rank-by", "loss"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    code, _, err = run_in_process(
        "score.py", [*args, "--output-dir", str(tmp_path / "out")], capsys, monkeypatch
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_histogram_axis_is_not_stretched_by_one_outlier(tmp_path):
    """2300 scores in [-3, 3] and one at -24: the axis stays on the bulk, the outlier is
    counted at the edge instead of squeezing every other pair into one bar."""
    import random

    from train.score import histogram_range, plot_histograms

    rng = random.Random(0)
    values = [rng.uniform(-3, 3) for _ in range(2300)] + [-24.0]
    low, high = histogram_range(values)
    assert -24 < low <= min(values[:-1]) and high == max(values)
    assert histogram_range([1.0, 1.0, 1.0]) == (1.0, 1.0)
    rows = [{"ches": v, "ches_normalized": v / 100} for v in values]
    plot_histograms(rows, tmp_path / "hist.png")
    assert (tmp_path / "hist.png").stat().st_size > 0


@pytest.mark.slow
def test_a_soft_capped_gemma2_config_is_scored(tmp_path):
    """CHES reads only the last hidden states of the scored tokens, never the logits,
    so a model that caps its logits (Gemma 2, the paper's HH model) needs nothing more."""
    out = tmp_path / "ches"
    model = str(ROOT / "train" / "configs" / "tiny-gemma2.json")
    proc = score(["--model", model, "--output-dir", str(out), "--batch-size", "64"])
    assert "ches_normalized: n 1328" in proc.stdout
    assert all(math.isfinite(r["ches"]) for r in records(out))
