"""Soft-capped and scaled logits through the linear path: Gemma 2's cap·tanh(z/cap), Cohere's
and Granite's scale, fused where the kernels read each chunk, against float64 and against the
models' own logits."""

from __future__ import annotations

import math

import pytest
import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels import layout as L
from epsdpo_kernels.params import LossParams
from tests.helpers.batches import make_linear_batch
from tests.helpers.checks import compare_linear
from tests.helpers.compare import VALUE_TOL, assert_close
from tests.helpers.models import tiny_transformed_lm
from tests.helpers.packing import pack
from tests.helpers.parity import fp32_sum_rel_error

# (cap, scale): a cap far above the logits (Gemma 2's 30), caps that bite, a scale alone
# (Cohere's 0.0625), and both.
TRANSFORMS = [(30.0, 1.0), (2.0, 1.0), (None, 0.0625), (1.5, 3.0)]
IDS = ["cap-30", "cap-2", "scale-0.0625", "cap-1.5-scale-3"]


def _batch(dtype, device, spread=4.0, seed=1):
    inputs = make_linear_batch(2, 7, 16, 301, dtype=dtype, device=device, bias=True, seed=seed)
    for key in ("policy_hidden", "ref_hidden"):  # logits of ±10 and more: the caps bite
        inputs[key] = inputs[key] * spread
    return inputs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cap, scale", TRANSFORMS, ids=IDS)
