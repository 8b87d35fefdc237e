"""One loss call, checked and prepared: the frozen ``LossCall`` every layer below reads.

Each public entry point hands its arguments to ``prepare_logits`` or ``prepare_linear``, which
check them in one order, before any kernel runs:

1. the scalar options (checked when the entry point built its ``LossOptions``, params.py), the
   other arguments' types and the sequence group's type;
2. DTensor localisation: a vocabulary-sharded input becomes its local shard and a ``VocabShard``
   (distributed/vocab_shard.py); any other DTensor is refused;
3. shapes, dtypes and devices (validation.py), packed streams viewed as one row;
4. the label scan: labels in range and, packed, sequence ids in range, counted in one transfer,
   the call's one host synchronisation; from it the ``LossParams`` and the token-to-sequence map;
5. one rank-agreement all-reduce per process group the call spans (the vocabulary shard's, the
   sequence group's), so that a mismatch is a ValueError on every rank, not a hang; reading it
   back is one more host synchronisation per group.

They return the plain tensors and the ``LossCall``, which the autograd Functions take as their
last argument (the way Cut Cross-Entropy's params object reaches its Function).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import params as P
from . import sequences as S
from . import validation as V
from .distributed import vocab_shard as VS
from .distributed.sequence_group import check_group_agrees, resolve_group
from .plans import LinearInputs, LinearPlan, LogitsPlan, default_chunk_rows


@dataclass(frozen=True)
class LossCall:
    """Everything below the entry points needs besides the tensors."""

    params: P.LossParams
    sequences: S.Sequences  # which sequence each token row belongs to
    vocab: int  # the whole vocabulary (a shard holds ``shard.rows`` of it)
    plan: LogitsPlan | LinearPlan  # how the path walks its work
    # Vocabulary parallelism: this rank's rows of the vocabulary, merged over the shard's group.
    shard: VS.VocabShard | None = None
    # Sequence parallelism: the ranks holding the other tokens of the same sequences.
    sequence_group: object | None = None
    # (N,) fp32 weight of each token row in the sequence sums (and so in its gradient), or None.
    token_weights: torch.Tensor | None = None


def prepare_logits(
    policy_logits,
    ref_logits,
    labels,
    *,
    options: P.LossOptions,
    inplace_backward,
    sequence_ids,
    num_pairs,
    sequence_group,
    token_weights=None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], LossCall]:
    """``epsilon_dpo_loss``'s arguments, checked: ((policy_logits, ref_logits, labels), call)."""
    P.check_flag("inplace_backward", inplace_backward)
    V.check_token_weights(token_weights, labels)
    group = resolve_group(sequence_group)
    policy_logits, ref_logits, shard = VS.localize_logits(policy_logits, ref_logits)
    V.check_not_sharded(policy_logits=policy_logits, ref_logits=ref_logits)
    if V.check_packing(sequence_ids, num_pairs):
        policy_logits, ref_logits, labels, sequence_ids = V.packed_inputs(
            "policy_logits", policy_logits, "ref_logits", ref_logits, labels, sequence_ids
        )
    V.check_tensor("policy_logits", policy_logits, ndim=3, float_dtype=True)
    V.check_tensor("ref_logits", ref_logits, ndim=3, float_dtype=True)
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"ref_logits must have the shape of policy_logits {tuple(policy_logits.shape)}, "
            f"got {tuple(ref_logits.shape)}"
        )
    rows, tokens, vocab = policy_logits.shape
    if num_pairs is None:
        V.check_pair_rows("policy_logits", rows)
    if tokens == 0 or (vocab == 0 and shard is None):
        raise ValueError(
            f"policy_logits must have T > 0 and V > 0, got shape {(rows, tokens, vocab)}"
        )
    V.check_labels(labels, rows=rows, tokens=tokens)
    device = V.check_same_device(
        policy_logits=policy_logits,
        ref_logits=ref_logits,
        labels=labels,
        sequence_ids=sequence_ids,
        token_weights=token_weights,
    )
    call = _scan_and_agree(
        labels,
        device,
        P.resolve_backend(options.backend, device),
        options=options,
        vocab=vocab if shard is None else shard.vocab,
        plan=LogitsPlan(inplace=inplace_backward),
        shard=shard,
        group=group,
        sequence_ids=sequence_ids,
        num_pairs=num_pairs,
        token_weights=token_weights,
    )
    return (policy_logits, ref_logits, labels), call


