"""Every Triton kernel compiles to PTX and a cubin for sm_80 and sm_90, fp32, bf16 and fp16.

The interpreter accepts code that real compilation rejects (types, scalar/tensor mixing in
loops, unsupported ops), so this runs the real compiler, with no GPU needed. It runs in a
subprocess without TRITON_INTERPRET: under the interpreter, @triton.jit returns interpreted
functions that the compiler cannot take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = [80, 90]
DTYPES = ["fp32", "bf16", "fp16"]
# Below one block, between blocks, one full block at 32k, many blocks at 128k.
VOCABS = [507, 5000, 32000, 128256]

_COMPILE_ALL = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from epsdpo_kernels.pair_head_kernel import pair_head_kernel
from epsdpo_kernels.token_kernels import (MAX_BLOCK_V_BWD, MAX_BLOCK_V_FWD, launch_config,
                                          token_backward_kernel, token_forward_kernel)

archs, dtypes, vocabs = (json.loads(a) for a in sys.argv[1:4])
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Shapes as i32; strides as i64, since they pass 2^31 at 128k vocabularies and long sequences.
shapes = {"T": "i32", "V": "i32", "n_rows": "i32"}
strides = lambda *names: {n: "i64" for n in names}
jobs = []
for arch in archs:
    for dt in dtypes:
        for v in vocabs:
            block, warps = launch_config(v, MAX_BLOCK_V_FWD)
            jobs.append((f"token_forward-sm{arch}-{dt}-V{v}", arch, warps, token_forward_kernel, {
                "policy_ptr": f"*{dt}", "ref_ptr": f"*{dt}", "labels_ptr": "*i64",
                "stats_ptr": "*fp32", **shapes,
                **strides("stride_pn", "stride_pt", "stride_rn", "stride_rt",
                          "stride_ln", "stride_lt"),
                "epsilon": "fp32", "ignore_index": "i32"}, {"BLOCK_V": block}))
            block, warps = launch_config(v, MAX_BLOCK_V_BWD)
            name = f"token_backward-sm{arch}-{dt}-V{v}"
            jobs.append((name, arch, warps, token_backward_kernel, {
                "policy_ptr": f"*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32",
                "row_coef_ptr": "*fp32", "grad_ptr": f"*{dt}", **shapes,
                **strides("stride_pn", "stride_pt", "stride_ln", "stride_lt",
                          "stride_gn", "stride_gt"),
                "ignore_index": "i32"}, {"BLOCK_V": block}))
    for average in (False, True):
        for lab in ("i64", "i32"):
            name = f"pair_head-sm{arch}-labels{lab}-avg{average}"
            jobs.append((name, arch, 4, pair_head_kernel, {
                "stats_ptr": "*fp32", "labels_ptr": f"*{lab}", "out_ptr": "*fp32",
                "B": "i32", "T": "i32", "n_rows": "i32", **strides("stride_ln", "stride_lt"),
                "beta": "fp32", "epsilon": "fp32", "label_smoothing": "fp32",
                "ignore_index": "i32"}, {"AVERAGE_LOG_PROB": average, "BLOCK_T": 1024}))
results = {}
for name, arch, warps, kernel, sig, constexprs in jobs:
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        result = {"ptx": len(c.asm["ptx"]), "cubin": len(c.asm["cubin"])}
        # ptxas's static resource report for the same PTX: registers and spill bytes.
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(c.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
        regs = re.findall(r"Used (\d+) registers", out.stderr)
        result.update(spill_bytes=sum(spills) if spills else None,
                      registers=int(regs[0]) if regs else None)
        results[name] = result
    except Exception as e:  # reported per kernel by the test
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_ALL, json.dumps(ARCHS), json.dumps(DTYPES),
         json.dumps(VOCABS)],
        capture_output=True, text=True, env=env, cwd=root, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_names():
    names = []
    for arch in ARCHS:
        for dt in DTYPES:
            names += [
                f"token_{d}-sm{arch}-{dt}-V{v}" for d in ("forward", "backward") for v in VOCABS
            ]
        names += [
            f"pair_head-sm{arch}-labels{lab}-avg{avg}"
            for avg in (False, True)
            for lab in ("i64", "i32")
        ]
    return names


@pytest.mark.parametrize("name", _expected_names())
def test_kernel_compiles_to_cubin_without_spills(compiled, name):
    """Compiles with the launcher's own BLOCK_V and num_warps; ptxas reports no register spills
    (a spill in a streaming kernel turns register traffic into local-memory traffic)."""
    result = compiled[name]
    assert "error" not in result, result.get("error")
    assert result["ptx"] > 0 and result["cubin"] > 0
    assert result["spill_bytes"] == 0, result
