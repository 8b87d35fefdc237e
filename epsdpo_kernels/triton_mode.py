"""Whether Triton can be imported, and whether its kernels run compiled or on the CPU interpreter.

Both the backend resolution (params.py) and the kernels (token_triton.py, which choose GPU-only
instructions when compiled) ask; this module imports neither, so neither imports the other.
"""

from __future__ import annotations

import functools


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_interpreter_active() -> bool:
    """True when ``@triton.jit`` builds interpreted functions in this process (TRITON_INTERPRET=1
    was set before triton was imported), as it did for this package's kernels."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def probe():
        pass

    return isinstance(probe, InterpretedFunction)
