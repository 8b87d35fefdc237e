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

_COMPILE_ALL = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from epsdpo_kernels.pair_head_kernel import pair_head_kernel
from epsdpo_kernels.token_kernels import (MAX_BLOCK_V_BWD, MAX_BLOCK_V_FWD, token_backward_kernel,
                                          token_forward_kernel)

archs, dtypes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
# Shapes as i32; strides as i64, since they pass 2^31 at 128k vocabularies and long sequences.
shapes = {"T": "i32", "V": "i32", "n_rows": "i32"}
strides = lambda *names: {n: "i64" for n in names}
jobs = []
for arch in archs:
    for dt in dtypes:
        for block in (64, MAX_BLOCK_V_FWD):
            jobs.append((f"token_forward-sm{arch}-{dt}-BLOCK{block}", arch, token_forward_kernel, {
                "policy_ptr": f"*{dt}", "ref_ptr": f"*{dt}", "labels_ptr": "*i64",
                "stats_ptr": "*fp32", **shapes,
                **strides("stride_pn", "stride_pt", "stride_rn", "stride_rt",
                          "stride_ln", "stride_lt"),
                "epsilon": "fp32", "ignore_index": "i32"}, {"BLOCK_V": block}))
        for block in (64, MAX_BLOCK_V_BWD):
            name = f"token_backward-sm{arch}-{dt}-BLOCK{block}"
            jobs.append((name, arch, token_backward_kernel, {
                "policy_ptr": f"*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32",
                "row_coef_ptr": "*fp32", "grad_ptr": f"*{dt}", **shapes,
                **strides("stride_pn", "stride_pt", "stride_ln", "stride_lt",
                          "stride_gn", "stride_gt"),
                "ignore_index": "i32"}, {"BLOCK_V": block}))
    for average in (False, True):
        for lab in ("i64", "i32"):
            jobs.append((f"pair_head-sm{arch}-labels{lab}-avg{average}", arch, pair_head_kernel, {
                "stats_ptr": "*fp32", "labels_ptr": f"*{lab}", "out_ptr": "*fp32",
                "B": "i32", "T": "i32", "n_rows": "i32", **strides("stride_ln", "stride_lt"),
                "beta": "fp32", "epsilon": "fp32", "label_smoothing": "fp32",
                "ignore_index": "i32"}, {"AVERAGE_LOG_PROB": average, "BLOCK_T": 1024}))
results = {}
for name, arch, kernel, sig, constexprs in jobs:
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        results[name] = {"ptx": len(c.asm["ptx"]), "cubin": len(c.asm["cubin"])}
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
        [sys.executable, "-c", _COMPILE_ALL, json.dumps(ARCHS), json.dumps(DTYPES)],
        capture_output=True, text=True, env=env, cwd=root, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_names():
    names = []
    for arch in ARCHS:
        for dt in DTYPES:
            names += [f"token_forward-sm{arch}-{dt}-BLOCK{b}" for b in (64, 4096)]
            names += [f"token_backward-sm{arch}-{dt}-BLOCK{b}" for b in (64, 8192)]
        names += [
            f"pair_head-sm{arch}-labels{lab}-avg{avg}"
            for avg in (False, True)
            for lab in ("i64", "i32")
        ]
    return names


@pytest.mark.parametrize("name", _expected_names())
def test_kernel_compiles_to_cubin(compiled, name):
    result = compiled[name]
    assert "error" not in result, result.get("error")
    assert result["ptx"] > 0 and result["cubin"] > 0
