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


def launch(spec, device: torch.device) -> None:
    """Run one ``(kernel, grid, args, constexprs, num_warps)`` launch on ``device``."""
    kernel, grid, args, constexprs, num_warps = spec
    with device_guard(device):
        kernel[grid](*args, **constexprs, num_warps=num_warps)
