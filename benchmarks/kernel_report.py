"""Static performance report of the Triton kernels: compiled for a GPU that need not be present.

    python benchmarks/kernel_report.py [--arch 90] [--rows 16384] [--vocab 128256] [--json PATH]

Every kernel is compiled exactly as a real launch at the given shape would compile it: the
launchers in token_kernels.py build the arguments (on meta tensors: real shapes, no memory) and
Triton's own specialisation function turns them into the signature, the constexprs and the
16-byte alignment/divisibility attributes. For each kernel and dtype the report gives ptxas's
registers and spill bytes, the SASS of the steady-state loop (the backward branch whose body
holds the most MUFU.EX2) per element, and a time model at ``rows × vocab``:

- memory: the bytes the kernel must move at the GPU's measured copy bandwidth;
- SFU: MUFU instructions at 16 per clock per SM;
- issue: SASS instructions at 4 warp-instructions (128 thread-instructions) per clock per SM.

The largest of the three bounds the kernel; memory time over it is the best fraction of the
copy bandwidth the design allows. Needs no GPU (ptxas and cuobjdump ship with Triton); run it
without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# H100 SXM: copy bandwidth as commonly measured on one (~3.0 TB/s of the 3.35 TB/s datasheet
# figure), SMs and boost clock from the datasheet (1.98 GHz; 1.755 GHz is the PCIe card's).
H100 = dict(
    name="H100 SXM",
    sms=132,
    clock_hz=1.98e9,
    copy_bytes_per_s=3.0e12,
    sfu_per_clock_per_sm=16,
    issue_per_clock_per_sm=128,
)
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _tool(name: str, arch: int = 90) -> str:
    """The path of the CUDA tool Triton itself uses for ``sm_{arch}``. Each Triton release pins
    its own PTX ISA and ships the ptxas that accepts it (Triton 3.9 emits PTX 9.x, which only its
    CUDA 13 ``ptxas-blackwell`` reads, also for sm_90): a fixed path would feed one release's PTX
    to another's ptxas."""
    from triton.backends.nvidia import compiler

    if name == "ptxas" and hasattr(compiler, "get_ptxas"):
        return compiler.get_ptxas(arch).path
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except (ImportError, AttributeError):  # releases before knobs: the bundled binaries
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(kernel, args, constexprs: dict, num_warps: int, arch: int):
    """Compile ``kernel`` for ``sm_{arch}`` with the specialisation ``kernel[grid](*args,
    **constexprs)`` gets on a real launch (Triton's own rules: 16-byte-aligned pointers and
    integers divisible by 16 carry tt.divisibility, integers equal to 1 become constants)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constants, attrs = {}, {}, {}
    runtime = [p for p in kernel.params if not p.is_constexpr]
    assert len(runtime) == len(args), (kernel.__name__, len(runtime), len(args))
    for param, arg in zip(runtime, args):
        index = (kernel.arg_names.index(param.name),)
        kind, attr = native_specialize_impl(
            CUDABackend,
            arg,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constants[index] = attr
        elif isinstance(attr, str):
            attrs[index] = CUDABackend.parse_attr(attr)
    for name, value in constexprs.items():
        signature[name] = "constexpr"
        constants[(kernel.arg_names.index(name),)] = value
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs=constants, attrs=attrs
    )
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )


def resources(compiled, arch: int) -> dict:
    """ptxas's registers and spill bytes for the compiled PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    ptxas = _tool("ptxas", arch)
    proc = subprocess.run(
        [ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    os.unlink(f.name)
    out = proc.stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    regs = re.findall(r"Used (\d+) registers", out)
    if proc.returncode != 0 or not regs:
        # Without a register count "0 spills" would mean nothing: stop here, saying why.
        raise RuntimeError(f"{ptxas} gave no register count for {gpu}: {out.strip()[-2000:]}")
    return dict(registers=int(regs[0]), spill_bytes=sum(spills))


def fp32_divisions(compiled) -> dict[str, int]:
    """PTX fp32 division instructions by kind: ``div.rn.f32`` is correctly rounded,
    ``div.full.f32`` (what Triton's ``/`` gives) and ``div.approx.f32`` are not."""
    kinds = re.findall(r"\b(div\.(?:rn|full|approx)(?:\.ftz)?\.f32)\b", compiled.asm["ptx"])
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(compiled) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] of the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    text = subprocess.run(
        [_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True
    ).stdout
    os.unlink(f.name)
    return [(int(a, 16), op, rest) for a, op, rest in _INSTR.findall(text)]


def hot_loop(instrs) -> list[tuple[int, str, str]] | None:
    """The steady-state loop: of the loops (backward branches), the one whose body holds the
    most MUFU.EX2, ties to the longer; None for straight-line code."""
    loops = []
    for addr, op, rest in instrs:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            body = [i for i in instrs if int(target.group(1), 16) <= i[0] <= addr]
            loops.append((sum(i[1] == "MUFU.EX2" for i in body), len(body), body))
    return max(loops, key=lambda x: x[:2])[2] if loops else None


def kernel_rows(arch: int, dtype_name: str, rows: int, vocab: int):
    """(name, kernel, launch, elements per loop trip per thread, bytes per element) for every
    kernel at this shape, with the launchers' own arguments."""
    import torch

    from epsdpo_kernels import token_kernels as K
    from epsdpo_kernels.pair_head_kernel import pair_head_launch

    dtype = getattr(torch, DTYPES[dtype_name])
    # The logits path's layout: (2B, T, V) with T = 2048.
    t = 2048 if rows % 2048 == 0 else rows
    policy = torch.empty(rows // t, t, vocab, dtype=dtype, device="meta")
    labels = torch.empty(rows // t, t, dtype=torch.long, device="meta")
    stats = torch.empty(6, rows, device="meta")
    partial = torch.empty(2, K.N_PARTIAL, rows, device="meta")
    element = policy.element_size()
    out = []
    for splits in (1, 2):
        for launch in K.forward_launches(
            policy, policy, labels, stats, partial, 0.01, -100, splits
        ):
            kernel = launch[0]
            name = kernel.__name__ + (
                "-split" if splits > 1 and kernel is K.token_forward_kernel else ""
            )
            if any(r[0] == name for r in out):
                continue
            per_trip = launch[3].get("LANES", 1) * launch[3].get("VEC", 1) // (32 * launch[4])
            out.append((name, launch, per_trip, 2 * element))
    grad_launch = K.backward_launch(
        policy, labels, stats, torch.empty(rows // t, device="meta"), policy, -100, splits=1
    )
    lanes, vec = grad_launch[3]["LANES"], grad_launch[3]["VEC"]
    out.append(
        ("token_backward_kernel", grad_launch, lanes * vec // (32 * grad_launch[4]), 2 * element)
    )
    pair_labels = torch.empty(32, 1024, dtype=torch.long, device="meta")
    pair_out = torch.empty(18, 16, device="meta")
    pair_launch = pair_head_launch(
        stats[:, : 32 * 1024], pair_labels, pair_out, 0.1, 0.01, 0.0, -100, False
    )
    out.append(("pair_head_kernel", pair_launch, None, None))
    return out


def baseline_rows(dtype_name: str, rows: int, vocab: int):
    """The same for the kernels before the roofline rewrite (baseline_token_kernels.py)."""
    import torch

    from benchmarks import baseline_token_kernels as B

    dtype = getattr(torch, DTYPES[dtype_name])
    t = 2048 if rows % 2048 == 0 else rows
    policy = torch.empty(rows // t, t, vocab, dtype=dtype, device="meta")
    labels = torch.empty(rows // t, t, dtype=torch.long, device="meta")
    stats = torch.empty(6, rows, device="meta")
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


def report(
    arch: int, dtype_name: str, rows: int, vocab: int, gpu=H100, baseline: bool = False
) -> list[dict]:
    results = []
    elements = rows * vocab
    kernels = kernel_rows(arch, dtype_name, rows, vocab)
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
            shuffles = sum(op.startswith(("SHFL", "BAR")) for _, op, _ in loop)
            memory_s = elements * bytes_per_element / gpu["copy_bytes_per_s"]
            sfu_s = elements * mufu / (gpu["sfu_per_clock_per_sm"] * gpu["sms"] * gpu["clock_hz"])
            issue_s = (
                elements * instr / (gpu["issue_per_clock_per_sm"] * gpu["sms"] * gpu["clock_hz"])
            )
            bound = max(memory_s, sfu_s, issue_s)
            row.update(
                loop_instructions=len(loop),
                elements_per_trip=per_trip,
                instructions_per_element=round(instr, 2),
                mufu_per_element=round(mufu, 3),
                shuffles_or_barriers_in_loop=shuffles,
                memory_ms=round(memory_s * 1e3, 3),
                sfu_ms=round(sfu_s * 1e3, 3),
                issue_ms=round(issue_s * 1e3, 3),
                bound=("memory", "SFU", "issue")[[memory_s, sfu_s, issue_s].index(bound)],
                roofline_fraction=round(memory_s / bound, 3),
            )
        results.append(row)
    return results


def markdown(results: list[dict], rows: int, vocab: int, gpu=H100) -> str:
    lines = [
        f"Model: {rows} token rows × V = {vocab}, {gpu['name']} ({gpu['sms']} SMs, "
        f"{gpu['clock_hz'] / 1e9:.3g} GHz, {gpu['copy_bytes_per_s'] / 1e12:.1f} TB/s copy). "
        "Per element = per (h, g) pair in the forward, per logit in the backward.",
        "",
        "| kernel | dtype | arch | warps | regs | spill B | loop instr / elt | MUFU / elt "
        "| shfl+bar in loop | memory ms | SFU ms | issue ms | bound | best % of copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "loop_instructions" in r:
            model = (
                f"{r['instructions_per_element']} | {r['mufu_per_element']} | "
                f"{r['shuffles_or_barriers_in_loop']} | {r['memory_ms']} | {r['sfu_ms']} | "
                f"{r['issue_ms']} | {r['bound']} | {r['roofline_fraction']:.0%}"
            )
        else:
            model = "— | — | — | — | — | — | — | no loop over V"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['warps']} | "
            f"{r['registers']} | {r['spill_bytes']} | {model} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=[80, 90])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also report the kernels before the roofline rewrite",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real kernels")
    results = [
        r
        for dt in args.dtype
        for r in report(args.arch, dt, args.rows, args.vocab, baseline=args.baseline)
    ]
    print(markdown(results, args.rows, args.vocab))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
