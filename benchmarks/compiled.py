"""What a compiled Triton kernel is made of, read without a GPU: the tools Triton ships
(ptxas, cuobjdump) run on the PTX and cubin of a compilation with a real launch's
specialisation. ``kernel_report.py`` builds its report from these, and the tests hold the kernels
to it (registers, spills, the steady-state loop's instructions, exact divisions).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


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


# Keyword arguments of a launch that are compiler options, not kernel parameters.
LAUNCH_OPTIONS = ("maxnreg", "num_stages")


def compile_launch(kernel, args, constexprs: dict, num_warps: int, arch: int):
    """Compile ``kernel`` for ``sm_{arch}`` with the specialisation ``kernel[grid](*args,
    **constexprs)`` gets on a real launch (Triton's own rules: 16-byte-aligned pointers and
    integers divisible by 16 carry tt.divisibility, integers equal to 1 become constants)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    # Launch options travel in the launch's keyword arguments beside the constexprs.
    options = {"num_warps": num_warps}
    constexprs = dict(constexprs)
    for name in LAUNCH_OPTIONS:
        if name in constexprs:
            options[name] = constexprs.pop(name)
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
    # Constexprs the launch leaves to their defaults (a real launch fills them in; Triton 3.9's
    # ASTSource does not, and fails on the missing value).
    for param in kernel.params:
        if param.is_constexpr and param.name not in constexprs and param.has_default:
            constexprs[param.name] = param.default
    for name, value in constexprs.items():
        signature[name] = "constexpr"
        constants[(kernel.arg_names.index(name),)] = value
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs=constants, attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(compiled, flag: str) -> str:
    """``cuobjdump <flag>`` of the cubin Triton produced (the binary a launch runs)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        proc = subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return proc.stdout + proc.stderr


def resources(compiled, arch: int) -> dict:
    """The resources of the cubin Triton produced, as ``cuobjdump -res-usage`` reads them
    (registers, stack frame and local memory bytes per thread: what ptxas gave it with
    Triton's own flags, not a re-run of ptxas), and its spill traffic: the bytes its SASS moves
    with local loads and stores (LDL/STL), which a spill-free kernel has none of."""
    usage = _cuobjdump(compiled, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found is None:
        # Without a register count "0 spills" would mean nothing: stop here, saying why.
        raise RuntimeError(f"cuobjdump gave no register count for sm_{arch}: {usage[-2000:]}")
    spill_bytes = sum(
        next((b for k, b in _LOAD_BYTES.items() if k in op), 4)
        for _, op, _ in sass(compiled)
        if op.startswith(("LDL", "STL"))
    )
    registers, stack, local = (int(x) for x in found.groups())
    return dict(registers=registers, stack_bytes=stack, local_bytes=local, spill_bytes=spill_bytes)


def fp32_divisions(compiled) -> dict[str, int]:
    """PTX fp32 division instructions by kind: ``div.rn.f32`` is correctly rounded,
    ``div.full.f32`` (what Triton's ``/`` gives) and ``div.approx.f32`` are not."""
    kinds = re.findall(r"\b(div\.(?:rn|full|approx)(?:\.ftz)?\.f32)\b", compiled.asm["ptx"])
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(compiled) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] of the kernel's SASS."""
    text = _cuobjdump(compiled, "-sass")
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


_LOAD_BYTES = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


def loop_load_bytes(loop) -> int:
    """Bytes one thread's global loads request in one trip of the loop (LDG widths from the
    SASS: .128 is 16 bytes, none is 4)."""
    total = 0
    for _, op, _ in loop:
        if op.startswith("LDG"):
            total += next((b for k, b in _LOAD_BYTES.items() if k in op), 4)
    return total
