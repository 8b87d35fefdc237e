"""Every Triton launch of the package goes through ``launch``: on the device of its tensors.

Triton launches on the *current* CUDA device, not on the device the arguments live on. With
tensors on ``cuda:1`` while ``cuda:0`` is current (a second model on a second GPU, a pipeline
stage), an unguarded launch would run on the wrong device and fault on the pointers.
"""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the block (nothing to do elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# What Triton's CPU interpreter (3.6 and earlier) raises under NumPy ≥ 2.3, which no longer turns
# 1-element arrays into Python scalars (numpy 2.4 arrives with the [train] extra, for instance).
NUMPY_SCALAR_ERROR = "can be converted to Python scalars"


def _numpy_too_new(error: BaseException | None) -> bool:
    while error is not None:
        if type(error).__name__ == "InterpreterError" and NUMPY_SCALAR_ERROR in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def launch(spec, device: torch.device) -> None:
    """Run one ``(kernel, grid, args, constexprs, num_warps)`` launch on ``device``."""
    kernel, grid, args, constexprs, num_warps = spec
    with device_guard(device):
        try:
            kernel[grid](*args, **constexprs, num_warps=num_warps)
        except Exception as error:
            if device.type != "cuda" and _numpy_too_new(error):
                import numpy
                import triton

                raise RuntimeError(
                    f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot "
                    f"run under NumPy {numpy.__version__}: pip install 'numpy<2.3', or use "
                    "backend='torch' on CPU tensors"
                ) from error
            raise