def prepare_linear(
    inputs: LinearInputs,
    labels,
    *,
    options: P.LossOptions,
    chunk_size,
    vocab_chunk_size,
    sequence_ids,
    num_pairs,
    sequence_group,
    token_weights=None,
) -> tuple[LinearInputs, torch.Tensor, LossCall]:
    """``linear_epsilon_dpo_loss``'s arguments, checked: (inputs, labels, call)."""
    V.check_token_weights(token_weights, labels)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    group = resolve_group(sequence_group)
    inputs, shard = VS.localize(inputs)
    V.check_not_sharded(**inputs._asdict())
    if V.check_packing(sequence_ids, num_pairs):
        policy_hidden, ref_hidden, labels, sequence_ids = V.packed_inputs(
            "policy_hidden",
            inputs.policy_hidden,
            "ref_hidden",
            inputs.ref_hidden,
            labels,
            sequence_ids,
        )
        inputs = inputs._replace(policy_hidden=policy_hidden, ref_hidden=ref_hidden)
    for name in ("policy_hidden", "ref_hidden"):
        V.check_tensor(name, getattr(inputs, name), ndim=3, float_dtype=True)
    for name in ("policy_weight", "ref_weight"):
        V.check_tensor(name, getattr(inputs, name), ndim=2, float_dtype=True)
    # Under autocast the matmuls run in the autocast dtype, as `lm_head(hidden)` would. The
    # drivers cast what they read (LinearPlan.matmul_dtype), so that no cast copy of a weight
    # outlives the forward and every gradient is accumulated in fp32 and rounded once, to its
    # parameter's own dtype. Autocast stays out of the kernels, which choose their own fp32
    # accumulation.
    autocast_dtype = _autocast_dtype(inputs.policy_hidden.device.type)
    rows, tokens, hidden_size = inputs.policy_hidden.shape
    vocab = inputs.policy_weight.shape[0]  # this rank's rows under vocabulary parallelism
    if num_pairs is None:
        V.check_pair_rows("policy_hidden", rows)
    if tokens == 0 or (vocab == 0 and shard is None) or hidden_size == 0:
        raise ValueError(
            f"policy_hidden must have T > 0 and H > 0 and policy_weight V > 0, got hidden "
            f"{tuple(inputs.policy_hidden.shape)} and weight {tuple(inputs.policy_weight.shape)}"
        )
    autocast = autocast_dtype is not None
    for prefix in ("policy", "ref"):
        hidden, weight, bias = (
            getattr(inputs, f"{prefix}_{k}") for k in ("hidden", "weight", "bias")
        )
        _check_head(prefix, hidden, weight, bias, rows, tokens, vocab, autocast)
    V.check_labels(labels, rows=rows, tokens=tokens)
    device = V.check_same_device(
        **inputs._asdict(), labels=labels, sequence_ids=sequence_ids, token_weights=token_weights
    )
    element_size = max(  # the logits'
        torch.empty(0, dtype=autocast_dtype or w.dtype).element_size()
        for w in (inputs.policy_weight, inputs.ref_weight)
    )
    plan = LinearPlan(
        chunk_rows=chunk_size or default_chunk_rows(max(1, vocab), element_size, device.type),
        vocab_chunk_rows=vocab_chunk_size or 0,
        matmul_dtype=autocast_dtype,
    )
    call = _scan_and_agree(
        labels,
        device,
        P.resolve_backend(options.backend, device),
        options=options,
        vocab=vocab if shard is None else shard.vocab,
        plan=plan,
        shard=shard,
        group=group,
        sequence_ids=sequence_ids,
        num_pairs=num_pairs,
        token_weights=token_weights,
    )
    return inputs, labels, call


