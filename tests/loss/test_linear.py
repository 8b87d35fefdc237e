"""linear_epsilon_dpo_loss against the float64 reference on the materialised logits."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from epsdpo_kernels import LinearEpsilonDPOHead, linear_epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo
from tests.helpers.batches import head_case, make_linear_batch, rank_rows, run_head
from tests.helpers.checks import compare_linear
from tests.helpers.compare import assert_close
from tests.helpers.distributed import gloo_group, rendezvous_file

BACKENDS = ["torch", "triton"]


LINEAR_CASES = dict(
    b=st.integers(1, 3),
    t=st.integers(1, 8),
    h=st.sampled_from([1, 8, 24]),
    v=st.sampled_from([3, 64, 257, 1000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    chunk_size=st.sampled_from([None, 1, 3, 7, 64]),
    vocab_chunk_size=st.sampled_from([None, 1, 2, 64, 100]),
    epsilon=st.sampled_from([0.0, 0.05, 0.5]),
    average_log_prob=st.booleans(),
    prompt_frac=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)


def _linear_matches_reference(
    backend,
    device,
    b,
    t,
    h,
    v,
    dtype,
    bias,
    chunk_size,
    vocab_chunk_size,
    epsilon,
    average_log_prob,
    prompt_frac,
    seed,
):
    # At most 64 vocabulary slices: each is a kernel launch, slow under the CPU interpreter.
    assume(vocab_chunk_size is None or -(-v // vocab_chunk_size) <= 64)
    inputs = make_linear_batch(
        b, t, h, v, dtype=dtype, device=device, bias=bias, prompt_frac=prompt_frac, seed=seed
    )
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        beta=0.1,
        epsilon=epsilon,
        average_log_prob=average_log_prob,
    )


@given(**LINEAR_CASES)
def test_linear_matches_reference(device, **case):
    _linear_matches_reference("torch", device, **case)


# The same cases through the Triton kernels under the CPU interpreter, at ~3 s an example: a
# third of the examples (the chunk and slice plans are the torch backend's, tested above; what
# this adds is the kernels' slice offsets and in-place gradients, which every example exercises).
@pytest.mark.slow
@settings(max_examples=max(1, int(os.environ.get("EPSDPO_HYPOTHESIS_EXAMPLES", "60")) // 3))
@given(**LINEAR_CASES)
def test_linear_matches_reference_triton(device, **case):
    _linear_matches_reference("triton", device, **case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "chunk_size, vocab_chunk_size",
    [(4, 169), (5, 100), (None, None)],
    ids=["chunk-and-slice-divide", "chunk-and-slice-ragged", "auto"],
)
def test_named_cases(backend, device, dtype, bias, chunk_size, vocab_chunk_size):
    inputs = make_linear_batch(2, 10, 16, 507, dtype=dtype, device=device, bias=bias, seed=3)
    # 19 scored rows (5 per sequence, one dropped): chunk 4 does not divide them, nor does 5;
    # V = 507 = 3 × 169, so slice 169 divides V and 100 does not.
    labels = inputs["labels"]
    labels[:] = -100
    labels[:, 5:] = 1 + torch.arange(5, device=device)
    labels[3, -1] = -100
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        beta=0.1,
        epsilon=0.1,
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slices_too_wide_for_the_budget_step_through_tokens(backend, device, dtype, monkeypatch):
    """When a slice over every scored token would overflow the budget, the slice's tokens are
    stepped through and its weight gradient accumulates in fp32: same results."""
    from epsdpo_kernels import plans

    inputs = make_linear_batch(2, 10, 16, 507, dtype=dtype, device=device, bias=True, seed=8)
    scored = int((inputs["labels"] != -100).sum())
    budget = 256 * 4 * 20  # 256 fp32 vocabulary rows × 20 tokens at most
    monkeypatch.setitem(plans.DEFAULT_CHUNK_BYTES, device.type, budget)
    element = inputs["policy_weight"].element_size()
    vocab_rows, token_rows = plans.slice_plan(scored, 507, element, device.type)
    assert vocab_rows == 256 and token_rows < scored  # the premise: tokens are stepped
    compare_linear(inputs, backend=backend, chunk_size=7, beta=0.1, epsilon=0.1)


@pytest.mark.parametrize("element", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("scored", [1, 300, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("vocab", [2048, 50257, 128256, 256000])
def test_cuda_slices_stay_wide(vocab, scored, element):
    """The CUDA plan's slices (read without a GPU): at least one backward tile (4096 columns in
    bf16) or all of V, and, by plans.py's model, accumulator traffic ≤ 5% of the slice's GEMMs
    on an H100 and an H200, over every scored token at up to 65536 (an 80 GB device)."""
    from epsdpo_kernels import plans

    memory = 80 * 10**9
    vocab_rows, token_rows = plans.slice_plan(scored, vocab, element, "cuda", device_memory=memory)
    assert vocab_rows == vocab or vocab_rows >= 4096
    assert token_rows == scored
    for flops, bandwidth in ((989e12, 3.0e12), (989e12, 4.3e12)):
        share = 4 / 3 * flops / bandwidth / vocab_rows
        assert vocab_rows == vocab or share <= 0.05, share
    # Memory: the slice's logits stay within a sixteenth of the device.
    assert scored * vocab_rows * element <= max(memory // 16, plans.DEFAULT_CHUNK_BYTES["cuda"])


def test_head_module_and_tied_weights(device):
    """The head shares its lm_head's parameters; with tied embeddings the gradient reaches the
    one shared weight from both uses."""
    vocab, hidden_size = 97, 12
    embed = torch.nn.Embedding(vocab, hidden_size).to(device)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device)
    lm_head.weight = embed.weight  # tied
    head = LinearEpsilonDPOHead(lm_head)
    assert head.weight is embed.weight
    ids = torch.randint(0, vocab, (4, 6), device=device)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    hidden = embed(ids) * 2
    ref_weight = embed.weight.detach().clone()
    out = head(hidden, hidden.detach(), ref_weight, labels, beta=0.1, epsilon=0.1)
    out.loss.backward()

    expected_weight = embed.weight.detach().clone().requires_grad_()
    hidden_ref = torch.nn.functional.embedding(ids, expected_weight) * 2
    logits = hidden_ref @ expected_weight.t()
    ref = reference_epsilon_dpo(
        logits,
        (hidden_ref.detach() @ ref_weight.t()),
        labels,
        beta=0.1,
        epsilon=0.1,
        dtype=torch.float32,
    )
    ref["loss"].backward()
    assert_close(embed.weight.grad, expected_weight.grad, rtol=1e-4, atol=1e-6, name="tied grad")


_PEAK_RSS_SCRIPT = r"""
import sys, torch
from epsdpo_kernels import linear_epsilon_dpo_loss
tokens, vocab, hidden_size, chunk, vocab_chunk = map(int, sys.argv[1:6])
dtype, preallocate = getattr(torch, sys.argv[6]), sys.argv[7] == "1"
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(tokens // 64, 64, hidden_size, generator=gen).to(dtype).requires_grad_()
weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
weight.requires_grad_()
ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() + 0.01
labels = torch.randint(0, vocab, (tokens // 64, 64), generator=gen)
def step(h, w, r, rw, y):
    out = linear_epsilon_dpo_loss(h, w, r, rw, y, beta=0.1, chunk_size=chunk,
                                  vocab_chunk_size=vocab_chunk, backend="torch")
    out.loss.backward()
warm_labels = torch.full_like(labels[:2], -100)
warm_labels[0, 0] = 1  # one scored token: loads libraries without touching a chunk's memory
step(hidden[:2], weight, ref_hidden[:2], ref_weight, warm_labels)
hidden.grad = weight.grad = None
if preallocate:  # the gradients themselves are then not counted
    weight.grad = torch.zeros_like(weight)
    hidden.grad = torch.zeros_like(hidden)
def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS (proc(5)): setup transients don't count
before = status_kb("VmRSS")
step(hidden, weight, ref_hidden, ref_weight, labels)
print((status_kb("VmHWM") - before) * 1024)
"""


def _peak_extra_rss(
    tokens, vocab, hidden_size, chunk, vocab_chunk=256, dtype="float32", preallocate=True
) -> int:
    import subprocess
    import sys

    # Freed blocks go back to the OS at once, so RSS follows live memory (glibc otherwise keeps
    # freed chunks up to 32 MiB in the heap, and a slice's reuse would hide in them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_RSS_SCRIPT,
            str(tokens),
            str(vocab),
            str(hidden_size),
            str(chunk),
            str(vocab_chunk),
            dtype,
            "1" if preallocate else "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_chunked_peak_memory_is_bounded_on_cpu():
    """Peak extra RSS of forward + backward (each size in a fresh process) stays near the
    chunk's budget and does not grow with the number of tokens, while one materialised
    (tokens × V) fp32 logits tensor would be 4× larger than the budget at the large size."""
    vocab, hidden_size, chunk = 8192, 16, 128
    small = _peak_extra_rss(2048, vocab, hidden_size, chunk)
    large = _peak_extra_rss(8192, vocab, hidden_size, chunk)
    one_logits_tensor = 8192 * vocab * 4  # 256 MiB
    # The torch backend's per-token pass holds about five fp32 temporaries of at most
    # TORCH_CHUNK_BYTES["cpu"] (512 KiB) each, the forward chunk's two logits tensors
    # 2·128·8192·4 = 8 MiB, a backward slice (8192 tokens × 256 rows) 8 MiB plus its torch
    # temporaries; 64 MiB leaves room for the allocator's own slack.
    budget = 64 * 2**20 + 2 * chunk * vocab * 4
    assert large < 1.5 * budget, f"peak extra RSS {large / 2**20:.0f} MiB at 8192 tokens"
    assert large < one_logits_tensor / 2
    # What grows with tokens is O(S·H) and one 256-row slice over all tokens (S·256·4 bytes).
    growth = (8192 - 2048) * (256 * 4 * 2 + hidden_size * 4 * 4)
    assert large - small < 16 * 2**20 + growth, f"{small / 2**20:.0f} → {large / 2**20:.0f} MiB"


@pytest.mark.slow
def test_bf16_peak_memory_is_the_weight_gradient_plus_slices():
    """bf16 weights: the backward walks vocabulary slices and writes each slice's weight
    gradient once, so peak extra memory is the bf16 weight gradient plus O(S·Vb + S·H) — no
    V × H fp32 accumulator (which alone would be twice the bf16 gradient)."""
    tokens, vocab, hidden_size, chunk, vocab_chunk = 512, 32768, 512, 64, 1024
    peak = _peak_extra_rss(
        tokens, vocab, hidden_size, chunk, vocab_chunk, dtype="bfloat16", preallocate=False
    )
    bf16_grad = vocab * hidden_size * 2  # 32 MiB
    fp32_vh = vocab * hidden_size * 4  # 64 MiB: the buffer that must not exist
    torch_pass = 16 * 2**20  # the torch backend's ~5 temporaries (≤ 512 KiB each), and slack
    forward_chunk = 2 * chunk * vocab * 2
    # A slice: its bf16 logits, their fp32 upcast for the CPU GEMM, the weight slice upcast.
    slice_bytes = tokens * vocab_chunk * (2 + 4) + vocab_chunk * hidden_size * 4
    # Tokens: the gathered hidden states, the fp32 accumulator, the hidden gradient itself.
    token_bytes = tokens * hidden_size * (2 + 4 + 2)
    bound = bf16_grad + torch_pass + max(forward_chunk, slice_bytes) + token_bytes
    assert peak < 1.25 * bound, f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    # Not even half of a V × H fp32 buffer fits under the peak: a backward that accumulated the
    # weight gradient over token chunks in such a buffer would exceed it.
    assert peak < bf16_grad + fp32_vh / 2, f"peak {peak / 2**20:.1f} MiB: a V × H fp32 buffer?"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_frozen(backend, device):
    inputs = make_linear_batch(2, 5, 8, 100, dtype=torch.float32, device=device, bias=True)
    args = [
        inputs[k] for k in ("policy_hidden", "policy_weight", "ref_hidden", "ref_weight", "labels")
    ]
    args[0].requires_grad_()
    with torch.no_grad():
        out = linear_epsilon_dpo_loss(
            *args,
            beta=0.1,
            policy_bias=inputs["policy_bias"],
            ref_bias=inputs["ref_bias"],
            backend=backend,
        )
    assert not out.loss.requires_grad
    train = linear_epsilon_dpo_loss(
        *args,
        beta=0.1,
        policy_bias=inputs["policy_bias"],
        ref_bias=inputs["ref_bias"],
        backend=backend,
    )
    assert train.loss.requires_grad and torch.equal(out.losses, train.losses.detach())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(policy_weight=torch.randn(100, 7)), ValueError, "policy_weight must have shape"),
        (dict(ref_weight=torch.randn(99, 8)), ValueError, "ref_weight must have shape"),
        (dict(ref_hidden=torch.randn(4, 4, 8)), ValueError, "ref_hidden must have shape"),
        (dict(policy_bias=torch.randn(99)), ValueError, "policy_bias must be"),
        (dict(policy_weight=torch.randn(100, 8).double()), TypeError, "policy_weight must be"),
        (dict(ref_weight=torch.randn(100, 8).bfloat16()), TypeError, "must share a dtype"),
        (dict(policy_hidden=torch.randn(3, 5, 8)), ValueError, "2B"),
        (
            dict(policy_weight=torch.randn(8, 100)),
            ValueError,
            r"H = 8 from policy_hidden \(4, 5, 8\); got policy_weight of shape \(8, 100\); it "
            "looks transposed",
        ),
        (
            dict(ref_weight=torch.randn(8, 100)),
            ValueError,
            r"V = 100 from policy_weight; got ref_weight of shape \(8, 100\); it looks transposed",
        ),
    ],
    ids=[
        "weight-H",
        "ref-V",
        "ref-T",
        "bias-V",
        "weight-f64",
        "dtype-mix",
        "odd-rows",
        "weight-transposed",
        "ref-weight-transposed",
    ],
)
def test_bad_input_is_named(change, error, match):
    inputs = make_linear_batch(2, 5, 8, 100, dtype=torch.float32, device="cpu", bias=False)
    inputs.update(change)
    with pytest.raises(error, match=match):
        linear_epsilon_dpo_loss(
            inputs["policy_hidden"],
            inputs["policy_weight"],
            inputs["ref_hidden"],
            inputs["ref_weight"],
            inputs["labels"],
            policy_bias=inputs["policy_bias"],
            beta=0.1,
        )


@pytest.mark.parametrize("name", ["chunk_size", "vocab_chunk_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_chunk_sizes_must_be_positive_ints(name, value):
    base = make_linear_batch(2, 5, 8, 100, dtype=torch.float32, device="cpu", bias=False)
    with pytest.raises(ValueError, match=f"{name} must be a positive int or None"):
        linear_epsilon_dpo_loss(
            base["policy_hidden"],
            base["policy_weight"],
            base["ref_hidden"],
            base["ref_weight"],
            base["labels"],
            beta=0.1,
            **{name: value},
        )


def _ddp_worker(rank, world, store, results):
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, store):
        head, data = head_case()
        model = DistributedDataParallel(head)  # held: its reducer must outlive the backward
        run_head(model, data, rank_rows(rank, world)).loss.backward()
        results[rank] = head.weight.grad.clone()


@pytest.mark.xdist_group("multi_process")
def test_works_under_ddp():
    """Under DDP (gloo, 2 ranks) the averaged gradient equals the single-process gradient of the
    mean loss over all pairs."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, rendezvous_file(), results), nprocs=2, join=True)

    head, data = head_case()
    run_head(head, data).loss.backward()
    for rank in (0, 1):
        assert_close(results[rank], head.weight.grad, rtol=1e-5, atol=1e-7, name=f"rank {rank}")


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    """Under CPU autocast (bf16) with fp32 parameters, the result equals the loss on the inputs
    cast to bf16 by hand, and gradients come back in fp32 for the fp32 parameters: the same fp32
    accumulations, rounded once to fp32 instead of to bf16 (then widened) as the hand-cast
    inputs' gradients are."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(301, 16, generator=gen) / 4).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.05, weight.detach() * 1.01
    labels = torch.randint(0, 301, (4, 5), generator=gen)
    labels[:, :2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_epsilon_dpo_loss(hidden, weight, ref_hidden, ref_weight, labels, beta=0.1)
    out.loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32

    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    expected = linear_epsilon_dpo_loss(
        h16, w16, ref_hidden.bfloat16(), ref_weight.bfloat16(), labels, beta=0.1
    )
    expected.loss.backward()
    assert out.loss.item() == expected.loss.item()
    assert torch.equal(out.steps, expected.steps)
    # ∂hidden: the same fp32 accumulator on both sides, so rounding ours to bf16 gives theirs.
    assert torch.equal(hidden.grad.bfloat16(), h16.grad)
    assert not torch.equal(hidden.grad, h16.grad.float())  # and ours was not rounded to bf16
    # ∂weight: a bf16 GEMM (fp32 inside, rounded to bf16) against an fp32-output one: one bf16
    # rounding apart (half an ulp), plus fp32 summation order: one ulp, as GRAD_RTOL allows.
    assert_close(weight.grad, w16.grad.float(), rtol=2**-8, atol=0, name="weight grad")
