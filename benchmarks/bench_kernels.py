"""The per-token kernels alone on a GPU: bandwidth against the measured copy, old vs new, and a
sweep of the launch configuration (warps × lanes per thread), at several vocabulary sizes.

    python benchmarks/bench_kernels.py --json kernels.json              # on CUDA
    python benchmarks/bench_kernels.py --rows 16384 --vocab 128256 --no-sweep --profile prof.txt
    python benchmarks/bench_kernels.py --dry-run --rows 32 --vocab 300    # no GPU: plumbing only

Every row of the (rows, V) bf16 logits is scored (the logits path's worst case). Bytes moved:
forward reads policy and reference logits (2·rows·V·2), backward reads the policy logits and
writes their gradient (2·rows·V·2); both against a device-to-device copy of the same size,
timed in the same process (medians of ``triton.testing.do_bench``'s timings). Each swept
configuration's outputs are checked against the default configuration's before it is timed
(``check_layout_agreement``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

WARPS = (4, 8, 16)
LANES_PER_THREAD = (1, 2, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384, help="token rows (2B·T)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 256000])
    parser.add_argument("--no-sweep", action="store_true", help="default configuration only")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument(
        "--profile",
        default=None,
        help="write a torch.profiler table of one epsilon_dpo_loss fwd+bwd "
        "at --rows × the largest --vocab here",
    )
    dry_help = (
        "CPU tensors through Triton's interpreter, one timed call each: the plumbing "
        "without a GPU (times meaningless)"
    )
    parser.add_argument("--dry-run", action="store_true", help=dry_help)
    args = parser.parse_args(argv)
    from benchmarks.devices import benchmark_device

    device = benchmark_device(parser, args.dry_run)
    import torch
    import triton

    from epsdpo_kernels.params import LossParams

    # Every row is scored (see the module docstring); the per-token kernels read the rest.
    params = LossParams(
        beta=0.1,
        epsilon=0.01,
        label_smoothing=0.0,
        ignore_index=-100,
        average_log_prob=False,
        backend="triton",
        scored_count=args.rows,
    )
    result = dict(
        device="dry run (CPU interpreter)" if args.dry_run else torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        driver="n/a" if args.dry_run else _driver(),
        date=datetime.date.today().isoformat(),
        rows=args.rows,
        copy=[],
        kernels=[],
        sweep=[],
    )
    if args.dry_run:
        bench = _time_once
    else:

        def bench(f):
            return triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")

    for vocab in args.vocab:
        _bench_vocab(vocab, args.rows, not args.no_sweep, params, bench, result, device)
        if args.json:  # after every V: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.profile:
        _profile(args.profile, args.rows, max(args.vocab), device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _time_once(f) -> float:
    """Milliseconds of one call (the dry run's stand-in for do_bench)."""
    start = time.perf_counter()
    f()
    return (time.perf_counter() - start) * 1e3


def _bench_vocab(vocab, rows, sweep, params, bench, result, device) -> None:
    """Copy, old and new kernels, and (``sweep``) every launch configuration at one V."""
    import torch

    from benchmarks import baseline_token_kernels as old
    from epsdpo_kernels import triton_backend as new
    from epsdpo_kernels.triton_backend import backward as new_backward
    from epsdpo_kernels.triton_backend import forward as new_forward

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (16, max(1, rows // 16), vocab)
    policy = (torch.randn(shape, generator=gen, device=device) * 3).to(torch.bfloat16)
    ref = (policy.float() + 0.1 * torch.randn(shape, generator=gen, device=device)).to(
        torch.bfloat16
    )
    labels = torch.randint(0, vocab, shape[:2], generator=gen, device=device)
    token_coef = torch.randn(rows, device=device)
    nbytes = policy.numel() * policy.element_size()
    scratch = torch.empty_like(policy)
    copy_ms = bench(lambda: scratch.copy_(policy))
    copy_bw = 2 * nbytes / (copy_ms * 1e-3)
    result["copy"].append(dict(vocab=vocab, ms=copy_ms, bytes_per_s=copy_bw))
    print(
        f"V={vocab}: copy {2 * nbytes / 1e9:.2f} GB in {copy_ms:.3f} ms = "
        f"{copy_bw / 1e12:.2f} TB/s",
        flush=True,
    )

    stats = new.token_forward(policy, ref, labels, params)
    grad = new.token_backward(policy, labels, stats, token_coef, params, inplace=False)
    runs = {
        "new": (
            lambda: new.token_forward(policy, ref, labels, params),
            lambda: new.token_backward(policy, labels, stats, token_coef, params, inplace=False),
        ),
        "old": (
            lambda: old.token_forward(policy, ref, labels, epsilon=0.01, ignore_index=-100),
            lambda: old.token_backward(
                policy, labels, old_stats, token_coef, ignore_index=-100, inplace=False
            ),
        ),
    }
    old_stats = old.token_forward(policy, ref, labels, epsilon=0.01, ignore_index=-100)
    for name, (forward, backward) in runs.items():
        fwd_ms, bwd_ms = bench(forward), bench(backward)
        row = _row(name, vocab, fwd_ms, bwd_ms, 2 * nbytes, copy_bw)
        result["kernels"].append(row)
        print(_describe(row), flush=True)

    if sweep:
        # Each launcher reads its module's own binding of its launch shape (launch.py's values).
        default = (
            new_forward.FWD_WARPS,
            new_forward.FWD_LANES_PER_THREAD,
            new_backward.BWD_WARPS,
            new_backward.BWD_LANES_PER_THREAD,
        )
        try:
            for warps in WARPS:
                for lanes in LANES_PER_THREAD:
                    new_forward.FWD_WARPS = new_backward.BWD_WARPS = warps
                    new_forward.FWD_LANES_PER_THREAD = new_backward.BWD_LANES_PER_THREAD = lanes
                    row = _sweep_point(
                        new,
                        policy,
                        ref,
                        labels,
                        token_coef,
                        params,
                        stats,
                        grad,
                        bench,
                        nbytes,
                        copy_bw,
                        vocab,
                        warps,
                        lanes,
                    )
                    result["sweep"].append(row)
                    print(_describe(row), flush=True)
        finally:
            (
                new_forward.FWD_WARPS,
                new_forward.FWD_LANES_PER_THREAD,
                new_backward.BWD_WARPS,
                new_backward.BWD_LANES_PER_THREAD,
            ) = default


def _row(name, vocab, fwd_ms, bwd_ms, bytes_each, copy_bw):
    return dict(
        kernels=name,
        vocab=vocab,
        fwd_ms=fwd_ms,
        bwd_ms=bwd_ms,
        fwd_copy_fraction=bytes_each / (fwd_ms * 1e-3) / copy_bw,
        bwd_copy_fraction=bytes_each / (bwd_ms * 1e-3) / copy_bw,
        total_copy_fraction=2 * bytes_each / ((fwd_ms + bwd_ms) * 1e-3) / copy_bw,
    )


def _describe(row) -> str:
    label = row["kernels"] + (
        f" warps={row['warps']} lanes={row['lanes']}" if "warps" in row else ""
    )
    if "error" in row:
        return f"  {label}: {row['error']}"
    return (
        f"  {label}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_copy_fraction']:.0%} of copy), "
        f"bwd {row['bwd_ms']:.3f} ms ({row['bwd_copy_fraction']:.0%}), fwd+bwd "
        f"{row['total_copy_fraction']:.0%}"
    )


# fp32 unit roundoff and the probabilistic bound's confidence factor (Higham & Mary 2019): an
# n-term fp32 sum in any order is within λ·√n·u·Σ|terms| of the exact sum (failure chance
# 2·exp(−λ²/2) = 7e-6 for λ = 5).
_U, _LAMBDA = 2.0**-24, 5.0


def check_layout_agreement(layout, got_stats, stats, got_grad, grad, abs_logit_sum, vocab):
    """Raise if a launch configuration's results differ from the default's by more than the
    lane layout can explain. The gradient is elementwise given the forward's saved lse, so
    ``got_grad`` (computed from the default's ``stats``) must be bitwise equal; the stats are
    reductions over V in another order: each within the fp32 error of a V-term sum (relative
    to Σ|terms|: Σexp for the log-sum-exps, Σ|h| for the logit sum). Compares in place, chunk by
    chunk: no fp32 copy of the logits (16 GB at 16384 × 256000)."""
    import torch

    from epsdpo_kernels import layout as L

    for n in range(grad.shape[0]):  # one sequence row at a time: no full-size temporaries
        if not torch.equal(got_grad[n], grad[n]):
            raise AssertionError(f"{layout}: the gradient of sequence row {n} differs")
    gamma = _LAMBDA * vocab**0.5 * _U
    lse = stats[L.TOK_LSE].abs()
    for field in range(L.TOKEN_FIELDS):
        want, got = stats[field], got_stats[field]
        if field == L.TOK_LOGIT_SUM:
            atol = gamma * abs_logit_sum
        else:  # a log of a sum: γ(V) absolute, and the rounding of what it is added to
            terms = 2 if field in (L.TOK_P_EPS_DELTA, L.TOK_N_EPS_DELTA) else 1
            atol = terms * gamma + 8 * _U * (want.abs() + lse)
        bad = (got - want).abs() > atol
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AssertionError(
                f"{layout}: stats field {field} row {i}: {got[i].item()!r} vs "
                f"{want[i].item()!r} (atol {atol[i].item():.3g})"
            )


def _abs_logit_sums(policy):
    """Σ_v |h| per token row, in fp32, one sequence row at a time (no fp32 copy of all)."""
    import torch

    return torch.cat([row.float().abs().sum(-1) for row in policy]).flatten()


def _sweep_point(
    new,
    policy,
    ref,
    labels,
    token_coef,
    params,
    stats,
    grad,
    bench,
    nbytes,
    copy_bw,
    vocab,
    warps,
    lanes,
):
    point = dict(kernels="new", warps=warps, lanes=lanes, vocab=vocab)
    try:
        got_stats = new.token_forward(policy, ref, labels, params)
        got_grad = new.token_backward(policy, labels, stats, token_coef, params, inplace=False)
        check_layout_agreement(
            f"warps={warps} lanes={lanes}",
            got_stats,
            stats,
            got_grad,
            grad,
            _abs_logit_sums(policy),
            vocab,
        )
        del got_grad
    except Exception as e:  # a configuration that does not compile or disagrees: recorded
        return dict(point, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    fwd_ms = bench(lambda: new.token_forward(policy, ref, labels, params))
    bwd_ms = bench(
        lambda: new.token_backward(policy, labels, stats, token_coef, params, inplace=False)
    )
    return dict(point, **_row("new", vocab, fwd_ms, bwd_ms, 2 * nbytes, copy_bw))


def _profile(path: str, rows: int, vocab: int, device) -> None:
    """Where one logits-path fwd+bwd spends its GPU time, kernel by kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from epsdpo_kernels import epsilon_dpo_loss

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shape = (8, max(1, rows // 8), vocab)
    gen = torch.Generator(device=device).manual_seed(0)
    policy = (torch.randn(shape, generator=gen, device=device) * 3).to(torch.bfloat16)
    ref = (policy.float() + 0.1).to(torch.bfloat16)
    labels = torch.randint(0, vocab, shape[:2], generator=gen, device=device)
    labels[:, : shape[1] // 2] = -100

    def step():
        logits = policy.detach().requires_grad_()
        epsilon_dpo_loss(
            logits, ref, labels, beta=0.1, epsilon=0.01, backend="triton"
        ).loss.backward()

    for _ in range(3 if cuda else 1):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(5 if cuda else 1):
            step()
        sync()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    Path(path).write_text(
        f"epsilon_dpo_loss fwd+bwd ×5, logits {shape} bf16, half prompt\n\n" + table
    )
    print(table, flush=True)


def _driver() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
