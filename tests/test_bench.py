"""benchmarks/bench_loss.py --quick runs, checks every row against eager and writes its outputs.

A smoke test of the harness, not a performance claim: timings come from benchmark runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--quick", "--device", "cpu",
         "--impl", "eager", "epsdpo-logits", "epsdpo-linear", "--json", str(tmp_path / "r.json"),
         "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["device"].startswith("CPU")
    rows = result["rows"]
    assert {r["impl"] for r in rows} == {"eager", "epsdpo-logits", "epsdpo-linear"}
    for row in rows:
        assert {"impl", "B", "T", "H", "V", "dtype", "fwd_ms", "fwd_bwd_ms", "peak_mb"} <= set(row)
        assert row["fwd_bwd_ms"] > 0
        if row["impl"] != "eager":
            assert row["check"].startswith("ok"), row
    assert "| epsdpo-linear |" in proc.stdout
    # What the times depend on is reported with them: threads and the machine's load.
    assert "torch threads" in result["machine"] and "load average" in result["machine"]
    assert "At the start: machine: " in proc.stdout
    assert proc.stderr.count("[bench]") >= 2 * len(rows)  # a progress line per row, and a result
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_kernel_benchmark_dry_run_exercises_every_path(tmp_path):
    """bench_kernels.py's plumbing (old and new kernels, the launch-configuration sweep with its
    agreement check, the profiler) through the CPU interpreter, so a GPU session only measures."""
    from tests.conftest import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--dry-run", "--rows",
         "32", "--vocab", "300", "--json", str(tmp_path / "k.json"), "--profile",
         str(tmp_path / "profile.txt")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "k.json").read_text())
    assert [r["kernels"] for r in result["kernels"]] == ["new", "old"]
    assert len(result["sweep"]) == 9
    assert all("error" not in r and r["fwd_ms"] > 0 for r in result["sweep"]), result["sweep"]
    assert "epsilon_dpo_loss fwd+bwd" in (tmp_path / "profile.txt").read_text()


def test_sweep_agreement_check_allows_reordering_and_nothing_more():
    """What a launch configuration may change: the stats' rounding (V-term sums in another
    order), not one bit of the gradient."""
    import torch

    from benchmarks.bench_kernels import _abs_logit_sums, check_layout_agreement
    from epsdpo_kernels import layout as L
    from epsdpo_kernels.token_torch import token_forward
    from epsdpo_kernels.validation import loss_params
    from tests.utils import make_batch

    policy, ref, labels = make_batch(2, 8, 1000, dtype=torch.bfloat16, ragged=False,
                                     prompt_frac=0.0)  # fmt: skip
    params = loss_params(dict(beta=0.1, epsilon=0.01, label_smoothing=0.0, ignore_index=-100,
                              average_log_prob=False, backend="torch"), policy.device)  # fmt: skip
    stats = token_forward(policy, ref, labels, params)
    grad = torch.randn(policy.shape).to(torch.bfloat16)
    sums = _abs_logit_sums(policy)
    check_layout_agreement("same", stats, stats, grad.clone(), grad, sums, 1000)
    # Another summation order: the log-sum-exp and the logit sum from float64 sums.
    reordered = stats.clone()
    reordered[L.TOK_LSE] = torch.logsumexp(policy.double(), -1).flatten().float()
    reordered[L.TOK_LOGIT_SUM] = policy.double().sum(-1).flatten().float()
    assert not torch.equal(reordered, stats)
    check_layout_agreement("reordered", reordered, stats, grad.clone(), grad, sums, 1000)
    moved = stats.clone()
    moved[L.TOK_P_EPS_DELTA, 3] += 1e-3
    with pytest.raises(AssertionError, match="stats field 2 row 3"):
        check_layout_agreement("off", moved, stats, grad.clone(), grad, sums, 1000)
    one_ulp = grad.clone()
    one_ulp[1, 2, 3] = one_ulp[1, 2, 3] * (1 + 2**-7)  # the next bf16 value
    with pytest.raises(AssertionError, match="sequence row 1 differs"):
        check_layout_agreement("grad", stats, stats, one_ulp, grad, sums, 1000)
