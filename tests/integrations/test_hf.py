"""causal_lm_hidden_and_head on tiny Hugging Face models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epsdpo_kernels import causal_lm_hidden_and_head, epsilon_dpo_loss, linear_epsilon_dpo_loss  # noqa: E402
from tests.helpers.compare import assert_close  # noqa: E402
from tests.helpers.models import TINY_DECODER  # noqa: E402


def tiny_llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=211,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **TINY_DECODER,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_linear_loss_from_hf_model_equals_loss_on_its_logits(tie):
    policy, ref = tiny_llama(tie, seed=0), tiny_llama(tie, seed=1)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 211, (4, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.roll(-1, dims=1)  # position t scores token t + 1
    labels[:, -1] = -100
    labels[:, :4] = -100  # prompt
    labels[attention_mask.roll(-1, dims=1) == 0] = -100

    hidden, weight, bias = causal_lm_hidden_and_head(policy, input_ids, attention_mask)
    with torch.no_grad():
        ref_hidden, ref_weight, ref_bias = causal_lm_hidden_and_head(ref, input_ids, attention_mask)
    assert hidden.shape == (4, 12, 32) and weight.shape == (211, 32) and bias is None
    if tie:
        assert weight is policy.get_input_embeddings().weight
    out = linear_epsilon_dpo_loss(
        hidden, weight, ref_hidden, ref_weight, labels, beta=0.1, epsilon=0.1, chunk_size=7
    )
    out.loss.backward()
    linear_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = epsilon_dpo_loss(logits, ref_logits, labels, beta=0.1, epsilon=0.1)
    expected.loss.backward()
    assert_close(out.losses, expected.losses, rtol=1e-5, atol=1e-6, name="losses")
    assert torch.equal(out.steps, expected.steps)
    for got, param in zip(linear_grads, policy.parameters()):
        assert_close(got, param.grad, rtol=1e-4, atol=1e-7, name="param grad")


def test_a_soft_capped_model_returns_its_transform_and_is_refused_without_asking():
    """Its logits are not hidden @ W.T: a caller that did not ask for the transform (and so
    would not pass it to the loss) is refused, naming the way."""
    model = tiny_llama(False)
    model.config.final_logit_softcapping = 30.0
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"soft-capped at 30, not .*return_logit_transform=True"):
        causal_lm_hidden_and_head(model, ids)
    *_, transform = causal_lm_hidden_and_head(model, ids, return_logit_transform=True)
    assert transform == {"logit_softcap": 30.0, "logit_scale": 1.0}


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(), {"logit_softcap": None, "logit_scale": 1.0}),
        (dict(final_logit_softcapping=None), {"logit_softcap": None, "logit_scale": 1.0}),
        (dict(logit_scale=0.0625), {"logit_softcap": None, "logit_scale": 0.0625}),
        (dict(logits_scaling=4.0), {"logit_softcap": None, "logit_scale": 0.25}),
        (
            dict(logits_scaling=4.0, model_type="hyperclovax"),
            {"logit_softcap": None, "logit_scale": 4.0},
        ),
        (dict(lm_head_multiplier=2.0), {"logit_softcap": None, "logit_scale": 2.0}),
        (dict(final_logit_softcapping=15.0), {"logit_softcap": 15.0, "logit_scale": 1.0}),
    ],
    ids=["plain", "cap-none", "cohere", "granite", "hyperclovax", "falcon-h1", "nanochat"],
)
def test_the_logit_transform_is_read_as_transformers_applies_it(fields, expected):
    from types import SimpleNamespace

    from epsdpo_kernels.hugging_face import logit_transform

    assert logit_transform(SimpleNamespace(**fields)) == expected


def test_a_transform_the_loss_cannot_follow_is_refused_by_name():
    from types import SimpleNamespace

    from epsdpo_kernels.hugging_face import logit_transform

    with pytest.raises(ValueError, match="output_multiplier_scale=3.0"):
        logit_transform(SimpleNamespace(output_multiplier_scale=3.0))


def test_refuses_non_causal_lm():
    with pytest.raises(TypeError, match="get_decoder"):
        causal_lm_hidden_and_head(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("tie", [False, True])
def test_a_packed_sequence_sees_only_itself(tie):
    """Packed rows (position_ids restarting at 0, no attention mask): each sequence's hidden
    states are those it has alone, so a packed batch trains on exactly the padded batch's
    sequences."""
    model = tiny_llama(tie).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 4]
    seqs = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
    ids = torch.cat(seqs).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed, _, _ = causal_lm_hidden_and_head(model, ids, None, position_ids=positions)
        at = 0
        for seq in seqs:
            alone, _, _ = causal_lm_hidden_and_head(model, seq.unsqueeze(0))
            span = packed[0, at : at + len(seq)]
            assert_close(span, alone[0], rtol=1e-5, atol=1e-5, name=f"sequence at {at}")
            at += len(seq)
