"""The comparisons the loss tests share: an entry point's every output and gradient against the
float64 reference (reference.py) on the same inputs, with tolerances from tests/helpers/parity.py.
"""

from __future__ import annotations

import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo
from tests.helpers.compare import assert_close, grad_atol_floor, grad_rtol
from tests.helpers.parity import (
    check_outputs,
    grad_coef_atol,
    objective,
    on_device,
    upstream_weights,
)


def compare_to_reference(
    policy, ref, labels, *, backend, inplace=False, strided=False, packing=None, **kw
):
    """``strided``: pass the logits as ``x[:, :-1]`` of a longer tensor (the usual shift), a
    view with a T-stride of (T+1)·V, so the kernels' stride handling is exercised. ``packing``
    (tests/helpers/packing.py): pass the same tokens as a packed stream instead; the padded
    reference and tolerances stay."""
    b = policy.shape[0] // 2
    weights = upstream_weights(b)
    leaf64 = policy.detach().cpu().double().requires_grad_()
    expected = reference_epsilon_dpo(leaf64, ref.cpu(), labels.cpu(), **kw)
    objective(expected, weights).backward()

    data = policy.detach()
    if strided:
        data = torch.cat([data, torch.randn_like(data[:, :1])], dim=1)
    leaf = data.clone().requires_grad_()
    source = leaf * 1 if inplace else leaf  # in place needs a non-leaf to overwrite
    logits = source[:, :-1] if strided else source
    assert logits.is_contiguous() != strided
    if packing is None:
        out = epsilon_dpo_loss(logits, ref, labels, backend=backend, inplace_backward=inplace, **kw)
    else:
        leaf = packing.stream(data).requires_grad_()
        out = epsilon_dpo_loss(
            leaf * 1 if inplace else leaf,
            packing.stream(ref),
            packing.labels(labels, kw.get("ignore_index", -100)),
            backend=backend,
            inplace_backward=inplace,
            sequence_ids=packing.sequence_ids.to(labels.device),
            num_pairs=packing.num_pairs,
            **packed_options(kw, packing),
        )
    objective(out, on_device(weights, policy.device)).backward()
    agree = check_outputs(out, expected)

    grad = leaf.grad if packing is None else packing.unstream(leaf.grad, policy.shape)
    if strided:
        assert (grad[:, -1] == 0).all(), "gradient leaked into the column outside the view"
        grad = grad[:, :-1]
    assert grad is not None and grad.dtype == policy.dtype
    e = {k: v.detach() for k, v in expected.items()}
    row_mask = torch.cat([agree, agree]).view(-1, 1, 1)
    atol = grad_coef_atol(e, weights, labels.cpu(), kw).view(-1, 1, 1) + grad_atol_floor(
        policy.dtype
    )
    rtol = grad_rtol(policy.dtype, backend, policy.device)
    assert_close(grad, leaf64.grad, rtol=rtol, atol=atol, name="grad", mask=row_mask)
    assert ref.grad is None
    return out, expected


def packed_options(kw: dict, packing) -> dict:
    """The loss options for the packed stream: ``token_weights`` of the padded rows streamed as
    the tokens are (NaN at fillers: unscored, so never read)."""
    if kw.get("token_weights") is None:
        return kw
    return {**kw, "token_weights": packing.stream(kw["token_weights"])}


def _logits(hidden, weight, bias):
    # What nn.Linear (an HF lm_head) computes: with a bias, one fused addmm, one rounding.
    return torch.nn.functional.linear(hidden, weight, bias)


