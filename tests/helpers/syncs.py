"""Counting what the library does that waits for the device, at the Python level: the
tensor-to-host reads (``.item()``, ``.tolist()``, truth values, ``nonzero``) and every
``torch.tensor`` call (from host data, a blocking host-to-device copy on CUDA), each recorded as
``module.name`` when it is made from a module of the package."""

from __future__ import annotations

import contextlib
import sys

import torch

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


def _caller() -> str:
    return sys._getframe(2).f_globals.get("__name__", "")


@contextlib.contextmanager
def library_syncs():
    """Yields the list of the package's sync points hit inside the block."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    original_tensor = torch.tensor

    def read(name):
        original = saved[name]

        def wrapper(self, *args, **kwargs):
            caller = _caller()
            if caller.startswith("epsdpo_kernels"):
                calls.append(f"{caller}.{name}")
            return original(self, *args, **kwargs)

        return wrapper

    def tensor(*args, **kwargs):
        caller = _caller()
        if caller.startswith("epsdpo_kernels"):
            calls.append(f"{caller}.torch.tensor")
        return original_tensor(*args, **kwargs)

    try:
        for name in _READS:
            setattr(torch.Tensor, name, read(name))
        torch.tensor = tensor
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.tensor = original_tensor
