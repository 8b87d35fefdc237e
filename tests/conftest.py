"""Test setup: run the Triton path through the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of conftest.
With a GPU, tests run on CUDA tensors and compiled kernels instead (``EPSDPO_TEST_DEVICE=cpu``
forces the interpreter even there).

The suite runs on two xdist workers (``-n 2 --dist loadgroup``). Every test that spawns ranks or
processes that talk to each other carries ``@pytest.mark.xdist_group("multi_process")``: that
group runs on one worker, one test at a time, so no two multi-process tests ever overlap.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each of the run's xdist workers is one of the machine's cores: torch's own threads would
    # contend with the other worker (and the ranks a test spawns inherit this too).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if os.environ.get("EPSDPO_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = torch.device("cpu")
else:
    DEVICE = torch.device("cuda")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.helpers.interpreter import interpreter_incompatibility, interpreter_problem  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("EPSDPO_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("default")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (in a worker, after xdist's own hook), refuse to run if xdist
    did not tag the grouped tests (pytest-xdist 3.8 renames ``item._nodeid``, which pytest 9.2
    no longer reads): multi-process tests would silently run two at a time."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"pytest-xdist did not group {item.nodeid} (pytest {pytest.__version__}): "
                "install the versions the test extra pins (pytest<9.2)"
            )


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed only because the interpreter cannot run here is reported as skipped,
    with the reason, once a probe kernel confirms the environment is the cause."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        if interpreter_incompatibility(call.excinfo.value) and interpreter_problem():
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