def compare_linear(inputs, *, backend, chunk_size, vocab_chunk_size=None, packing=None, **kw):
    """linear_epsilon_dpo_loss on ``inputs`` (``make_linear_batch``) against the float64
    reference on the materialised logits: every field and every gradient. ``packing``
    (tests/helpers/packing.py): pass the same tokens as a packed stream instead."""
    policy_hidden, policy_weight, policy_bias = (
        inputs["policy_hidden"],
        inputs["policy_weight"],
        inputs["policy_bias"],
    )
    dtype, device, labels = policy_hidden.dtype, policy_hidden.device, inputs["labels"]
    b = labels.shape[0] // 2

    # Reference: what a user would pass to epsilon_dpo_loss, the full matmul in the input dtype,
    # then docs/SPEC.md in float64; its gradient pulled back through the matmul in float64.
    policy_logits = _logits(policy_hidden, policy_weight, policy_bias).detach()
    ref_logits = _logits(inputs["ref_hidden"], inputs["ref_weight"], inputs["ref_bias"]).detach()
    leaf64 = policy_logits.cpu().double().requires_grad_()
    weights = upstream_weights(b)
    expected = reference_epsilon_dpo(leaf64, ref_logits.cpu(), labels.cpu(), **kw)
    objective(expected, weights).backward()
    g = leaf64.grad  # (2B, T, V) float64
    x64, w64 = policy_hidden.detach().cpu().double(), policy_weight.detach().cpu().double()
    expected_grad_hidden = g @ w64
    expected_grad_weight = g.flatten(0, 1).t() @ x64.flatten(0, 1)
    expected_grad_bias = g.sum((0, 1))

    leaves = {
        k: inputs[k].detach().clone().requires_grad_()
        for k in ("policy_hidden", "policy_weight", "policy_bias")
        if inputs[k] is not None
    }
    hidden, ref_hidden, loss_labels, layout = (
        leaves["policy_hidden"],
        inputs["ref_hidden"],
        labels,
        {},
    )
    if packing is not None:
        leaves["policy_hidden"] = hidden = packing.stream(hidden.detach()).requires_grad_()
        ref_hidden = packing.stream(ref_hidden)
        loss_labels = packing.labels(labels, kw.get("ignore_index", -100))
        layout = dict(sequence_ids=packing.sequence_ids.to(device), num_pairs=packing.num_pairs)
    out = linear_epsilon_dpo_loss(
        hidden,
        leaves["policy_weight"],
        ref_hidden,
        inputs["ref_weight"],
        loss_labels,
        policy_bias=leaves.get("policy_bias"),
        ref_bias=inputs["ref_bias"],
        backend=backend,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        **layout,
        **(kw if packing is None else packed_options(kw, packing)),
    )
    objective(out, on_device(weights, device)).backward()
    grad_hidden = hidden.grad
    if packing is not None:
        grad_hidden = packing.unstream(grad_hidden, policy_hidden.shape)

    # Chunked and full matmuls may round differently: fp32 by reduction order (a few ulps);
    # bf16 chunks are bitwise equal to the full matmul on CPU (checked here), while cuBLAS may
    # pick another kernel for a chunk and differ by one bf16 ulp.
    if dtype == torch.float32:
        logit_rel_err = 2.0**-20
    elif device.type == "cpu":
        chunk = _logits(policy_hidden[:1], policy_weight, policy_bias)
        assert torch.equal(chunk, policy_logits[:1]), "premise: bf16 CPU matmul rows are exact"
        logit_rel_err = 0.0
    else:
        logit_rel_err = 2.0**-8
    scored = (labels != kw.get("ignore_index", -100)).cpu()
    max_logit = torch.maximum(policy_logits.abs().amax(-1), ref_logits.abs().amax(-1)).cpu()
    token_err = 2 * logit_rel_err * max_logit.double() * scored
    row_err = token_err.sum(-1)
    if kw.get("average_log_prob", False):
        row_err = row_err / scored.sum(-1).clamp(min=1)
    agree = check_outputs(out, expected, row_logp_atol=row_err)

    # Gradients: rounding of the logits' gradient (grad_rtol) and of the matmul output, each
    # relative to Σ|terms| since the sums over V and over tokens cancel; plus the error of c_n.
    rtol = grad_rtol(dtype, backend, device) + (0 if dtype == torch.float32 else 2.0**-8)
    rtol = rtol + 2 * logit_rel_err * float(max_logit.max())
    e = {k: v.detach() for k, v in expected.items()}
    coef_err = grad_coef_atol(e, weights, labels.cpu(), kw)  # (2B,) per sequence row
    token_coef_err = (2 * coef_err.view(-1, 1) * scored).unsqueeze(-1)  # |onehot − p| ≤ 2 in L1
    row_mask = torch.cat([agree, agree]).view(-1, 1, 1)
    floor = grad_atol_floor(dtype)  # subnormal rounding of a gradient written in dtype
    atol_hidden = rtol * (g.abs() @ w64.abs()) + token_coef_err * w64.abs().amax() + floor
    assert_close(
        grad_hidden,
        expected_grad_hidden,
        rtol=rtol,
        atol=atol_hidden,
        name="grad_hidden",
        mask=row_mask,
    )
    if agree.all():
        xs = x64.abs().flatten(0, 1)
        coef_part = token_coef_err.flatten(0, 1).t() @ xs
        atol_weight = rtol * (g.abs().flatten(0, 1).t() @ xs) + coef_part + floor
        assert_close(
            leaves["policy_weight"].grad,
            expected_grad_weight,
            rtol=rtol,
            atol=atol_weight,
            name="grad_weight",
        )
        if policy_bias is not None:
            atol_bias = rtol * g.abs().sum((0, 1)) + token_coef_err.sum() + floor
            assert_close(
                leaves["policy_bias"].grad,
                expected_grad_bias,
                rtol=rtol,
                atol=atol_bias,
                name="grad_bias",
            )
    for k, leaf in leaves.items():
        assert leaf.grad.dtype == dtype, k
    for k in ("ref_hidden", "ref_weight", "ref_bias"):
        assert inputs[k] is None or inputs[k].grad is None
    # Log-probabilities of single tokens are ≤ 0, so every row sum is too.
    assert (out.chosen_logps <= 0).all() and (out.rejected_logps <= 0).all()
    assert (out.ref_chosen_logps <= 0).all() and (out.ref_rejected_logps <= 0).all()
    return out
