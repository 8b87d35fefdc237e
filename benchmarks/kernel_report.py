"""Static performance report of the Triton kernels: compiled for a GPU that need not be present.

    python benchmarks/kernel_report.py [--arch 90] [--rows 16384] [--vocab V ...] [--json PATH]

Every kernel is compiled exactly as a real launch at the given shape would compile it: the
launchers (triton_backend/forward.py, backward.py) build the arguments (on meta tensors: real
shapes, no memory) and Triton's own specialisation function turns them into the signature, the
constexprs and the 16-byte alignment/divisibility attributes. For each kernel and dtype the
report gives the cubin's registers, stack and spill bytes (cuobjdump -res-usage, its local loads and
stores), the SASS of the steady-state loop (the backward branch whose body holds the most
MUFU.EX2) per element, and a predicted time range at ``rows × vocab``.

The low end is the roofline: the largest of
- memory: the bytes the kernel must move at the GPU's measured copy bandwidth;
- SFU: MUFU instructions at 16 per clock per SM;
- issue: SASS instructions at 4 warp-instructions (128 thread-instructions) per clock per SM.
It is a lower bound, and on its own it is optimistic. The high end adds what it leaves out:
- the bandwidth real streaming kernels reach, calibrated on published timings (``CALIBRATION``:
  a fit of time = bytes / bandwidth + fixed cost to Liger-Kernel's cross-entropy forward);
- the fixed cost per call from that fit;
- bytes in flight per SM against latency × bandwidth (Little's law): with the registers ptxas
  reports, the programs an SM holds and the loads one loop trip issues bound the bandwidth;
- the wave tail: the last partial wave of programs counted as a whole one.
Margins: the SFU time as a share of the memory time, and the bytes in flight per SM against
what the copy bandwidth needs. Needs no GPU (ptxas and cuobjdump ship with Triton); run it
without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.compiled import (
    compile_launch,
    fp32_divisions,
    hot_loop,
    loop_load_bytes,
    resources,
    sass,
)

# H100 SXM: copy bandwidth as commonly measured on one (~3.0 TB/s of the 3.35 TB/s datasheet
# figure), SMs, boost clock and per-SM limits from the datasheet and CUDA's occupancy tables for
# sm_90. Under a long streaming load the clock sits below boost: ``SUSTAINED_CLOCK_HZ`` (the
# H100 PCIe card's boost, a clock SXM parts are commonly seen holding when power-limited) is the
# report's second clock. Memory time does not depend on it; SFU and issue time do.
H100 = dict(
    name="H100 SXM",
    sms=132,
    clock_hz=1.98e9,
    copy_bytes_per_s=3.0e12,
    datasheet_bytes_per_s=3.35e12,
    sfu_per_clock_per_sm=16,
    issue_per_clock_per_sm=128,
    registers_per_sm=65536,
    threads_per_sm=2048,
    programs_per_sm=32,
    # Loaded DRAM latency: ~0.6-0.8 µs idle on Hopper, about 1 µs under a streaming load.
    dram_latency_s=1.0e-6,
)
# H200: the same GH100 die (132 SMs, 1.98 GHz boost, SFU and issue rates, register file) with
# HBM3e: 4.8 TB/s datasheet, ~4.3 TB/s device copy as commonly measured (about 90% of the
# datasheet, the H100's ratio; not measured here). The bandwidth grows 43% and the SFU rate
# does not, so exponentials that hide behind memory on an H100 may not on an H200.
H200 = dict(H100, name="H200", copy_bytes_per_s=4.3e12, datasheet_bytes_per_s=4.8e12)
GPUS = {"h100": H100, "h200": H200}
SUSTAINED_CLOCK_HZ = 1.755e9
CLOCKS = {"boost": None, "sustained": SUSTAINED_CLOCK_HZ}


def gpu_models(gpus=("h100", "h200"), clocks=("boost", "sustained")) -> list[dict]:
    """The GPU configurations a report predicts for, each named with its clock."""
    out = []
    for key in gpus:
        for clock in clocks:
            gpu = dict(GPUS[key])
            gpu["clock_hz"] = CLOCKS[clock] or gpu["clock_hz"]
            gpu["name"] = f"{gpu['name']} @ {gpu['clock_hz'] / 1e9:.4g} GHz"
            out.append(gpu)
    return out


# Published timings the upper end is calibrated on: Liger-Kernel's cross-entropy forward
# (benchmark/data/all_benchmark_data.csv in github.com/linkedin/Liger-Kernel: kernel
# cross_entropy, provider liger, mode forward, median ms, NVIDIA A100-SXM4-80GB, liger 0.2.1,
# 2024-09-03; fp32 logits of B·T = 16384 rows). That kernel streams each row twice and writes
# it once: 3 · rows · V · 4 bytes. Method: a line time = bytes / bandwidth + fixed cost through
# the smallest and the largest V (the points no cache can help: one row's 16 KB is tiny, one of
# 512 KB far exceeds what stays in L2 between the passes), then the bandwidth as a share of the
# A100's datasheet figure (2.039 TB/s), carried to the H100's.
CALIBRATION = dict(
    source="Liger-Kernel cross_entropy forward, A100-SXM4-80GB, liger 0.2.1 (published)",
    rows=16384,
    bytes_per_element=3 * 4,
    datasheet_bytes_per_s=2.039e12,
    ms_by_vocab={
        4096: 0.5324,
        8192: 0.8101,
        16384: 1.4321,
        32768: 2.8378,
        65536: 6.8051,
        131072: 15.0094,
    },
)


def calibrate(data=CALIBRATION) -> dict:
    """(share of datasheet bandwidth reached, fixed seconds per call) from the end points, and
    each point's time against the line (negative: faster, the multi-pass kernel's cache reuse
    at mid V, which single-pass kernels do not get)."""
    (v0, t0), (v1, t1) = min(data["ms_by_vocab"].items()), max(data["ms_by_vocab"].items())
    nbytes = lambda v: data["rows"] * v * data["bytes_per_element"]  # noqa: E731
    bandwidth = (nbytes(v1) - nbytes(v0)) / ((t1 - t0) * 1e-3)
    fixed_s = t0 * 1e-3 - nbytes(v0) / bandwidth
    residuals = {
        v: t * 1e-3 / (nbytes(v) / bandwidth + fixed_s) - 1 for v, t in data["ms_by_vocab"].items()
    }
    return dict(
        efficiency=bandwidth / data["datasheet_bytes_per_s"],
        fixed_s=fixed_s,
        residuals=residuals,
        bandwidth=bandwidth,
    )


DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def programs_per_sm(registers: int, warps: int, gpu=H100) -> int:
    """Programs one SM holds at once, limited by registers (allocated per warp in units of 256)
    and threads."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = gpu["registers_per_sm"] // (per_warp * warps)
    return max(1, min(by_registers, gpu["threads_per_sm"] // (32 * warps), gpu["programs_per_sm"]))


def time_range(
    *,
    elements,
    bytes_per_element,
    mufu,
    instr,
    registers,
    warps,
    load_bytes,
    programs,
    gpu=H100,
    calibration=None,
) -> dict:
    """The predicted range for one kernel: the roofline (low) and the calibrated bound (high),
    with the terms and margins that make it (see the module docstring)."""
    calibration = calibration or calibrate()
    clock = gpu["sms"] * gpu["clock_hz"]
    memory_s = elements * bytes_per_element / gpu["copy_bytes_per_s"]
    sfu_s = elements * mufu / (gpu["sfu_per_clock_per_sm"] * clock)
    issue_s = elements * instr / (gpu["issue_per_clock_per_sm"] * clock)
    low = max(memory_s, sfu_s, issue_s)
    resident = programs_per_sm(registers, warps, gpu)
    in_flight = resident * 32 * warps * load_bytes  # bytes per SM one loop trip has in flight
    needed = gpu["copy_bytes_per_s"] * gpu["dram_latency_s"] / gpu["sms"]
    streaming = calibration["efficiency"] * gpu["datasheet_bytes_per_s"]
    latency_bound = gpu["sms"] * in_flight / gpu["dram_latency_s"]
    bandwidth = min(streaming, latency_bound)
    waves = programs / (gpu["sms"] * resident)
    tail = -(-programs // (gpu["sms"] * resident)) / waves if programs else 1.0
    high = max(elements * bytes_per_element / bandwidth, sfu_s, issue_s) * tail
    high += calibration["fixed_s"]
    return dict(
        memory_ms=round(memory_s * 1e3, 3),
        sfu_ms=round(sfu_s * 1e3, 3),
        issue_ms=round(issue_s * 1e3, 3),
        bound=("memory", "SFU", "issue")[[memory_s, sfu_s, issue_s].index(low)],
        roofline_fraction=round(memory_s / low, 3),
        low_ms=round(low * 1e3, 3),
        high_ms=round(high * 1e3, 3),
        copy_fraction_range=(round(memory_s / high, 3), round(memory_s / low, 3)),
        sfu_share_of_memory=round(sfu_s / memory_s, 3),
        programs_per_sm=resident,
        in_flight_kb_per_sm=round(in_flight / 1024, 1),
        needed_kb_per_sm=round(needed / 1024, 1),
        wave_tail=round(tail, 3),
    )


def kernel_rows(
    arch: int,
    dtype_name: str,
    rows: int,
    vocab: int,
    softcap: float | None = None,
    wpo: bool = False,
):
    """(name, kernel, launch, elements per loop trip per thread, bytes per element) for every
    kernel at this shape, with the launchers' own arguments; with ``softcap``, the token
    kernels' soft-capped specialisation (Gemma 2's logits) instead, named ``…-softcap``; with
    ``wpo``, the forward and the sequence sums that also compute WPO's terms, named ``…-wpo``."""
    import torch

    from epsdpo_kernels import layout as L
    from epsdpo_kernels.triton_backend.backward import backward_launch
    from epsdpo_kernels.triton_backend.forward import forward_launches
    from epsdpo_kernels.triton_backend.pair_head import pair_head_launch

    dtype = getattr(torch, DTYPES[dtype_name])
    # The logits path's layout: (2B, T, V) with T = 2048.
    t = 2048 if rows % 2048 == 0 else rows
    policy = torch.empty(rows // t, t, vocab, dtype=dtype, device="meta")
    labels = torch.empty(rows // t, t, dtype=torch.long, device="meta")
    stats = torch.empty(L.TOKEN_FIELDS, rows, device="meta")
    partial = torch.empty(2, L.PARTIAL_FIELDS, rows, device="meta")
    element = policy.element_size()
    out = []
    for splits in (1, 2):
        for launch in forward_launches(
            policy,
            policy,
            labels,
            stats,
            partial,
            0.01,
            -100,
            splits,
            logit_softcap=softcap,
            wpo_weights=wpo,
        ):
            kernel = launch[0]
            # A row narrower than two blocks is never split (split_plan): no split launch.
            name = kernel.__name__ + ("-split" if launch[3].get("SPLIT") else "")
            name += "-softcap" if softcap is not None else ""
            name += "-wpo" if wpo else ""
            if any(r[0] == name for r in out):
                continue
            per_trip = launch[3].get("LANES", 1) * launch[3].get("VEC", 1) // (32 * launch[4])
            out.append((name, launch, per_trip, 2 * element))
    if wpo:  # the backward does not change; the sums below gain a term
        return out + _sequence_sums_rows(stats, wpo=True)
    grad_launch = backward_launch(
        policy,
        labels,
        stats,
        torch.empty(rows, device="meta"),
        policy,
        -100,
        splits=1,
        logit_softcap=softcap,
    )
    lanes, vec = grad_launch[3]["LANES"], grad_launch[3]["VEC"]
    name = "token_backward_kernel" + ("-softcap" if softcap is not None else "")
    out.append((name, grad_launch, lanes * vec // (32 * grad_launch[4]), 2 * element))
    if softcap is not None:
        return out  # the sums and the head do not read logits: the same kernels
    out += _sequence_sums_rows(stats)
    # A vocabulary shard's finish, from partials merged over its ranks (vocab_shard.py).
    from epsdpo_kernels.params import LossParams
    from epsdpo_kernels.triton_backend.vocab_shard import finish_launch

    params = LossParams(0.1, 0.01, 0.0, -100, False, "triton", rows)
    maxes = torch.empty(L.SHARD_MAXES, rows, device="meta")
    sums = torch.empty(L.SHARD_SUMS, rows, device="meta")
    out.append(
        ("token_finish_kernel", finish_launch(maxes, sums, labels, stats, params), None, None)
    )
    seq_out = torch.empty(L.SEQUENCE_FIELDS, 32, device="meta")
    pair_launch = pair_head_launch(
        seq_out, torch.empty(L.PAIR_FIELDS, 16, device="meta"), 0.1, 0.01, 0.0, False
    )
    out.append(("pair_head_kernel", pair_launch, None, None))
    return out


def _sequence_sums_rows(stats, wpo: bool = False):
    """The sequence sums' launches at B = 16 pairs of 1024 tokens, padded rows and the same
    packed."""
    import torch

    from epsdpo_kernels import layout as L
    from epsdpo_kernels.sequences import Sequences
    from epsdpo_kernels.triton_backend.sequence_sums import sequence_sums_launch

    seq_labels = torch.empty(32, 1024, dtype=torch.long, device="meta")
    seq_out = torch.empty(L.SEQUENCE_FIELDS, 32, device="meta")
    padded = Sequences(count=32, tokens=32 * 1024, longest=1024)
    index = torch.empty(32 * 1024, dtype=torch.long, device="meta")
    packed = Sequences(
        count=32,
        tokens=32 * 1024,
        longest=1024,
        keys=index,
        order=index,
        offsets=torch.empty(33, dtype=torch.long, device="meta"),
    )
    out = []
    for name, sequences, labels_ in (
        ("sequence_sums_kernel", padded, seq_labels),
        ("sequence_sums_kernel-packed", packed, seq_labels.view(1, -1)),
    ):
        launch = sequence_sums_launch(
            stats[:, : 32 * 1024], labels_, sequences, seq_out, -100, wpo=wpo
        )
        out.append((name + ("-wpo" if wpo else ""), launch, None, None))
    return out


def baseline_rows(dtype_name: str, rows: int, vocab: int):
    """The same for the kernels before the roofline rewrite (baseline_token_kernels.py)."""
    import torch

    from benchmarks import baseline_token_kernels as B

    dtype = getattr(torch, DTYPES[dtype_name])
    t = 2048 if rows % 2048 == 0 else rows
    policy = torch.empty(rows // t, t, vocab, dtype=dtype, device="meta")
    labels = torch.empty(rows // t, t, dtype=torch.long, device="meta")
    stats = torch.empty(B.TOKEN_FIELDS, rows, device="meta")
    coef = torch.empty(rows // t, device="meta")
    element = policy.element_size()
    strides = (policy.stride(0), policy.stride(1))
    block, warps = B.launch_config(vocab, B.MAX_BLOCK_V_FWD)
    forward = (
        B.token_forward_kernel,
        (rows,),
        (
            policy,
            policy,
            labels,
            stats,
            t,
            vocab,
            rows,
            *strides,
            *strides,
            labels.stride(0),
            labels.stride(1),
            0.01,
            -100,
        ),
        dict(BLOCK_V=block),
        warps,
    )
    out = [("baseline token_forward_kernel", forward, block // (32 * warps), 2 * element)]
    block, warps = B.launch_config(vocab, B.MAX_BLOCK_V_BWD)
    backward = (
        B.token_backward_kernel,
        (rows,),
        (
            policy,
            labels,
            stats,
            coef,
            policy,
            t,
            vocab,
            rows,
            *strides,
            labels.stride(0),
            labels.stride(1),
            *strides,
            -100,
        ),
        dict(BLOCK_V=block),
        warps,
    )
    out.append(("baseline token_backward_kernel", backward, block // (32 * warps), 2 * element))
    return out


def _programs(grid) -> int:
    total = 1
    for size in grid:
        total *= size
    return total


def report(
    arch: int,
    dtype_name: str,
    rows: int,
    vocab: int,
    gpu=H100,
    baseline: bool = False,
    softcap: float | None = None,
    gpus=(),
    wpo: bool = False,
) -> list[dict]:
    """One row per kernel: its resources and hot loop, the predicted range on ``gpu`` at the top
    level and, under ``models``, on each of ``gpus`` by name."""
    results = []
    elements = rows * vocab
    kernels = kernel_rows(arch, dtype_name, rows, vocab, softcap, wpo)
    if baseline:
        kernels += baseline_rows(dtype_name, rows, vocab)
    for name, (kernel, _grid, args, constexprs, warps), per_trip, bytes_per_element in kernels:
        compiled = compile_launch(kernel, args, constexprs, warps, arch)
        row = dict(
            kernel=name,
            dtype=dtype_name,
            arch=f"sm_{arch}",
            warps=warps,
            **resources(compiled, arch),
            fp32_divisions=fp32_divisions(compiled),
        )
        loop = hot_loop(sass(compiled))
        if loop is not None and per_trip:
            instr = len(loop) / per_trip
            mufu = sum(op == "MUFU.EX2" for _, op, _ in loop) / per_trip
            # Every SFU op (the soft cap adds a reciprocal to each exponential): the SFU time.
            sfu_ops = sum(op.startswith("MUFU.") for _, op, _ in loop) / per_trip
            load_bytes = loop_load_bytes(loop)
            terms = dict(
                elements=elements,
                bytes_per_element=bytes_per_element,
                mufu=sfu_ops,
                instr=instr,
                registers=row["registers"],
                warps=warps,
                load_bytes=load_bytes,
                programs=_programs(_grid),
            )
            row.update(
                loop_instructions=len(loop),
                elements_per_trip=per_trip,
                instructions_per_element=round(instr, 2),
                mufu_per_element=round(mufu, 3),
                sfu_ops_per_element=round(sfu_ops, 3),
                shuffles_or_barriers_in_loop=sum(
                    op.startswith(("SHFL", "BAR")) for _, op, _ in loop
                ),
                loop_load_bytes_per_thread=load_bytes,
                **time_range(**terms, gpu=gpu),
                models={g["name"]: time_range(**terms, gpu=g) for g in gpus},
            )
        results.append(row)
    return results


def markdown(results: list[dict], rows: int, vocabs, gpus=None) -> str:
    """One table of predictions per GPU configuration (``gpu_models``), then the resources."""
    fit = calibrate()
    mid = min(fit["residuals"].values())
    lines = [
        f"Model: {rows} token rows. Per element = per (h, g) pair in the forward, per logit in "
        "the backward. Low end: the roofline (max of memory at copy bandwidth, SFU, issue). "
        f"High end: calibrated streaming bandwidth ({fit['efficiency']:.1%} of datasheet) or what "
        "the bytes in flight sustain, whichever is lower, the wave tail, and "
        f"{fit['fixed_s'] * 1e6:.0f} µs per call. Calibration: {CALIBRATION['source']}; its mid-V "
        f"points run up to {-mid:.0%} faster than the fitted line (a second pass over rows still "
        "in L2)."
    ]
    for gpu in gpus or [H100]:
        lines += [
            "",
            f"**{gpu['name']}** ({gpu['sms']} SMs, {gpu['copy_bytes_per_s'] / 1e12:.1f} TB/s copy, "
            f"{fit['efficiency'] * gpu['datasheet_bytes_per_s'] / 1e12:.2f} TB/s calibrated "
            f"streaming, {gpu['dram_latency_s'] * 1e6:.1f} µs loaded latency)",
            "",
            "| V | kernel | dtype | regs | loop instr / elt | MUFU / elt | shfl+bar in loop "
            "| SFU / memory time | in flight / needed per SM | predicted ms | % of copy BW "
            "| bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if "loop_instructions" not in r:
                continue
            m = r["models"].get(gpu["name"], r) if gpus else r
            low, high = m["copy_fraction_range"]
            lines.append(
                f"| {r['vocab']} | {r['kernel']} | {r['dtype']} | {r['registers']} | "
                f"{r['instructions_per_element']} | {r['mufu_per_element']} | "
                f"{r['shuffles_or_barriers_in_loop']} | {m['sfu_share_of_memory']:.0%} | "
                f"{m['in_flight_kb_per_sm']:g} / {m['needed_kb_per_sm']:g} KB "
                f"({m['programs_per_sm']} programs) | {m['low_ms']}-{m['high_ms']} | "
                f"{low:.0%}-{high:.0%} | {m['bound']} |"
            )
    lines += [
        "",
        "Resources of every kernel (spills must be 0):",
        "",
        "| V | kernel | dtype | arch | warps | regs | spill B | fp32 divisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        divisions = ", ".join(f"{k} ×{n}" for k, n in r["fp32_divisions"].items()) or "none"
        lines.append(
            f"| {r['vocab']} | {r['kernel']} | {r['dtype']} | {r['arch']} | "
            f"{r['warps']} | {r['registers']} | {r['spill_bytes']} | "
            f"{divisions} |"
        )
    return "\n".join(lines)


# The vocabularies the report covers by default: Llama 2 / Mistral, GPT-2 (rows not 16-byte
# aligned), Llama 3, Qwen 2, Gemma.
VOCABS = (32000, 50257, 128256, 151936, 256000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=[80, 90])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--gpu", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument(
        "--clock",
        nargs="+",
        default=list(CLOCKS),
        choices=list(CLOCKS),
        help=f"boost (1.98 GHz) and/or sustained ({SUSTAINED_CLOCK_HZ / 1e9:.4g} GHz)",
    )
    parser.add_argument(
        "--softcap",
        type=float,
        default=None,
        help="report the token kernels' soft-capped specialisation (e.g. 30: Gemma 2)",
    )
    parser.add_argument(
        "--wpo",
        action="store_true",
        help="report the forward and sequence sums that also compute WPO's weights",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also report the kernels before the roofline rewrite",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real kernels")
    gpus = gpu_models(args.gpu, args.clock)
    results = [
        dict(r, vocab=v)
        for v in args.vocab
        for dt in args.dtype
        for r in report(
            args.arch,
            dt,
            args.rows,
            v,
            gpu=gpus[0],
            baseline=args.baseline,
            softcap=args.softcap,
            gpus=gpus,
            wpo=args.wpo,
        )
    ]
    print(markdown(results, args.rows, args.vocab, gpus))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
