"""benchmarks/bench_loss.py --quick runs, checks every row against eager and writes its outputs.

A smoke test of the harness, not a performance claim: timings come from benchmark runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import script_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_loss.py"),
            "--quick",
            "--device",
            "cpu",
            # The plumbing at two small shapes: the quick preset's own take a minute here.
            "--shape",
            "2,64,32,2000",
            "--shape",
            "2,128,32,4000",
            "--impl",
            "eager",
            "epsdpo-logits",
            "epsdpo-linear",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
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


@pytest.mark.slow
def test_one_call_campaign_dry_run_runs_every_step_within_its_budget(tmp_path):
    """benchmarks/gpu_campaign.sh's first GPU call, on the CPU: every step ends ok, the caps add
    up to at most 520 s, at most 8 files of at most 16 MiB come back, and each step's file holds
    what it measured (every kernel case checked, TRL's fused head beside ours)."""
    from tests.helpers.interpreter import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    out = tmp_path / "campaign"
    env = {k: v for k, v in script_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        env={**env, "PYTHON": sys.executable},
        timeout=900,
        cwd=ROOT,
    )
    log = (out / "campaign.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    steps = ["versions", "check", "kernels", "tests", "linear", "bench", "train"]
    for name in steps:
        assert f"=== step {name} ok" in log, (name, log[-6000:])
    caps = [int(c) for c in re.findall(r"=== step \w+ \(cap (\d+) s", log)]
    assert len(caps) == len(steps) and sum(caps) <= 520, caps
    assert f"caps summing to {sum(caps)} s" in log

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files), files
    cases = [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]
    assert cases and all(c["status"] == "ok" for c in cases), [
        c for c in cases if c["status"] != "ok"
    ]
    names = " ".join(c["name"] for c in cases)
    for kind in ("strided", "packed", "inplace", "big", "linear", "float16", "float32"):
        assert kind in names, kind
    assert all(c["syncs"] == ["epsdpo_kernels.call.tolist"] for c in cases)
    bench = {r["impl"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    for impl in ("eager", "epsdpo-logits", "epsdpo-linear", "trl-dpo"):
        assert "skipped" not in bench[impl], bench[impl]
    assert bench["trl-dpo"]["check"].startswith("ok"), bench["trl-dpo"]
    assert json.loads((out / "linear.json").read_text())["rows"][0]["loss_over_floor"] > 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
    assert " passed" in (out / "pytest.log").read_text()
    assert "torch " in (out / "versions.txt").read_text()


@pytest.mark.slow
def test_kernel_benchmark_dry_run_exercises_every_path(tmp_path):
    """bench_kernels.py's plumbing (old and new kernels, the launch-configuration sweep with its
    agreement check, the profiler) through the CPU interpreter, so a GPU session only measures."""
    from tests.helpers.interpreter import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_kernels.py"),
            "--dry-run",
            "--rows",
            "32",
            "--vocab",
            "300",
            "--json",
            str(tmp_path / "k.json"),
            "--profile",
            str(tmp_path / "profile.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
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
    from epsdpo_kernels.params import LossParams
    from epsdpo_kernels.torch_backend.forward import token_forward
    from tests.helpers.batches import make_batch

    policy, ref, labels = make_batch(
        2, 8, 1000, dtype=torch.bfloat16, ragged=False, prompt_frac=0.0
    )
    params = LossParams(
        beta=0.1,
        epsilon=0.01,
        label_smoothing=0.0,
        ignore_index=-100,
        average_log_prob=False,
        backend="torch",
        scored_count=labels.numel(),
    )
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


def test_kernel_time_model_terms():
    """The predicted range's terms (benchmarks/kernel_report.py), on cases worked by hand."""
    import pytest

    from benchmarks.compiled import loop_load_bytes
    from benchmarks.kernel_report import H100, calibrate, programs_per_sm, time_range

    fit = calibrate()
    # Liger's A100 points: 84.6% of the datasheet bandwidth and 65 µs per call, exact at the two
    # end points the line goes through; the mid-V points run faster (cache reuse).
    assert fit["efficiency"] == pytest.approx(0.846, abs=0.002)
    assert fit["fixed_s"] == pytest.approx(65e-6, abs=2e-6)
    ends = (fit["residuals"][4096], fit["residuals"][131072])
    assert ends == pytest.approx((0.0, 0.0), abs=1e-12)
    assert all(r <= 1e-12 for r in fit["residuals"].values())

    # Registers are allocated per warp in units of 256: 76 → 2432 per warp, 3 programs of 8.
    assert [programs_per_sm(r, 8) for r in (32, 40, 64, 76, 255)] == [8, 6, 4, 3, 1]
    assert loop_load_bytes([(0, "LDG.E.128", ""), (16, "LDG.E.U16", ""), (32, "FADD", "")]) == 18

    sms = H100["sms"]
    common = dict(elements=10**9, bytes_per_element=2, mufu=0.0, instr=1.0, warps=8)
    # Memory-bound, 4 programs of 256 threads × 32 bytes in flight (32 KB ≥ 22 KB needed), whole
    # waves: the high end is the calibrated bandwidth plus the fixed cost.
    fast = time_range(**common, registers=64, load_bytes=32, programs=sms * 4 * 100)
    assert fast["low_ms"] == pytest.approx(2e9 / 3.0e12 * 1e3, abs=1e-3)
    expected = 2e9 / (fit["efficiency"] * 3.35e12) + fit["fixed_s"]
    assert fast["high_ms"] == pytest.approx(expected * 1e3, abs=1e-3)
    assert fast["in_flight_kb_per_sm"] == 32 and fast["wave_tail"] == 1.0
    # One program per SM with 4-byte loads: 1 KB in flight sustains 132 KB/µs = 0.135 TB/s.
    starved = time_range(**common, registers=255, load_bytes=4, programs=sms * 100)
    assert starved["high_ms"] == pytest.approx(
        (2e9 / (sms * 1024 / 1e-6) + fit["fixed_s"]) * 1e3, rel=1e-3
    )
    # One and a half waves take two.
    tail = time_range(**common, registers=64, load_bytes=32, programs=sms * 4 * 3 // 2)
    assert tail["wave_tail"] == pytest.approx(4 / 3, abs=1e-3)


def test_kernel_time_model_gpus():
    """The H200 and the sustained clock in the model: a bf16 forward of 4.5 MUFU per pair (2 bytes
    per logit, both inputs; the kernel before its exact rescale) takes 81% of the memory time on
    an H100 at boost and 116% on an H200, whose bandwidth grows and SFU rate does not; a lower
    clock only scales SFU."""
    import pytest

    from benchmarks.kernel_report import gpu_models, time_range

    models = {g["name"]: g for g in gpu_models()}
    assert sorted(models) == [
        "H100 SXM @ 1.755 GHz",
        "H100 SXM @ 1.98 GHz",
        "H200 @ 1.755 GHz",
        "H200 @ 1.98 GHz",
    ]
    forward = dict(elements=10**9, bytes_per_element=4, mufu=4.5, instr=29.6, warps=8)
    forward.update(registers=64, load_bytes=32, programs=132 * 4 * 100)
    share = {n: time_range(**forward, gpu=g)["sfu_share_of_memory"] for n, g in models.items()}
    assert share["H100 SXM @ 1.98 GHz"] == pytest.approx(0.81, abs=0.005)
    assert share["H200 @ 1.98 GHz"] == pytest.approx(1.157, abs=0.005)
    assert share["H200 @ 1.755 GHz"] == pytest.approx(1.157 * 1.98 / 1.755, abs=0.005)
    h200 = time_range(**forward, gpu=models["H200 @ 1.98 GHz"])
    assert h200["bound"] == "SFU" and h200["needed_kb_per_sm"] == pytest.approx(31.8, abs=0.1)


def test_missing_register_count_is_an_error_not_a_silent_none():
    """A cubin cuobjdump cannot read (another Triton release's tools) must stop the report:
    "0 spills" without a register count would mean nothing."""
    from types import SimpleNamespace

    from benchmarks.compiled import resources

    with pytest.raises(RuntimeError, match="gave no register count"):
        resources(SimpleNamespace(asm={"cubin": b"this is not a cubin"}), 90)


@pytest.mark.slow
def test_packing_benchmark_runs_both_layouts_and_they_agree(tmp_path):
    """bench_packing.py on a few generated HH-format pairs: both layouts' losses agree (the
    script exits 1 otherwise), and the packed one runs fewer positions with less padding."""
    out = tmp_path / "packing.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_packing.py"),
            "--pairs",
            "16",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 16 and result["max_loss_difference"] <= 1e-4
    padded, packed = result["padded"], result["packed"]
    assert padded["tokens"] == packed["tokens"]
    assert packed["positions"] < padded["positions"]
    assert 0 <= packed["padding_share"] < padded["padding_share"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_vocab_parallel_benchmark_counts_the_modelled_bytes(tmp_path):
    """Two gloo ranks and one process at a small size: the same loss, and the payloads each rank
    hands to the collectives are exactly the scaling model's (RESULTS.md): to all_reduce, 4 fp32
    per token in the forward, H fp32 per token for the hidden-state gradient, and the one
    agreement check; to all_gather, the 8 sums per token."""
    out = tmp_path / "vp.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_vocab_parallel.py"),
            *("--vocab", "1001", "--ranks", "1", "2", "--tokens", "32", "--hidden", "16"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = json.loads(out.read_text())
    assert single["all_reduce_payload_bytes_per_rank"] == 0
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-6)
    tokens, hidden = 32, 16
    # max and −min of 9 float64 values: tokens, label checksum, 7 options (β, ε, label
    # smoothing, averaging, the logit scale and cap, wpo_weights)
    check = 2 * 8 * 9
    # 4 maxima; 4 rescaled sums, the label's 2 lm_head outputs, Σ logits, Σ exp(2h) (WPO)
    maxima, sums = 4 * 4 * tokens, 8 * 4 * tokens
    assert double["all_reduce_payload_bytes_per_rank"] == maxima + 4 * hidden * tokens + check
    assert double["all_gather_payload_bytes_per_rank"] == sums
