"""Speed and memory of ε-DPO implementations on the same inputs, one subprocess per row.

    python benchmarks/bench_loss.py [--device cuda|cpu] [--quick] [--impl ...] [--json PATH]
                                    [--plot PATH] [--preset NAME ...] [--row-timeout S]

Every row starts from hidden states and lm_head weights (the logits-based rows run the matmul
inside the timed region), is checked against ``eager``'s loss before it is timed, and runs in its
own process so that peak memory is its own: CUDA max-allocated beyond the inputs, or on CPU the
process's peak RSS beyond the inputs (VmHWM, reset after warm-up through /proc/self/clear_refs,
with glibc returning freed memory at once during that measurement and reusing it as usual while
timing). The JSON is rewritten after every row, so a run cut short keeps the rows it finished.

``trl-dpo`` is TRL 1.16's own fused LM head (``ChunkedLogProbFunction``) for policy and
reference and its sigmoid loss, as ``DPOTrainer`` runs them; ``liger-dpo`` Liger-Kernel's fused
linear DPO loss. Both are plain DPO, less work than ε-DPO (no perturbed policies, no step), and
are checked against eager at ε = 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BETA, EPSILON = 0.1, 0.01
QUICK_CPU_SHAPES = [dict(B=2, T=256, H=64, V=8000), dict(B=2, T=512, H=64, V=16000)]
CPU_SHAPES = [dict(B=2, T=1024, H=64, V=32000), dict(B=8, T=1024, H=64, V=32000)]
CUDA_SHAPES = [
    dict(B=b, T=t, H=4096, V=v) for v in (32000, 128256, 256000) for b, t in ((2, 1024), (4, 2048))
]
# Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s, by device-name substring.
ROOFLINES = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
}
# Shapes users published, by name (CUDA): ``B`` pairs of ``T`` tokens, half of each prompt.
PRESETS = {
    # 8192 tokens at Llama 3's vocabulary (the benchmark's default CUDA shape).
    "llama3-8k": dict(B=4, T=1024, H=4096, V=128256),
    # TRL issue 7244's figures on an H100, V = 151936 (Qwen) with 8192 tokens: chunked NLL
    # 167 ms / 13.1 GiB, Liger 192 ms / 6.1 GiB (H = 4096 assumed: Qwen3-8B's width).
    "qwen-8k": dict(B=4, T=1024, H=4096, V=151936),
    # TRL PR 6858: 16384 tokens × V = 248320 × H = 2048 (Cut Cross-Entropy 92.6 ms / 3.09 GB).
    "trl-6858": dict(B=8, T=1024, H=2048, V=248320),
}
ROW_TIMEOUT_S = 1800


# ----------------------------------------------------------------------------- worker side
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "reset the peak resident set size to the current one" (proc(5))


def _heap_reuse_for_timing() -> None:
    """The parent starts CPU workers with glibc returning every freed block over 128 KiB to the
    OS at once, so that peak RSS follows live memory. Timed like that, code that frees and
    allocates buffers in a loop pays a page fault per page each time (measured: 2× slower for
    the linear row), which no user's process does. After the memory measurement, restore heap
    reuse with glibc's own steady-state limits (mmap threshold 32 MiB, trim 64 MiB)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 64 * 2**20)


def _clear_grads(inputs):
    for k in ("hidden", "weight"):
        inputs[k].grad = None


