"""Test setup: run the Triton path through the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of conftest.
With a GPU, tests run on CUDA tensors and compiled kernels instead (``EPSDPO_TEST_DEVICE=cpu``
forces the interpreter even there).
"""

import functools
import os

import torch

if os.environ.get("EPSDPO_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = torch.device("cpu")
else:
    DEVICE = torch.device("cuda")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("EPSDPO_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("default")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# The error Triton's interpreter (3.6 and earlier) raises under NumPy ≥ 2.3, which no longer
# converts 1-element arrays to Python scalars; GPU images ship such NumPy.
_NUMPY_SCALAR_ERROR = "can be converted to Python scalars"


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


def _interpreter_incompatibility(error: BaseException | None) -> bool:
    while error is not None:
        if type(error).__name__ == "InterpreterError" and _NUMPY_SCALAR_ERROR in str(error):
            return True
        group = getattr(error, "exceptions", None)  # an exception group (hypothesis uses them)
        if isinstance(group, (list, tuple)) and group:
            return all(_interpreter_incompatibility(e) for e in group)
        error = error.__cause__ or error.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed only because the interpreter cannot run here is reported as skipped,
    with the reason, once a probe kernel confirms the environment is the cause."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        if _interpreter_incompatibility(call.excinfo.value) and interpreter_problem():
            report.outcome = "skipped"
            report.longrepr = (
                str(item.path),
                item.location[1] or 0,
                f"Skipped: {interpreter_problem()}",
            )


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    """Fill torch.empty allocations with NaN, so an output a kernel forgets to write shows up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)
