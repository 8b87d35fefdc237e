"""Whether Triton's CPU interpreter can run here, and which failures come from its not running."""

from __future__ import annotations

import functools

# The error Triton's interpreter (3.6 and earlier) raises under NumPy ≥ 2.3 (GPU images ship
# such NumPy); the library names the fix when it meets it.
from epsdpo_kernels.triton_backend.launch import NUMPY_SCALAR_ERROR as _NUMPY_SCALAR_ERROR


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run kernels in this environment, or None. Decided by
    running a probe kernel of the constructs ours use (a scalar load, a branch on it, a loop),
    in a subprocess so that this process's TRITON_INTERPRET setting does not matter."""
    import subprocess
    import sys

    probe = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def probe(x_ptr, n):\n"
        "    i = tl.program_id(0).to(tl.int64)\n"
        "    v = tl.load(x_ptr + i)\n"
        "    if v == n:\n"
        "        return\n"
        "    for k in range(0, n, 1):\n"
        "        tl.store(x_ptr + i, v + 1)\n"
        "probe[(2,)](torch.zeros(2, dtype=torch.int64), 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    import numpy
    import triton

    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
    return (
        f"Triton {triton.__version__}'s CPU interpreter cannot run under NumPy "
        f"{numpy.__version__} ({last}); NumPy < 2.3 (the test extra's pin) or a Triton whose "
        "interpreter supports it runs these tests"
    )


def interpreter_incompatibility(error: BaseException | None) -> bool:
    while error is not None:
        if type(error).__name__ == "InterpreterError" and _NUMPY_SCALAR_ERROR in str(error):
            return True
        group = getattr(error, "exceptions", None)  # an exception group (hypothesis uses them)
        if isinstance(group, (list, tuple)) and group:
            return all(interpreter_incompatibility(e) for e in group)
        error = error.__cause__ or error.__context__
    return False