def worker(cfg: dict) -> dict:
    import torch

    from benchmarks.impls import build, make_inputs

    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    inputs = make_inputs(cfg["B"], cfg["T"], cfg["H"], cfg["V"], dtype, device)
    step = build(cfg["impl"], inputs, BETA, EPSILON, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Warm-up: compilation, autotuning, library initialisation.
    step().backward()
    _clear_grads(inputs)
    sync()

    # Peak memory of one forward + backward beyond the inputs (grads count: a step makes them).
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        loss.backward()
        sync()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _reset_peak_rss()
        base_kb = _rss_kb("VmRSS")
        loss = step()
        loss.backward()
        peak_mb = (_rss_kb("VmHWM") - base_kb) / 1024
        _heap_reuse_for_timing()
    loss_value = float(loss.detach())
    del loss
    _clear_grads(inputs)

    row = dict(loss=loss_value, peak_mb=round(peak_mb, 1))
    expected = cfg.get("expected_loss")
    if expected is not None:
        rel = abs(loss_value - expected) / max(abs(expected), 1e-12)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        row["check"] = (
            f"ok (rel diff {rel:.1e})" if rel <= tol else f"MISMATCH (rel diff {rel:.1e})"
        )
        if rel > tol:
            return row  # not timed: a wrong result has no speed
    else:
        row["check"] = cfg.get("unchecked_reason", "reference")

    def fwd():
        step()

    def fwd_bwd():
        step().backward()

    if cuda:
        import triton

        ms = lambda fn: triton.testing.do_bench(  # noqa: E731
            fn,
            warmup=50,
            rep=400,
            quantiles=[0.5, 0.2, 0.8],
            grad_to_none=[inputs["hidden"], inputs["weight"]],
        )
        row["fwd_ms"], row["fwd_ms_p20"], row["fwd_ms_p80"] = ms(fwd)
        row["fwd_bwd_ms"], row["fwd_bwd_ms_p20"], row["fwd_bwd_ms_p80"] = ms(fwd_bwd)
        row.update(_roofline(cfg, inputs, device, row["fwd_bwd_ms"]))
    else:
        for name, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
            times = []
            for _ in range(cfg["repeats"]):
                _clear_grads(inputs)
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            row[name] = statistics.median(times)
    if cfg["impl"] == "eager":
        # The values the plain-DPO rows (trl-dpo, liger-dpo) and the soft-capped row are
        # checked against.
        import torch

        from benchmarks.impls import SOFTCAP, eager_loss

        args = [inputs[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight", "labels")]
        with torch.no_grad():
            row["loss_eps0"] = float(eager_loss(*args, BETA, 0.0))
            row["loss_softcap"] = float(eager_loss(*args, BETA, EPSILON, softcap=SOFTCAP))
    return row


def _roofline(cfg, inputs, device, fwd_bwd_ms: float) -> dict:
    """Achieved fraction of HBM bandwidth (logits kernels alone) or of bf16 tensor FLOP/s."""
    import torch
    import triton

    from epsdpo_kernels import epsilon_dpo_loss

    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in ROOFLINES.items() if k in name), None)
    if peak is None:
        return {}
    bandwidth, flops = peak
    labels = inputs["labels"]
    scored = int((labels != -100).sum())
    rows, v = labels.numel(), cfg["V"]
    elt = inputs["hidden"].element_size()
    if cfg["impl"] == "epsdpo-logits":
        with torch.no_grad():
            logits = (inputs["hidden"] @ inputs["weight"].t()).requires_grad_()
            ref_logits = inputs["ref_hidden"] @ inputs["ref_weight"].t()

        def loss_only():
            epsilon_dpo_loss(logits, ref_logits, labels, beta=BETA, epsilon=EPSILON).loss.backward()

        ms = triton.testing.do_bench(
            loss_only, warmup=50, rep=400, grad_to_none=[logits], return_mode="median"
        )
        # Forward reads policy + reference of scored rows; backward reads the policy of scored
        # rows and writes every gradient row (zeros for ignored ones).
        moved = (2 * scored * v + scored * v + rows * v) * elt
        return dict(kernel_fwd_bwd_ms=ms, hbm_fraction=round(moved / (ms * 1e-3) / bandwidth, 3))
    if cfg["impl"] in ("epsdpo-linear", "epsdpo-linear-softcap", "trl-dpo", "liger-dpo"):
        # Counted as the floor of 4 GEMMs over the scored tokens (policy and reference logits,
        # ∂hidden, ∂weight), whatever an implementation really runs (ours: 5, with the
        # recompute), so the figure compares implementations on useful work.
        useful = 4 * 2 * scored * cfg["H"] * v
        achieved = useful / (fwd_bwd_ms * 1e-3)
        return dict(
            useful_tflops_per_s=round(achieved / 1e12, 1),
            tensor_core_fraction=round(achieved / flops, 3),
        )
    return {}


# ----------------------------------------------------------------------------- parent side
def _run_row(cfg: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    # Return freed memory to the OS at once, so RSS follows live memory (glibc's defaults keep
    # up to 32 MiB blocks in the heap, hiding reuse from the peak).
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(skipped=f"timed out after {timeout_s:g} s")
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else f"exit code {proc.returncode}"
    if proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower():
        return dict(skipped=f"out of memory ({last[:200]})")
    if "ModuleNotFoundError" in proc.stderr:
        extra = "bench" if "liger" in last else "trl" if "trl" in last else None
        hint = f" (pip install -e '.[{extra}]')" if extra else ""
        return dict(skipped=f"missing package: {last[:200]}{hint}")
    return dict(skipped=f"failed: {last[:300]}")


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def _ratio(x, spec):
    return "—" if x is None else format(x, spec) + "×"


def markdown_table(result: dict) -> str:
    lines = [
        f"Device: {result['device']} · torch {result['torch']} · triton {result['triton']} · "
        f"commit {result['commit']} · {result['date']}",
        *([f"At the start: {result['machine']}"] if "machine" in result else []),
        "",
        "| impl | B | T | H | V | dtype | fwd ms | fwd+bwd ms | peak MB | time vs eager "
        "| memory vs eager | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            head = f"| {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['V']} | {r['dtype']} |"
            lines.append(f"{head} — | — | — | — | — | skipped: {r['skipped']} |")
            continue
        check = r.get("check", "")
        if "hbm_fraction" in r:  # CUDA only: the logits kernels alone, against HBM bandwidth
            check += f"; kernels {r['hbm_fraction']:.0%} of HBM bandwidth"
        if "tensor_core_fraction" in r:
            check += (
                f"; {r['useful_tflops_per_s']} useful TFLOP/s "
                f"({r['tensor_core_fraction']:.0%} of bf16 peak)"
            )
        lines.append(
            f"| {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['V']} | {r['dtype']} | "
            f"{_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwd_bwd_ms'))} | {_fmt(r.get('peak_mb'))} | "
            f"{_ratio(r.get('time_vs_eager'), '.2f')} | "
            f"{_ratio(r.get('memory_vs_eager'), '.3f')} | {check} |"
        )
    return "\n".join(lines)


# One colour per implementation, the same in every plot.
COLORS = {
    "eager": "tab:gray",
    "compiled": "tab:purple",
    "epsdpo-logits": "tab:blue",
    "epsdpo-linear": "tab:green",
    "epsdpo-linear-softcap": "tab:olive",
    "trl-dpo": "tab:red",
    "liger-dpo": "tab:orange",
}


def _bar_text(y: float) -> str:
    """Plain numbers on the bars (18,463 rather than 1.85e+04): log axes make them the only
    readable values."""
    return f"{y:,.0f}" if y >= 100 else f"{y:.3g}"


def plot(result: dict, path: str) -> None:
    """Two panels (time, memory), one group of bars per shape centred on its label, one bar per
    implementation that ran (skipped rows are left out, not drawn empty), values written on the
    bars since log axes are hard to read off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "skipped" not in r and "fwd_bwd_ms" in r]
    shapes = list(dict.fromkeys((r["B"], r["T"], r["V"]) for r in result["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, field, unit in zip(axes, ("fwd_bwd_ms", "peak_mb"), ("ms", "MB")):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, key in enumerate(shapes):
                match = [r for r in rows if r["impl"] == impl and (r["B"], r["T"], r["V"]) == key]
                if match:
                    xs.append(i - 0.4 + width / 2 + k * width)
                    ys.append(max(match[0][field], 1e-3))
            bars = ax.bar(xs, ys, width=width, label=impl, color=COLORS.get(impl))
            ax.bar_label(
                bars, labels=[_bar_text(y) for y in ys], fontsize=7, rotation=90, padding=2
            )
        ax.set_xticks(range(len(shapes)), [f"{2 * b * t} tokens\nV = {v}" for b, t, v in shapes])
        ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("forward + backward time")
    axes[1].set_title("peak memory beyond the inputs")
    axes[0].legend(fontsize=8)
    skipped = sorted({r["impl"] for r in result["rows"] if "skipped" in r} - set(impls))
    note = f" · not run: {', '.join(skipped)}" if skipped else ""
    fig.suptitle(f"ε-DPO loss, {result['device']}{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_shape(parser, text: str) -> dict:
    try:
        b, t, h, v = (int(x) for x in text.split(","))
    except ValueError:
        parser.error(f"--shape {text}: expected four integers B,T,H,V")
    if min(b, t, h, v) < 1 or t < 2:
        parser.error(f"--shape {text}: B, H, V must be ≥ 1 and T ≥ 2")
    return dict(B=b, T=t, H=h, V=v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes, about a minute on CPU")
    parser.add_argument("--impl", nargs="+", default=None, help="subset of implementations")
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="B,T,H,V",
        help="benchmark this shape instead of the defaults (repeatable)",
    )
    parser.add_argument(
        "--preset",
        action="append",
        default=None,
        choices=sorted(PRESETS),
        help="benchmark this named shape (repeatable; with --shape, both)",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=ROW_TIMEOUT_S,
        metavar="S",
        help=f"seconds one row may take before it is skipped (default {ROW_TIMEOUT_S})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, one tiny shape, one timed repetition: the plumbing, times meaningless",
    )
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch
    import triton

    from benchmarks.impls import IMPLS, PLAIN_DPO

    if args.row_timeout <= 0:
        parser.error("--row-timeout must be > 0")
    device = (
        "cpu" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    impls = args.impl or IMPLS
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impl {sorted(unknown)}; choose from {IMPLS}")
    if device == "cuda":
        shapes, dtype, repeats = (CUDA_SHAPES[:2] if args.quick else CUDA_SHAPES), "bfloat16", 0
    else:
        shapes, dtype = (QUICK_CPU_SHAPES if args.quick else CPU_SHAPES), "float32"
        repeats = 3
    if args.shape or args.preset:
        shapes = [_parse_shape(parser, text) for text in args.shape or []]
        shapes += [PRESETS[name] for name in args.preset or []]
    if args.dry_run:
        shapes, repeats = [dict(B=1, T=32, H=16, V=300)], 1
    ordered = ["eager"] + [
        i for i in impls if i != "eager"
    ]  # eager first: the others check against it

    from train.metrics import machine_note

    # Times depend on the threads each worker gets and on what else runs: say both, and warn
    # (machine_note, on stderr) when the machine is busier than its cores.
    machine = machine_note()
    print(f"[bench] {machine}", file=sys.stderr, flush=True)
    result = dict(
        device=_device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=_commit(),
        date=datetime.date.today().isoformat(),
        mode="quick" if args.quick else "full",
        machine=machine,
        rows=[],
    )
    for shape in shapes:
        eager_row = None
        for impl in ordered:
            cfg = dict(shape, impl=impl, device=device, dtype=dtype, repeats=repeats)
            if impl != "eager":
                if eager_row is None or "skipped" in eager_row:
                    cfg["unchecked_reason"] = "unchecked: eager could not run this shape"
                else:
                    key = (
                        "loss_eps0"
                        if impl in PLAIN_DPO
                        else "loss_softcap"
                        if impl.endswith("-softcap")
                        else "loss"
                    )
                    cfg["expected_loss"] = eager_row[key]
            print(
                f"[bench] {impl:14s} B={shape['B']} T={shape['T']} H={shape['H']} "
                f"V={shape['V']} {dtype} ...",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.perf_counter()
            row = _run_row(cfg, args.row_timeout)
            row = dict(impl=impl, **shape, dtype=dtype, **row)
            if impl == "eager":
                eager_row = row
            status = row.get("skipped") or (
                f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):.1f} ms, peak "
                f"{row['peak_mb']:.0f} MB, {row.get('check')}"
            )
            print(
                f"[bench]   {status} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            if impl in impls:
                result["rows"].append(row)
                if args.json:  # after every row: a run cut short keeps what it measured
                    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        for row in result["rows"]:
            same = (row["B"], row["T"], row["V"]) == (shape["B"], shape["T"], shape["V"])
            if same and eager_row and "skipped" not in eager_row and "fwd_bwd_ms" in row:
                row["time_vs_eager"] = row["fwd_bwd_ms"] / eager_row["fwd_bwd_ms"]
                row["memory_vs_eager"] = row["peak_mb"] / max(eager_row["peak_mb"], 1e-6)

    from train.metrics import load_average

    load = load_average()
    if load is not None:
        result["machine"] += f"; at the end: load average {load:.2f}"
    print(markdown_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
