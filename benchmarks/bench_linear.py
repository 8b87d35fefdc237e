"""``linear_epsilon_dpo_loss`` against the matrix products it is made of, on one GPU.

    python benchmarks/bench_linear.py --json linear.json        # on CUDA, bf16
    python benchmarks/bench_linear.py --dry-run --tokens 64 --hidden 32 --vocab 300

The linear path's cost is its GEMMs (docs/API.md): policy and reference logits, their recompute
in the backward, ∂hidden and ∂weight, five units of 2·S·H·V against a floor of four (no
recompute). This times, in one process on the same inputs, one forward + backward of the loss,
the same five products alone (full-size ``torch.mm`` in the input dtype), and the floor of four;
the ratios say what the fused loss adds over its GEMMs and over the floor. Every token is scored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="scored tokens S (2B·T)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU tensors through Triton's interpreter, one timed call each (times meaningless)",
    )
    args = parser.parse_args(argv)
    if min(args.tokens, args.hidden, *args.vocab) < 1:
        parser.error("--tokens, --hidden and --vocab must be ≥ 1")
    from benchmarks.devices import benchmark_device

    device = benchmark_device(parser, args.dry_run)
    import torch
    import triton

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:

        def bench(f):
            start = time.perf_counter()
            f()
            return (time.perf_counter() - start) * 1e3
    else:

        def bench(f):
            return triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")

    result = dict(
        device="dry run (CPU interpreter)" if args.dry_run else torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
        dtype=str(dtype).removeprefix("torch."),
        tokens=args.tokens,
        hidden=args.hidden,
        rows=[],
    )
    for vocab in args.vocab:
        result["rows"].append(_one_vocab(args.tokens, args.hidden, vocab, dtype, device, bench))
        row = result["rows"][-1]
        print(
            f"V={vocab}: loss {row['loss_ms']:.2f} ms, its 5 GEMMs {row['gemms_ms']:.2f} ms, "
            f"floor of 4 {row['floor_ms']:.2f} ms: {row['loss_over_gemms']:.2f}× the GEMMs, "
            f"{row['loss_over_floor']:.2f}× the floor",
            flush=True,
        )
        if args.json:  # after every row: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _one_vocab(s, h, v, dtype, device, bench) -> dict:
    import torch

    from epsdpo_kernels import linear_epsilon_dpo_loss

    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2, s // 2, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) / h**0.5).to(dtype)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=gen, device=device).to(dtype)
    ref_weight = weight + (0.1 / h**0.5) * torch.randn(
        weight.shape, generator=gen, device=device
    ).to(dtype)
    labels = torch.randint(0, v, (2, s // 2), generator=gen, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def loss_step():
        linear_epsilon_dpo_loss(
            hidden, weight, ref_hidden, ref_weight, labels, beta=0.1, epsilon=0.01, backend="triton"
        ).loss.backward()

    x, rx, w, rw = (
        t.detach().reshape(-1, t.shape[-1]) for t in (hidden, ref_hidden, weight, ref_weight)
    )
    logits = torch.empty(x.shape[0], v, device=device, dtype=dtype)
    grad_x = torch.empty_like(x)
    grad_w = torch.empty_like(w)

    def products(recompute: bool):
        torch.mm(x, w.t(), out=logits)  # policy logits
        torch.mm(rx, rw.t(), out=logits)  # reference logits
        if recompute:
            torch.mm(x, w.t(), out=logits)  # the backward's recompute
        torch.mm(logits, w, out=grad_x)  # ∂hidden
        torch.mm(logits.t(), x, out=grad_w)  # ∂weight

    loss_step()  # warm-up: compilation, autotuning
    row = dict(
        vocab=v,
        loss_ms=bench(
            lambda: (loss_step(), setattr(hidden, "grad", None), setattr(weight, "grad", None))
        ),
        gemms_ms=bench(lambda: products(True)),
        floor_ms=bench(lambda: products(False)),
    )
    row["loss_over_gemms"] = row["loss_ms"] / row["gemms_ms"]
    row["loss_over_floor"] = row["loss_ms"] / row["floor_ms"]
    row["floor_tflops_per_s"] = 4 * 2 * s * h * v / (row["floor_ms"] * 1e-3) / 1e12
    return row


if __name__ == "__main__":
    sys.exit(main())
