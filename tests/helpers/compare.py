"""Comparisons with per-dtype tolerances: what every test that checks numbers uses."""

from __future__ import annotations

import torch

# Values (loss, logps, rewards...) are computed in fp32 from the same inputs the float64
# reference reads, so they get fp32 tolerances whatever the input dtype. Gradients are written in
# the input dtype, so they get its rounding: half an ulp is 2^-9 (bf16) / 2^-12 (fp16) relative;
# rtol is one full ulp to leave room for the fp32 error before rounding.
VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}
# Triton's CPU interpreter (3.6) converts fp32 → bf16 by truncation (interpreter.py, cast_impl)
# where the GPU rounds to nearest even, so under the interpreter a bf16 output may be one whole
# ulp (≤ 2^-7 relative) off instead of half of one. fp16 goes through numpy and rounds correctly.
INTERPRETER_GRAD_RTOL = {**GRAD_RTOL, torch.bfloat16: 2**-7}


def grad_atol_floor(dtype) -> float:
    """The absolute rounding of a gradient written in ``dtype`` where it is subnormal: below the
    smallest normal number values are spaced smallest_normal·eps apart, so rounding to nearest
    errs by up to half of that whatever the value (fp16: 2^-25 ≈ 3e-8, which no relative
    tolerance covers for gradients of ~1e-6; bf16 and fp32: below 1e-40)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def grad_rtol(dtype, backend: str, device) -> float:
    interpreted = backend == "triton" and torch.device(device).type == "cpu"
    return (INTERPRETER_GRAD_RTOL if interpreted else GRAD_RTOL)[dtype]


def assert_close(actual, expected, *, rtol, atol, name="tensor", mask=None):
    """|actual − expected| ≤ atol + rtol·|expected| elementwise (on ``mask`` if given; ``atol``
    may be a tensor broadcasting to the shape); on failure report the max abs/rel error and the
    worst index. NaN/inf positions must match exactly."""
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    atol = torch.as_tensor(atol, dtype=torch.float64).detach().cpu().expand(actual.shape)
    if mask is not None:
        mask = torch.as_tensor(mask).to("cpu").expand(actual.shape)
        actual, expected, atol = actual[mask], expected[mask], atol[mask]
    nonfinite = ~torch.isfinite(actual) | ~torch.isfinite(expected)
    assert (
        torch.equal(actual[nonfinite].nan_to_num(), expected[nonfinite].nan_to_num())
        and (torch.isnan(actual) == torch.isnan(expected)).all()
    ), f"{name}: NaN/inf positions differ"
    err = (actual - expected).abs().nan_to_num()
    bound = atol + rtol * expected.abs().nan_to_num()
    if actual.numel() and (err > bound).any():
        worst = int(torch.argmax(err - bound))
        rel = err / expected.abs().clamp(min=1e-30)
        raise AssertionError(
            f"{name}: max abs err {err.max().item():.3e}, max rel err {rel.max().item():.3e}; "
            f"worst (masked, flat) index {worst}: got {actual.flatten()[worst].item():.9g}, "
            f"expected {expected.flatten()[worst].item():.9g} (rtol={rtol}, "
            f"atol={atol.flatten()[worst].item():.3g})"
        )
