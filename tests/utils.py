"""Shared helpers: batch construction and one comparison helper with per-dtype tolerances."""

from __future__ import annotations

import contextlib
import os
import tempfile

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


def make_batch(
    b,
    t,
    v,
    *,
    dtype=torch.float32,
    device="cpu",
    scale=1.0,
    prompt_frac=0.3,
    seed=0,
    ignore_index=-100,
    ragged=True,
    empty_rows=(),
):
    """Random (policy, ref, labels) with a prompt prefix and ragged padding per row.

    The reference logits are the policy's plus noise, as after SFT, so the ε-mixes differ from
    the policy by O(ε) and ties between log-ratios are rare but not absurdly far apart.
    """
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(2 * b, t, v, generator=gen) * scale
    ref = policy + 0.5 * scale * torch.randn(2 * b, t, v, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    prompt = int(prompt_frac * t)
    labels[:, :prompt] = ignore_index
    if ragged:
        for n in range(2 * b):
            pad = int(torch.randint(0, max(1, (t - prompt) // 2 + 1), (1,), generator=gen))
            if pad:
                labels[n, t - pad :] = ignore_index
    for n in empty_rows:
        labels[n] = ignore_index
    return (
        policy.to(device=device, dtype=dtype),
        ref.to(device=device, dtype=dtype),
        labels.to(device),
    )


def rendezvous_file() -> str:
    """A fresh path for a test process group's FileStore. Ranks meet through the file system:
    a TCP port chosen free in one process can be taken by another before rank 0 binds it, which
    on a busy machine makes multi-process tests fail at random."""
    fd, path = tempfile.mkstemp(prefix="epsdpo-group-")
    os.close(fd)
    os.unlink(path)  # FileStore wants a path that does not exist yet (or an empty file)
    return path


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store_path: str):
    """A gloo process group of ``world`` ranks meeting at ``store_path`` (``rendezvous_file``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
