"""The launch policy of the Triton kernels, and the one place that launches them.

Policy: each kernel's launch shape (warps, lanes, VEC), its register cap, the V-splits that fill
the GPU when rows are few, whether rows are aligned to 16 bytes (and the device half of that,
``first_aligned_column``) and whether bf16 blocks are read as 32-bit words. Every launcher builds
a ``Launch`` (kernel, grid, arguments, compile-time constants, warps), which both ``launch`` and
the compile check (benchmarks/kernel_report.py) take.

Every Triton launch goes through ``launch``, on the device of its tensors: Triton launches on the
*current* CUDA device, not on the device the arguments live on. With tensors on ``cuda:1`` while
``cuda:0`` is current (a second model on a second GPU, a pipeline stage), an unguarded launch
would run on the wrong device and fault on the pointers.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..params import triton_interpreter_active

# Launch shape: warps per program and lanes per thread per block, the widest that ptxas compiles
# without spills (benchmarks/kernel_report.py). VEC = 16 bytes / element size.
FWD_WARPS, FWD_LANES_PER_THREAD = 8, 1
BWD_WARPS, BWD_LANES_PER_THREAD = 8, 2
# ptxas's cap on registers (a launch option, not a constexpr): 64 lets four 256-thread programs
# share an SM, and so keeps 4 × 256 × 32 bytes of loads in flight per SM, what the fastest memory
# this targets needs at its latency (docs/PERFORMANCE.md, "Registers"). Left alone, ptxas's
# allocation moves with Triton's code, by release, alignment and specialisation; with the cap the
# kernels that take it do not spill (tests/kernels/test_compile.py holds both). See
# ``backward_register_cap`` and ``forward_register_cap``.
MAX_REGISTERS = 64
# Programs an SM holds at once, for the split heuristic: register-limited, 256 threads of up to
# 64 registers fit four times in 64K (the half-precision forward is capped at 64; fp32 takes
# fewer, docs/PERFORMANCE.md). Counting 4 where 5 fit splits a little less.
PROGRAMS_PER_SM = 4
# A V-split spans at least this many blocks, so that its loop, not its merge, dominates.
MIN_BLOCKS_PER_SPLIT = 4


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int


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


def launch(spec: Launch, device: torch.device) -> None:
    """Run one ``Launch`` on ``device``."""
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


def vec_of(dtype: torch.dtype) -> int:
    """Columns per 16-byte vector load."""
    return 16 // torch.empty((), dtype=dtype).element_size()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(rows: int, vocab: int, block: int, sm_count: int) -> int:
    """V-splits per row so that the grid fills the GPU once: 1 when the rows alone give every
    SM its ``PROGRAMS_PER_SM`` programs; otherwise enough splits to do so, each at least
    ``MIN_BLOCKS_PER_SPLIT`` blocks wide, and none empty (``split_plan``)."""
    slots = sm_count * PROGRAMS_PER_SM
    if rows >= slots:
        return 1
    max_splits = max(1, vocab // (MIN_BLOCKS_PER_SPLIT * block))
    return split_plan(vocab, block, min(max_splits, -(-slots // max(rows, 1))))[0]


def split_plan(vocab: int, block: int, splits: int) -> tuple[int, int]:
    """(splits, columns per split) for at most ``splits`` splits of ``vocab`` columns: each a
    whole number of blocks (its loop then runs unmasked up to the row's end), and as many
    splits as that width needs, so that none is empty (rounding the width up to blocks would
    otherwise leave trailing splits with no columns: V = 256000 in bf16 on one row asks for 31,
    whose 10240-column width fills 25)."""
    per_split = -(-vocab // max(splits, 1))
    per_split = max(block, -(-per_split // block) * block)
    return -(-vocab // per_split), per_split


def fast_math() -> bool:
    return not triton_interpreter_active()


def _device_sm_count(x: torch.Tensor) -> int:
    # The interpreter runs one program at a time: nothing to fill, no split unless asked for.
    return _sm_count(x.device.index or 0) if x.device.type == "cuda" else 1


def plan_splits(x: torch.Tensor, block: int, splits: int | None) -> tuple[int, int]:
    """(splits, columns per split, a multiple of ``block``) for an ``(N, T, V)`` input."""
    n, t, v = x.shape
    if splits is None:
        splits = split_count(n * t, v, block, _device_sm_count(x))
    return split_plan(v, block, splits)


def align_rows(vec: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernels take the ``ALIGN_ROWS`` path for these ``(N, T, V)`` tensors.

    Triton vectorises the loads of a row only if it can prove the row starts on a 16-byte
    boundary: from its specialisation, that holds when both row strides are multiples of 16
    elements (V = 128256) and nothing more is needed. Otherwise (V = 50257, 32001, 128257, or
    50264 in bf16) the kernels align each row themselves: a masked head block up to the
    boundary, then the vector loop. One head serves all the tensors only if every row starts
    equally far from a boundary in each (16-byte-aligned bases, equal strides modulo VEC;
    size-1 dimensions do not count); tensors misaligned differently take the plain loop,
    correct without vector loads."""
    if any(x.data_ptr() % 16 for x in tensors) or _rows_on_boundaries(*tensors):
        return False
    residues = {tuple(x.stride(d) % vec if x.shape[d] > 1 else 0 for d in (0, 1)) for x in tensors}
    return len(residues) == 1


def _rows_on_boundaries(*tensors: torch.Tensor) -> bool:
    """Every row of these ``(N, T, V)`` tensors starts on a 16-byte boundary as laid out."""
    return all(
        x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0 for x in tensors
    )


def word_loads(vec: int, *tensors: torch.Tensor) -> bool:
    """Whether the forward reads the whole blocks of these bf16 tensors as 32-bit words
    (``WORDS``, _load_block): only where every block starts on a 16-byte boundary, rows that
    start on one or are aligned by ``ALIGN_ROWS``. A 4-byte load from a 2-byte-aligned address
    faults on a GPU (the interpreter would read it)."""
    if any(x.dtype != torch.bfloat16 for x in tensors):
        return False
    return _rows_on_boundaries(*tensors) or align_rows(vec, *tensors)


@triton.jit
def first_aligned_column(row_offset, col_start, col_end, VEC: tl.constexpr):
    """The first column ≥ col_start (at most col_end) whose element sits on a 16-byte boundary,
    for a row starting ``row_offset`` elements after a 16-byte-aligned base. A row whose stride
    is not a multiple of VEC (V = 50257, 32001, 128257) starts mid-vector; the columns before
    this one are a masked head block, and whole vector-aligned blocks follow."""
    head = (VEC - (row_offset + col_start) % VEC) % VEC
    return tl.minimum(col_start + head, col_end)


def transform_constexprs(logit_scale: float, logit_softcap: float | None) -> dict:
    """The model's logit transform as compile-time constants: none (the default, the plain
    kernels), a scale, a cap (a model has one value: one specialisation)."""
    return dict(
        LOGIT_SCALE=float(logit_scale),
        SOFTCAP=0.0 if logit_softcap is None else float(logit_softcap),
    )


def forward_register_cap(element_size: int, transformed: bool, wpo_weights: bool) -> dict:
    """The forward's register cap (a launch option), by input element size and specialisation."""
    if element_size == 2 and (wpo_weights or not transformed):
        # Half precision, plain or WPO: uncapped, rows not 16-byte aligned take more than 64
        # (3 programs per SM). The soft-capped (or scaled) forward spills under the cap and keeps
        # its own allocation; fp32 stays well under 64 uncapped, and capping it raised ptxas's
        # count. Measured counts: docs/PERFORMANCE.md, "Registers".
        return dict(maxnreg=MAX_REGISTERS)
    return {}


def backward_register_cap(logit_scale: float, logit_softcap: float | None) -> dict:
    """The backward's register cap. The soft-capped (or scaled) backward keeps more live values
    (the slope 1 − tanh²): uncapped it takes more than 64 registers in half precision at rows
    that are not 16-byte aligned, and under the cap the pinned Triton's code spills where the
    newest release's does not. So it is capped from 3.9 on (tests/kernels/test_compile.py
    compiles both; the counts: docs/PERFORMANCE.md, "Registers")."""
    if logit_softcap is None and float(logit_scale) == 1.0:
        return dict(maxnreg=MAX_REGISTERS)
    if _triton_version() >= (3, 9):
        return dict(maxnreg=MAX_REGISTERS)
    return {}


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def unit_stride_v(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
