"""Chunked ε-DPO from hidden states: the forward and backward drivers of the linear path.

Only the S scored rows (label ≠ ignore_index) are computed. With W the (V, H) lm_head weight
and X the (S, H) scored hidden states (sizes at the 8B scale: S = 8192, H = 4096, V = 128256):

Forward, token chunks of C rows: per chunk, the policy and reference logits (C × V, two GEMMs in
the input dtype with fp32 accumulation), the per-token kernel of the logits path on them, then
they are freed. The per-pair head runs once on the full per-token stats. Memory: 2·C·V·elt.
Token chunks need no merging across chunks (each row sees all of V at once), and a chunk of
C ≥ 256 rows keeps each GEMM compute-bound (arithmetic intensity ≈ C FLOP/byte against a ridge of
~270 on an H100).

Backward, vocabulary slices of Vb rows of W, all S tokens at once: per slice, recompute the
slice's policy logits X·W_sliceᵀ (S × Vb), turn them into their gradient G in place (the same
backward kernel, with the slice's vocabulary offset), then

    ∂W[slice] = Gᵀ·X       one GEMM over all S tokens, fp32 accumulation inside, written once
    ∂X       += G·W_slice  into an S × H fp32 accumulator
    ∂b[slice] = Σ_rows G

No V × H fp32 buffer exists and no weight-gradient read-modify-write happens (a token-chunked
backward accumulates ∂W over S/C chunks: at the sizes above ~16 × 4.2 GB of traffic). Memory:
S·Vb·elt for the slice, S·H·4 for the accumulator, S·H·elt for the gathered X, and the weight
gradient itself. When S·Vb would not fit the budget even at Vb = 256, the slice's tokens are
also chunked and its ∂W accumulates in a Vb × H fp32 buffer.

FLOPs, in units of 2·S·H·V: forward 2 (policy, reference), backward 3 (recompute, ∂X, ∂W) =
5 against the floor of 4 (1.25×). The recompute is unavoidable without keeping S·V logits:
ε-DPO's per-row gradient scale c_n is known only after every token has been seen.
Bytes beyond the GEMMs' operands, bf16 at the sizes above (S·V·2 = 2.1 GB): the forward writes
and the kernel reads both chunks' logits (4 × 2.1 GB); the backward writes the recomputed
logits, the kernel rewrites them in place, and the two gradient GEMMs read them (4 × 2.1 GB),
plus one read-modify-write of the S × H fp32 accumulator per slice (8 slices × 0.27 GB; the
slice's floor keeps that ≤ 5% of the GEMMs' time, plans.CUDA_MIN_SLICE_ROWS).
"""

from __future__ import annotations

import torch

from . import layout as L
from .distributed.vocab_shard import complete_hidden_gradient
from .plans import LinearInputs, slice_plan
from .sequences import scored_rows, spread_scored
from .steps import pair_buffer, token_backward, token_stats


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Exactly what nn.Linear computes (a fused addmm with a bias), so a chunk's logits are the
    # model's own logits, not a differently rounded version of them.
    return torch.nn.functional.linear(hidden, weight, bias)


def _fp32_out_matmul_supported(device: torch.device) -> bool:
    """``torch.addmm(..., out_dtype=torch.float32)`` for bf16/fp16 operands: CUDA builds of
    torch ≥ 2.10. Decided from the version, not by a trial call, so the answer does not depend
    on whether the first call happened under CUDA-graph capture or torch.compile."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cuda" and version >= (2, 10)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b in the input dtype: the bf16/fp16 GEMM accumulates
    straight into acc on CUDA; elsewhere the operands are upcast (bounded by the slice)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_out_matmul_supported(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b in ``out``'s dtype, accumulated in fp32 and rounded once (``out`` may be wider
    than the operands: an fp32 weight's gradient under autocast)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32:
        out.zero_()
        _accumulate_fp32(out, a, b)
    else:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        _accumulate_fp32(acc, a, b)
        out.copy_(acc)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def linear_forward(inputs: LinearInputs, labels, call):
    """Returns (stats, pair, scored): token stats in the (TOKEN_FIELDS, N·T) layout of the
    logits path (zeros at ignored rows), the head's pair buffer, and the flat scored indices."""
    policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias = inputs
    params, plan = call.params, call.plan
    rows, t, _ = policy_hidden.shape
    scored = scored_rows(labels, params.ignore_index, params.scored_count)
    # The scored rows' stats, chunk by chunk as slices; spread over every row once at the end.
    scored_stats = torch.empty(
        (L.TOKEN_FIELDS, scored.numel()), dtype=torch.float32, device=labels.device
    )
    flat_policy = policy_hidden.reshape(rows * t, -1)
    flat_ref = ref_hidden.reshape(rows * t, -1)
    flat_labels = labels.reshape(rows * t)
    # In the matmul dtype (a copy only under autocast, freed when the forward returns).
    policy_w, policy_b = (
        plan.cast(policy_weight, policy_weight),
        plan.cast(policy_bias, policy_weight),
    )
    ref_w, ref_b = plan.cast(ref_weight, ref_weight), plan.cast(ref_bias, ref_weight)
    for sl in _chunks(scored.numel(), plan.chunk_rows):
        idx = scored[sl]
        policy_logits = _logits(flat_policy[idx].to(policy_w.dtype), policy_w, policy_b)
        ref_logits = _logits(flat_ref[idx].to(ref_w.dtype), ref_w, ref_b)
        # A chunk is a (C, 1, V) batch of C sequences of one token: the kernels need no change.
        scored_stats[:, sl] = token_stats(
            policy_logits.unsqueeze(1), ref_logits.unsqueeze(1), flat_labels[idx].unsqueeze(1), call
        )
        del policy_logits, ref_logits
    stats = spread_scored(scored_stats, labels, params.ignore_index, dim=1)
    return stats, pair_buffer(stats, labels, call), scored