def _scan_and_agree(
    labels,
    device,
    backend,
    *,
    options,
    vocab,
    plan,
    shard,
    group,
    sequence_ids,
    num_pairs,
    token_weights=None,
) -> LossCall:
    """Steps 4 and 5 of the module docstring: the label scan (the call's one host sync), the
    ``LossParams``, and the rank agreement of each group."""
    if token_weights is not None:
        # Zero at unscored tokens, whatever was there: their stats are zeros, and a NaN or inf
        # weight would make 0·w a NaN in a padded row's sum.
        scored = (labels != options.ignore_index).reshape(-1)
        token_weights = torch.where(scored, token_weights.reshape(-1).float(), 0.0)
    count, sequences = scan_labels(
        labels,
        vocab=vocab,
        ignore_index=options.ignore_index,
        sequence_ids=sequence_ids,
        num_sequences=2 * num_pairs if num_pairs else labels.shape[0],
        whole_sequences=group is None,
        token_weights=token_weights,
    )
    params = options.resolve(backend, count)
    if shard is not None:
        VS.check_vocab_group(shard, labels, options)
    if group is not None:
        check_group_agrees(group, device, sequences.count, options)
    return LossCall(
        params=params,
        sequences=sequences,
        vocab=vocab,
        plan=plan,
        shard=shard,
        sequence_group=group,
        token_weights=token_weights,
    )


def scan_labels(
    labels: torch.Tensor,
    *,
    vocab: int,
    ignore_index: int,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int = 0,
    whole_sequences: bool = True,
    token_weights: torch.Tensor | None = None,
) -> tuple[int, S.Sequences]:
    """The number of scored labels and the token-to-sequence map, after checking that every
    label is in [0, V) or ignore_index (a wrong one would read out of bounds in the kernels)
    and, for a packed stream, that every scored token's sequence id is in [0, 2B) and that each
    of the 2B sequences has a token in the stream (a ValueError naming num_pairs otherwise);
    sequences with no scored token get a warning. With ``whole_sequences`` False (a
    sequence_group: each rank holds parts of sequences) the last two are not judged.
    ``token_weights`` (flat, N) must be finite and ≥ 0 wherever the label is scored.
    Everything comes back in one transfer: this is the only host synchronisation of a call."""
    scored = labels != ignore_index
    bad = scored & ((labels < 0) | (labels >= vocab))
    checks = [scored.sum(), bad.sum()]
    if sequence_ids is None:
        per_sequence = scored.sum(-1)
    else:
        keys, bad_ids = S.sequence_keys(sequence_ids, scored, num_sequences)
        per_sequence = runs = S.run_lengths(keys, num_sequences)
        # Sequences no token of the stream belongs to, scored or not: num_pairs says more pairs
        # than sequence_ids holds (an easy slip that would pass as pairs of empty responses).
        keys_of_every_token, _ = S.sequence_keys(
            sequence_ids, torch.ones_like(scored), num_sequences
        )
        absent = S.run_lengths(keys_of_every_token, num_sequences) == 0
        checks += [bad_ids.sum(), runs.max(), absent.sum()]
    if token_weights is not None:
        weighted = scored.reshape(-1)
        bad_weight = weighted & ~(torch.isfinite(token_weights) & (token_weights >= 0))
        checks.append(bad_weight.sum())
    checks.append((per_sequence == 0).sum())
    values = torch.stack(checks).tolist()
    count, n_bad, n_empty = values[0], values[1], values[-1]
    if token_weights is not None and values[-2]:
        first = int(bad_weight.nonzero()[0])
        raise ValueError(
            "token_weights must be finite and >= 0 wherever the label is scored; token "
            f"{first} (flattened) has weight {float(token_weights[first])}"
        )
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"labels{list(first)} = {int(labels[first])}"
        )
    if sequence_ids is not None and values[2]:
        first = int(bad_ids.nonzero()[0])
        raise ValueError(
            f"sequence_ids must be in [0, 2·num_pairs = {num_sequences}) wherever the label is "
            f"scored; token {first} has sequence id {int(sequence_ids.reshape(-1)[first])}"
        )
    # Under a sequence_group a rank holds a part of each sequence, which may have no token or no
    # scored one: these two checks judge whole sequences only.
    if sequence_ids is not None and values[4] and whole_sequences:
        missing = absent.nonzero().flatten().tolist()
        ids = sequence_ids.reshape(-1)
        held = ids[(ids >= 0) & (ids < num_sequences)]
        highest = int(held.max()) if held.numel() else -1
        raise ValueError(
            f"num_pairs={num_sequences // 2} means sequences 0..{num_sequences - 1}, but "
            f"sequence_ids holds no token of sequence{'s' if len(missing) > 1 else ''} "
            f"{_ranges(missing)} (its highest id is {highest}); pass the number of pairs the "
            f"stream holds (ids 0..B−1 chosen, B..2B−1 rejected)"
        )
    if n_empty and whole_sequences:
        warnings.warn(
            f"labels: {n_empty} of the {num_sequences or labels.shape[0]} sequences have no "
            "scored token (every label is ignore_index): their log-probabilities are 0, and a "
            "pair of them adds log 2 to the loss with no gradient; check the completion masks "
            "and the truncation",
            stacklevel=4,
        )
    if sequence_ids is None:
        return int(count), S.padded_sequences(labels)
    return int(count), S.packed_sequences(keys, runs, int(count), int(values[3]))


