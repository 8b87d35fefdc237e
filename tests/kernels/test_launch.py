"""Every Triton launch runs on its tensors' device (Triton itself uses the current device)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import epsdpo_kernels
from epsdpo_kernels import epsilon_dpo_loss
from epsdpo_kernels.triton_backend import launch
from tests.helpers.batches import make_batch

PACKAGE = Path(epsdpo_kernels.__file__).parent


def test_guard_makes_the_tensors_device_current():
    guard = launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(launch.device_guard(torch.device("cpu")), torch.cuda.device)


def test_no_launch_bypasses_the_guard():
    """``kernel[grid](...)`` appears in launch.py only."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                assert path.name == "launch.py", f"{path.name}:{node.lineno} launches unguarded"


def test_every_launch_of_a_loss_call_is_guarded_with_its_device(monkeypatch, device):
    """On the test device: CUDA tensors where there is a GPU (compiled kernels), CPU tensors
    under the interpreter otherwise."""
    seen = []
    real = launch.device_guard
    monkeypatch.setattr(launch, "device_guard", lambda d: seen.append(d) or real(d))
    policy, ref, labels = make_batch(2, 4, 40, device=device)
    policy.requires_grad_()
    epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend="triton").loss.backward()
    # Token forward, sequence sums, pair head, backward.
    assert len(seen) == 4 and set(seen) == {policy.device}


def test_rows_that_start_mid_vector_are_aligned_by_the_kernels():
    """Which loop each layout gets (meta tensors: shapes and strides, no memory)."""
    from epsdpo_kernels.triton_backend.backward import _gradient_like
    from epsdpo_kernels.triton_backend.launch import align_rows

    def logits(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    vec = 8  # bf16: 16 bytes
    assert not align_rows(vec, logits(4, 9, 128256), logits(4, 9, 128256))  # Triton sees it
    assert align_rows(vec, logits(4, 9, 50257), logits(4, 9, 50257))
    assert align_rows(vec, logits(4, 9, 50264), logits(4, 9, 50264))  # 8 but not 16 elements
    # The linear path's (C, 1, V) chunks: the size-1 dimension's stride does not count.
    assert align_rows(vec, logits(64, 1, 50257), logits(64, 1, 50257))
    # A logits[:, :-1] slice and a contiguous tensor: rows equally far from a boundary...
    sliced = logits(4, 10, 50257)[:, :-1]
    assert not align_rows(vec, sliced, logits(4, 9, 50257))  # ...only where the strides agree
    assert align_rows(vec, sliced, _gradient_like(sliced))  # the backward allocates alike
    assert _gradient_like(sliced).stride() == sliced.stride()
    assert not align_rows(vec, logits(4, 10, 50257)[:, 1:], logits(4, 9, 50257))  # base moved


def test_bf16_blocks_are_read_as_words_only_from_16_byte_boundaries():
    """The forward's 32-bit word loads of bf16 logits (token._load_block) go only where every
    whole block starts on a 16-byte boundary: a 4-byte load from a 2-byte-aligned address
    faults on a GPU, and the interpreter, which reads it, cannot show that."""
    from epsdpo_kernels.triton_backend.launch import word_loads

    def logits(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    vec = 8
    assert word_loads(vec, logits(4, 9, 128256), logits(4, 9, 128256))
    assert word_loads(vec, logits(4, 9, 50257), logits(4, 9, 50257))  # ALIGN_ROWS aligns them
    sliced = logits(4, 10, 50257)[:, :-1]
    assert not word_loads(vec, sliced, logits(4, 9, 50257))  # rows differently misaligned
    assert not word_loads(vec, logits(4, 9, 128257)[..., 1:], logits(4, 9, 128256))  # base + 2 B
    assert word_loads(vec, logits(4, 9, 128264)[..., 8:], logits(4, 9, 128256))  # base + 16 B
    assert not word_loads(4, logits(4, 9, 128256, dtype=torch.float32), logits(4, 9, 128256))
    assert not word_loads(vec, *[logits(4, 9, 128256, dtype=torch.float16)] * 2)


def test_only_the_interpreters_numpy_incompatibility_is_turned_into_a_skip():
    """conftest reports a test as skipped only for Triton's interpreter failing on NumPy ≥ 2.3
    (directly, as a cause, or in every member of an exception group), never for other errors."""
    from tests.helpers.interpreter import (
        interpreter_incompatibility as _interpreter_incompatibility,
    )

    class InterpreterError(Exception):
        pass

    numpy_error = InterpreterError(
        "TypeError('only 0-dimensional arrays can be converted to Python scalars')"
    )
    assert _interpreter_incompatibility(numpy_error)
    wrapped = RuntimeError("launch failed")
    wrapped.__cause__ = numpy_error
    assert _interpreter_incompatibility(wrapped)
    assert not _interpreter_incompatibility(InterpreterError("IndexError('out of range')"))
    assert not _interpreter_incompatibility(AssertionError("loss differs"))

    class Group(Exception):
        def __init__(self, exceptions):
            self.exceptions = exceptions

    assert _interpreter_incompatibility(Group([numpy_error, numpy_error]))
    assert not _interpreter_incompatibility(Group([numpy_error, AssertionError("real")]))


def test_the_interpreters_numpy_incompatibility_names_the_fix():
    """The [train] extra pulls NumPy 2.4, under which every interpreted launch of Triton ≤ 3.6
    fails with an InterpreterError deep in the interpreter; the launch says what to install."""
    from epsdpo_kernels.triton_backend.launch import NUMPY_SCALAR_ERROR, launch

    class InterpreterError(Exception):  # the interpreter's exception, by its name
        pass

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise InterpreterError(f"only 0-dimensional arrays {NUMPY_SCALAR_ERROR}")

            return run

    with pytest.raises(RuntimeError, match=r"pip install 'numpy<2.3', or use backend='torch'"):
        launch((Kernel(), (1,), (), {}, 4), torch.device("cpu"))

    class Other(Kernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise InterpreterError("something else")

            return run

    with pytest.raises(InterpreterError, match="something else"):
        launch((Other(), (1,), (), {}, 4), torch.device("cpu"))