def _device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device (0 elsewhere), which bounds the backward's widest slice."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device.index or 0).total_memory


@torch.no_grad()
def linear_backward(
    policy_hidden, policy_weight, policy_bias, labels, stats, scored, token_coef, call, needs
):
    """Gradients w.r.t. (policy_hidden, policy_weight, policy_bias), each None if not needed
    (``needs``: three bools), walking vocabulary slices (see the module docstring);
    ``token_coef`` is each token row's c_n."""
    params, plan, shard = call.params, call.plan, call.shard
    rows, t, h = policy_hidden.shape
    vocab = policy_weight.shape[0]
    need_hidden, need_weight, need_bias = needs
    flat_hidden = policy_hidden.reshape(rows * t, h)
    # (S, H) in the matmul dtype, read by every slice's two GEMMs; ∂hidden accumulates in fp32
    # and is rounded once, to the hidden states' own dtype.
    hidden = plan.cast(flat_hidden[scored], policy_weight)
    n_scored = hidden.shape[0]
    token_labels = labels.reshape(rows * t)[scored].unsqueeze(1)  # (S, 1)
    token_stats = stats[:, scored].contiguous()  # (TOKEN_FIELDS, S): the lse per token
    token_coef = token_coef[scored].float().contiguous()
    slice_rows, token_rows = slice_plan(
        n_scored,
        vocab,
        hidden.element_size(),
        hidden.device.type,
        plan.vocab_chunk_rows,
        _device_memory(hidden.device),
    )

    grad_hidden = torch.zeros((n_scored, h), dtype=torch.float32, device=hidden.device)
    # Every slice writes its rows of the weight gradient, unless no token is scored.
    new_weight = torch.empty_like if n_scored else torch.zeros_like
    grad_weight = new_weight(policy_weight) if need_weight else None
    grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    # Column j of a slice is vocabulary entry offset + j (this rank's shard starts at offset).
    offset = shard.offset if shard is not None else 0
    for vs in _chunks(vocab, max(1, slice_rows)):
        weight = plan.cast(policy_weight[vs], policy_weight)
        bias = plan.cast(policy_bias[vs], policy_weight) if policy_bias is not None else None
        weight_acc = None
        if need_weight and token_rows < n_scored:
            weight_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_bias:
            grad_bias[vs] = 0
        for ts in _chunks(n_scored, token_rows):
            logits = _logits(hidden[ts], weight, bias).unsqueeze(1)
            # In place: the recomputed logits become their own gradient.
            grad = token_backward(
                logits,
                token_labels[ts],
                token_stats[:, ts].contiguous(),
                token_coef[ts],
                params,
                inplace=True,
                vocab_offset=offset + vs.start,
            ).squeeze(1)
            if need_hidden:
                _accumulate_fp32(grad_hidden[ts], grad, weight)
            if need_weight:
                if weight_acc is None:
                    _matmul_into(grad_weight[vs], grad.t(), hidden)
                else:
                    _accumulate_fp32(weight_acc, grad.t(), hidden[ts])
            if need_bias:
                grad_bias[vs] += grad.sum(0, dtype=torch.float32)
            del logits, grad
        if weight_acc is not None:
            grad_weight[vs] = weight_acc
    full_grad_hidden = None
    if need_hidden:
        complete_hidden_gradient(grad_hidden, shard)
        full_grad_hidden = spread_scored(
            grad_hidden.to(flat_hidden.dtype), labels, params.ignore_index, dim=0
        ).view_as(policy_hidden)
    if grad_bias is not None:
        grad_bias = grad_bias.to(policy_bias.dtype)
    return full_grad_hidden, grad_weight, grad_bias
