"""Packed (padding-free) streams: both entry points and both backends equal the padded layout
and its float64 reference, whatever the order of the sequences and tokens in the stream."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo
from tests.helpers.batches import make_batch, make_linear_batch
from tests.helpers.checks import compare_linear, compare_to_reference
from tests.helpers.packing import pack

BACKENDS = ["torch", "triton"]


def _holes(labels, fraction, seed):
    """Unscored runs inside the responses: sequences split by ``ignore_index``."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.clone()
    labels[torch.rand(labels.shape, generator=gen) < fraction] = -100
    return labels


@pytest.mark.parametrize("backend", [*BACKENDS[:1], pytest.param("triton", marks=pytest.mark.slow)])
@settings(max_examples=30)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    v=st.sampled_from([2, 65, 507, 1000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    epsilon=st.sampled_from([0.0, 0.1, 0.5]),
    average_log_prob=st.booleans(),
    mode=st.sampled_from(["sequences", "tokens"]),
    fillers=st.integers(0, 4),
    holes=st.sampled_from([0.0, 0.3]),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_logits_match_the_padded_reference(
    backend, device, b, t, v, dtype, epsilon, average_log_prob, mode, fillers, holes, inplace, seed
):
    """Shuffled sequences or fully interleaved tokens, unscored fillers with arbitrary ids
    between them, one-token sequences (t = 1) and sequences split by unscored runs."""
    policy, ref, labels = make_batch(b, t, v, dtype=dtype, device=device, seed=seed)
    labels = _holes(labels, holes, seed)
    compare_to_reference(
        policy,
        ref,
        labels,
        backend=backend,
        inplace=inplace,
        packing=pack(labels, seed=seed, mode=mode, fillers=fillers),
        beta=0.1,
        epsilon=epsilon,
        label_smoothing=0.1,
        average_log_prob=average_log_prob,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["sequences", "tokens"])
def test_packed_hidden_states_match_the_padded_reference(backend, device, dtype, mode):
    inputs = make_linear_batch(3, 7, 16, 301, dtype=dtype, device=device, bias=True, seed=5)
    inputs["labels"] = _holes(inputs["labels"], 0.2, 5)
    compare_linear(
        inputs,
        backend=backend,
        chunk_size=4,
        vocab_chunk_size=64,
        packing=pack(inputs["labels"], seed=1, mode=mode, fillers=3),
        beta=0.1,
        epsilon=0.1,
        average_log_prob=mode == "tokens",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_without_scored_tokens_is_an_all_ignored_row_and_warns(backend, device):
    """Pair 0's rejected and pair 1's chosen sequences have only unscored tokens: both count 0
    and sum to 0, as all-ignored padded rows do, and the call says so (in both layouts)."""
    policy, ref, labels = make_batch(2, 5, 70, device=device, seed=2, empty_rows=(1, 2))
    with pytest.warns(UserWarning, match="labels: 2 of the 4 sequences have no scored token"):
        compare_to_reference(
            policy,
            ref,
            labels,
            backend=backend,
            packing=pack(labels, seed=0),
            beta=0.1,
            epsilon=0.1,
        )
    with pytest.warns(UserWarning, match="labels: 2 of the 4 sequences have no scored token"):
        epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_pairs_that_contradicts_sequence_ids_is_refused(backend, device):
    """A stream of 2 pairs passed with num_pairs=4 once gave 4 "pairs" whose rejected responses
    were empty (log-prob 0) and a wrong loss; a sequence with no token at all in the stream is
    refused, naming num_pairs."""
    policy, ref, labels = make_batch(2, 5, 70, device=device, seed=2)
    packing = pack(labels, seed=0, fillers=1)
    stream = dict(
        policy_logits=packing.stream(policy),
        ref_logits=packing.stream(ref),
        labels=packing.labels(labels),
        sequence_ids=packing.sequence_ids.to(device),
        beta=0.1,
        backend=backend,
    )
    with pytest.raises(ValueError, match=r"num_pairs=4 means sequences 0\.\.7, .* sequences 4-7"):
        epsilon_dpo_loss(**stream, num_pairs=4)
    keep = (packing.source < 0) | (packing.source // 5 != 1)  # drop sequence 1 entirely
    dropped = {k: v[keep.to(v.device)] if torch.is_tensor(v) else v for k, v in stream.items()}
    with pytest.raises(ValueError, match="holds no token of sequence 1 "):
        epsilon_dpo_loss(**dropped, num_pairs=2)
    assert torch.isfinite(epsilon_dpo_loss(**stream, num_pairs=2).loss)


def test_reference_packed_equals_padded_in_float64():
    """The reference's own packed path (sums by sequence id) against its padded one."""
    policy, ref, labels = make_batch(3, 8, 97, dtype=torch.float64, seed=4)
    packing = pack(labels, seed=4, mode="tokens", fillers=2)
    packed = reference_epsilon_dpo(
        packing.stream(policy, fill=0.0),
        packing.stream(ref, fill=0.0),
        packing.labels(labels),
        beta=0.1,
        epsilon=0.2,
        sequence_ids=packing.sequence_ids,
        num_pairs=3,
    )
    padded = reference_epsilon_dpo(policy, ref, labels, beta=0.1, epsilon=0.2)
    for name, value in padded.items():
        torch.testing.assert_close(packed[name], value, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("entry", ["logits", "linear"])
def test_packed_shapes_with_and_without_the_leading_one(entry, device):
    """(N, F) and (1, N, F) streams give the same result and a gradient of their own shape."""
    n, v, h = 10, 33, 8
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    ids = torch.tensor([0, 0, 2, 2, 1, 3, 3, 1, 0, 2], device=device)
    results = []
    for lead in ((), (1,)):
        gen = torch.Generator().manual_seed(1)
        if entry == "logits":
            policy = torch.randn(n, v, generator=gen).to(device).view(*lead, n, v)
            policy.requires_grad_(True)
            ref = policy.detach() + 0.1
            out = epsilon_dpo_loss(
                policy,
                ref,
                labels.view(*lead, n),
                beta=0.1,
                sequence_ids=ids.view(*lead, n),
                num_pairs=2,
            )
        else:
            policy = torch.randn(n, h, generator=gen).to(device).view(*lead, n, h)
            policy.requires_grad_(True)
            weight = torch.randn(v, h, generator=gen).to(device)
            out = linear_epsilon_dpo_loss(
                policy,
                weight,
                policy.detach() + 0.1,
                weight,
                labels.view(*lead, n),
                beta=0.1,
                sequence_ids=ids.view(*lead, n),
                num_pairs=2,
            )
        out.loss.backward()
        assert policy.grad.shape == policy.shape and out.losses.shape == (2,)
        results.append((out.losses.detach(), policy.grad.reshape(n, -1)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def _packed_call(**change):
    n, v = 6, 11
    args = dict(
        policy_logits=torch.randn(n, v),
        ref_logits=torch.randn(n, v),
        labels=torch.tensor([1, 2, -100, 3, 4, 5]),
        beta=0.1,
        sequence_ids=torch.tensor([0, 0, 9, 1, 1, 1]),
        num_pairs=1,
    )
    args.update(change)
    return epsilon_dpo_loss(**args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(num_pairs=None), ValueError, "sequence_ids and num_pairs must be given together"),
        (dict(sequence_ids=None), ValueError, "sequence_ids and num_pairs must be given together"),
        (dict(num_pairs=0), ValueError, "num_pairs must be a positive int"),
        (dict(num_pairs=1.0), ValueError, "num_pairs must be a positive int"),
        (
            dict(sequence_ids=torch.tensor([0, 0, 0, 1, 1, 2])),
            ValueError,
            r"token 5 has sequence id 2",
        ),
        (
            dict(sequence_ids=torch.tensor([0, -1, 0, 1, 1, 1])),
            ValueError,
            r"\[0, 2·num_pairs = 2\)",
        ),
        (dict(sequence_ids=torch.zeros(6)), TypeError, "sequence_ids must be an integer tensor"),
        (
            dict(sequence_ids=torch.zeros(5, dtype=torch.long)),
            ValueError,
            "sequence_ids must have shape",
        ),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(policy_logits=torch.randn(2, 3, 11)), ValueError, "policy_logits must have shape"),
        (dict(sequence_ids=[0, 0, 0, 1, 1, 1]), TypeError, "sequence_ids must be a torch.Tensor"),
    ],
)
def test_bad_packed_input_is_named(change, error, match):
    with pytest.raises(error, match=match):
        _packed_call(**change)


def test_unscored_tokens_ids_are_never_checked():
    """The filler at position 2 carries id 9 (out of range) and is not scored: accepted."""
    assert torch.isfinite(_packed_call().loss)