def _ranges(values: list[int]) -> str:
    """[4, 5, 6, 9] → '4-6, 9' (at most 6 pieces)."""
    pieces, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            a, b = values[start], values[i - 1]
            pieces.append(str(a) if a == b else f"{a}-{b}")
            start = i
    return ", ".join(pieces[:6]) + (", …" if len(pieces) > 6 else "")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _check_head(prefix, hidden, weight, bias, rows, tokens, vocab, autocast) -> None:
    """Shapes and dtypes of one (hidden, weight, bias) triple against the policy's; under
    autocast they may be of any float dtypes (the matmuls cast them to the autocast dtype)."""
    if tuple(hidden.shape[:2]) != (rows, tokens):
        raise ValueError(
            f"{prefix}_hidden must have shape (2B, T, H) with (2B, T) = {(rows, tokens)}, "
            f"got {tuple(hidden.shape)}"
        )
    h = hidden.shape[2]
    if weight.shape[1] != h or weight.shape[0] != vocab:
        # Name what was passed: V is read from policy_weight, so a transposed policy weight
        # would otherwise be reported against a V taken from itself.
        sources = f"H = {h} from {prefix}_hidden {tuple(hidden.shape)}"
        if prefix != "policy":
            sources += f" and V = {vocab} from policy_weight"
        hint = ""
        if weight.shape[0] == h and weight.shape[1] != h:
            hint = "; it looks transposed: pass the lm_head's own weight, whose shape is (V, H)"
        raise ValueError(
            f"{prefix}_weight must have shape (V, H) with {sources}; got {prefix}_weight of "
            f"shape {tuple(weight.shape)}{hint}"
        )
    if weight.dtype != hidden.dtype and not autocast:
        raise TypeError(
            f"{prefix}_weight ({weight.dtype}) and {prefix}_hidden ({hidden.dtype}) must share a "
            "dtype: the matmul runs in the input dtype"
        )
    if bias is not None:
        V.check_tensor(f"{prefix}_bias", bias, ndim=1, float_dtype=True)
        if bias.shape != (vocab,) or (bias.dtype != weight.dtype and not autocast):
            raise ValueError(
                f"{prefix}_bias must be a ({vocab},) tensor of {weight.dtype}, "
                f"got {tuple(bias.shape)} {bias.dtype}"
            )