def test_transformed_linear_loss_matches_the_float64_reference(backend, device, dtype, cap, scale):
    """Every field and every gradient against docs/SPEC.md in float64 on the model's logits
    cap·tanh(scale·z/cap), z = hidden @ W.T + b (the reference applies the transform itself)."""
    compare_linear(
        _batch(dtype, device),
        backend=backend,
        chunk_size=5,
        vocab_chunk_size=64,
        beta=0.1,
        epsilon=0.2,
        logit_softcap=cap,
        logit_scale=scale,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sequences", "tokens"])
def test_transformed_packed_stream_matches_the_padded_reference(backend, device, mode):
    inputs = _batch(torch.float32, device, seed=3)
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=4,
        packing=pack(inputs["labels"].cpu(), seed=3, mode=mode, fillers=2),
        beta=0.1,
        epsilon=0.1,
        logit_softcap=2.0,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_far_past_the_cap_saturate_without_overflow(backend, device):
    """z of ±1e4 against a cap of 5: tanh is ±1 to the last bit, the exponentials of its
    formula overflow to inf and underflow to 0 (both give exactly ±cap), and everything stays
    finite and equal to float64."""
    compare_linear(
        _batch(torch.float32, device, spread=3000.0, seed=4),
        backend=backend,
        chunk_size=6,
        beta=0.1,
        epsilon=0.3,
        logit_softcap=5.0,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_equal_to_reference_still_takes_no_step_under_a_cap(backend, device):
    """The cap is one function of each logit, the same for policy and reference streams, so
    h == g stays bitwise h == g and every step is exactly 0."""
    inputs = _batch(torch.bfloat16, device, seed=5)
    out = linear_epsilon_dpo_loss(
        inputs["policy_hidden"],
        inputs["policy_weight"],
        inputs["policy_hidden"],
        inputs["policy_weight"],
        inputs["labels"],
        policy_bias=inputs["policy_bias"],
        ref_bias=inputs["policy_bias"],
        beta=0.1,
        epsilon=0.5,
        backend=backend,
        logit_softcap=2.0,
        logit_scale=0.5,
    )
    assert (out.steps == 0).all()
    assert torch.equal(out.logratios, out.ref_logratios)
    assert torch.equal(out.p_epsilon_logratios, out.logratios)
    assert_close(out.losses, torch.full((2,), math.log(2)), name="losses", **VALUE_TOL)


def test_the_split_forward_transforms_like_the_unsplit_one():
    """Few rows split each row's vocabulary over programs, whose partial states a merge kernel
    combines and which reads the label logits itself: it must cap them too."""
    from epsdpo_kernels.torch_backend.forward import token_forward as torch_forward
    from epsdpo_kernels.triton_backend.forward import token_forward as triton_forward
    from tests.helpers.interpreter import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    gen = torch.Generator().manual_seed(6)
    policy = 8 * torch.randn(1, 3, 5000, generator=gen)
    ref = policy + torch.randn(1, 3, 5000, generator=gen)
    labels = torch.tensor([[4999, 0, 2501]])
    params = LossParams(
        beta=0.1,
        epsilon=0.2,
        label_smoothing=0.0,
        ignore_index=-100,
        average_log_prob=False,
        backend="triton",
        scored_count=3,
        logit_scale=0.5,
        logit_softcap=3.0,
    )
    expected = torch_forward(policy, ref, labels, params)
    # Σh is a 5000-term sum that nearly cancels, in an order that depends on the split and on
    # NumPy's SIMD width (the interpreter's tl.sum is NumPy's): its rounding scales with Σ|h| of
    # the capped logits, not with the result (fp32_sum_rel_error, for each of the two sums).
    capped = 3.0 * torch.tanh(0.5 * policy.double() / 3.0)
    logit_sum_atol = 2 * fp32_sum_rel_error(policy.shape[-1]) * capped.abs().sum(-1).flatten()
    fields = [f for f in range(L.TOKEN_FIELDS) if f != L.TOK_LOGIT_SUM]
    for splits in (1, 3):
        got = triton_forward(policy, ref, labels, params, splits=splits)
        torch.testing.assert_close(
            got[fields], expected[fields], rtol=2e-6, atol=2e-6, msg=f"splits={splits}"
        )
        assert_close(
            got[L.TOK_LOGIT_SUM].double(),
            expected[L.TOK_LOGIT_SUM].double(),
            name=f"logit sum, splits={splits}",
            rtol=0,
            atol=logit_sum_atol,
        )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(logit_softcap=0.0), "logit_softcap must be None or a finite number > 0"),
        (dict(logit_softcap=-30.0), "logit_softcap must be None or a finite number > 0"),
        (dict(logit_softcap=float("nan")), "logit_softcap must be None or a finite number > 0"),
        (dict(logit_softcap="30"), "logit_softcap must be None or a finite number > 0"),
        (dict(logit_scale=0.0), "logit_scale must be a finite number > 0"),
        (dict(logit_scale=float("inf")), "logit_scale must be a finite number > 0"),
        (dict(logit_scale=None), "logit_scale must be a finite number > 0"),
    ],
)
def test_bad_transform_is_named(change, match):
    inputs = _batch(torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        linear_epsilon_dpo_loss(
            inputs["policy_hidden"],
            inputs["policy_weight"],
            inputs["ref_hidden"],
            inputs["ref_weight"],
            inputs["labels"],
            beta=0.1,
            **change,
        )


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(
    "family, transform, loss_kwargs",
    [
        ("gemma2", dict(final_logit_softcapping=30.0), dict(logit_softcap=30.0)),
        ("gemma2", dict(final_logit_softcapping=0.5), dict(logit_softcap=0.5)),
        ("cohere", dict(logit_scale=0.0625), dict(logit_scale=0.0625)),
        ("granite", dict(logits_scaling=4.0), dict(logit_scale=0.25)),
    ],
    ids=["gemma2-cap-30", "gemma2-cap-that-bites", "cohere-scale", "granite-scaling"],
)
def test_a_models_own_logits_equal_the_linear_path_with_its_transform(
    family, transform, loss_kwargs, layout
):
    """epsilon_dpo_loss on model(...).logits (the model caps or scales them itself) and
    linear_epsilon_dpo_loss on its last hidden states with the transform: the same loss, every
    field, and the same gradient of every parameter. ``packed``: the linear path's model runs
    the four sequences as one row (position_ids restarting at 0: attention stays inside each)
    and the loss takes the stream with sequence_ids, against the padded rows' logits."""
    model = tiny_transformed_lm(family, **transform)
    for p in model.parameters():  # logits of a few units, so that a cap of 0.5 bites
        p.data.mul_(4 if family == "gemma2" else 1)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 301, (4, 9), generator=gen)
    labels = input_ids[:, 1:].clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    ref = tiny_transformed_lm(family, **transform)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with torch.no_grad():
        ref_logits = ref(input_ids).logits[:, :-1]
        ref_hidden = ref.get_decoder()(input_ids).last_hidden_state[:, :-1]
    by_logits = epsilon_dpo_loss(
        model(input_ids).logits[:, :-1], ref_logits, labels, beta=0.1, epsilon=0.3
    )
    expected = grads(by_logits.loss)
    rows, length = input_ids.shape
    if layout == "padded":
        hidden = model.get_decoder()(input_ids).last_hidden_state[:, :-1]
        stream = {}
        loss_labels = labels
    else:
        positions = torch.arange(length).repeat(rows).view(1, -1)
        # use_cache=False: transformers finds packed sequences in position_ids only without a
        # cache (the trainers pass it too).
        packed = model.get_decoder()(input_ids.view(1, -1), position_ids=positions, use_cache=False)
        # Each sequence's last hidden state scores nothing (its successor is another sequence's).
        hidden = packed.last_hidden_state.view(rows, length, -1)[:, :-1].reshape(1, -1, 32)
        ref_hidden = ref_hidden.reshape(1, -1, 32)
        loss_labels = labels.reshape(1, -1)
        ids = torch.arange(rows).repeat_interleave(length - 1).view(1, -1)
        stream = dict(sequence_ids=ids, num_pairs=rows // 2)
    by_hidden = linear_epsilon_dpo_loss(
        hidden,
        model.get_output_embeddings().weight,
        ref_hidden,
        ref.get_output_embeddings().weight,
        loss_labels,
        beta=0.1,
        epsilon=0.3,
        **loss_kwargs,
        **stream,
    )
    got = grads(by_hidden.loss)
    assert torch.equal(by_hidden.steps, by_logits.steps)
    for name in ("loss", "losses", "chosen_logps", "rejected_logps", "logratios", "ref_logratios"):
        assert_close(
            getattr(by_hidden, name), getattr(by_logits, name), name=name, rtol=1e-5, atol=1e-5
        )
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert_close(got[name], grad, name=name, rtol=1e-4, atol=1e-6)
