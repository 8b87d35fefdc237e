"""Public entry point: ε-DPO from hidden states and lm_head weights, without the logits."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from . import params as P
from . import validation as V
from . import vocab_parallel as VP
from .autograd import LinearEpsilonDPOFunction
from .entry import compute_loss
from .linear_chunks import LinearChunks, default_chunk_rows
from .output import EpsilonDPOOutput


@torch.compiler.disable
def linear_epsilon_dpo_loss(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    epsilon: float = 0.01,
    policy_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    sequence_group=None,
) -> EpsilonDPOOutput:
    """ε-DPO from the last hidden states and the lm_head weights, never materialising the
    ``(2B, T, V)`` logits. Same result as ``epsilon_dpo_loss(policy_hidden @ policy_weight.T +
    policy_bias, ref_hidden @ ref_weight.T + ref_bias, labels, ...)``.

    Only scored positions (label ≠ ``ignore_index``) are computed. The forward forms the policy
    and reference logits ``chunk_size`` tokens at a time; the backward recomputes the policy
    logits one vocabulary slice of ``vocab_chunk_size`` rows at a time over all scored tokens, and
    writes each slice's weight gradient once with one GEMM (fp32 accumulation inside it). Extra
    memory is a chunk or a slice, the scored hidden states and an S × H fp32 gradient
    accumulator: it does not grow with S·V, and no V × H fp32 buffer exists. Matmul FLOPs: 5
    units of 2·S·H·V (policy and reference logits, recompute, ∂hidden, ∂weight) against the
    floor of 4. Each call synchronises the host once (counting the scored labels while checking
    them); on the Triton backend nothing else does.

    Args:
        policy_hidden: ``(2B, T, H)`` last hidden states of the policy (rows ``[0, B)`` chosen,
            ``[B, 2B)`` rejected); ``policy_hidden[:, t]`` scores ``labels[:, t]``.
        policy_weight: ``(V, H)`` policy lm_head weight (tied embeddings are fine); or a
            DTensor sharded over the vocabulary (``Shard(0)`` on one mesh dimension, as
            ``ColwiseParallel`` gives) with the hidden states replicated: vocabulary
            parallelism (vocab_parallel.py); its gradient comes back with its placement.
        ref_hidden: ``(2B, T, H_ref)`` reference hidden states; no gradient.
        ref_weight: ``(V, H_ref)`` reference lm_head weight; no gradient.
        labels: ``(2B, T)`` integer labels, ``ignore_index`` on prompt and padding.
        policy_bias, ref_bias: optional ``(V,)`` lm_head biases.
        chunk_size: scored tokens per forward chunk; default: as many as keep the chunk's policy
            and reference logits within 256 MiB on CUDA, 32 MiB on CPU, rounded down to a
            multiple of 256 when that many fit.
        vocab_chunk_size: vocabulary rows per backward slice; default: as many as keep the
            slice's logits over every scored token within the same budget (a multiple of 256
            when possible).
        sequence_ids, num_pairs: a packed (padding-free) stream, as for ``epsilon_dpo_loss``:
            hidden states ``(N, H)`` (or ``(1, N, H)``), labels and ``sequence_ids`` ``(N,)``
            (or ``(1, N)``).
        beta, epsilon, label_smoothing, ignore_index, average_log_prob, backend,
            sequence_group: as for ``epsilon_dpo_loss``. Under a sequence group, the weight
            gradients summed over the group equal the single-process gradient.

    Gradients reach ``policy_hidden``, ``policy_weight`` and ``policy_bias``, in their dtypes.
    Under ``torch.autocast`` the matmuls run in the autocast dtype, as ``lm_head(hidden)``
    would (inputs of any float dtypes, cast as they are read: no cast copy of a weight lives
    past the forward), and each gradient is accumulated in fp32 and rounded once, to its
    input's own dtype; the loss itself always accumulates in fp32.

    Example:
        >>> B, T, H, V = 2, 6, 16, 301
        >>> hidden = torch.randn(2 * B, T, H, requires_grad=True)
        >>> lm_head = torch.nn.Linear(H, V, bias=False)
        >>> ref_hidden, ref_weight = hidden.detach() + 0.1, lm_head.weight.detach().clone()
        >>> labels = torch.randint(0, V, (2 * B, T))
        >>> labels[:, :2] = -100
        >>> out = linear_epsilon_dpo_loss(hidden, lm_head.weight, ref_hidden, ref_weight, labels,
        ...                               beta=0.1, chunk_size=5)
        >>> out.loss.backward()
        >>> hidden.grad.shape, lm_head.weight.grad.shape
        (torch.Size([4, 6, 16]), torch.Size([301, 16]))
    """
    options = dict(
        beta=beta,
        epsilon=epsilon,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        backend=backend,
    )
    P.check_loss_options(**options)
    local, shard = VP.localize(
        policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias
    )
    V.check_not_sharded(**dict(zip(VP.LINEAR_INPUTS, local)))
    policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias = local
    if V.check_packing(sequence_ids, num_pairs):
        policy_hidden, ref_hidden, labels, sequence_ids = V.packed_inputs(
            "policy_hidden", policy_hidden, "ref_hidden", ref_hidden, labels, sequence_ids
        )
    V.check_tensor("policy_hidden", policy_hidden, ndim=3, float_dtype=True)
    V.check_tensor("policy_weight", policy_weight, ndim=2, float_dtype=True)
    V.check_tensor("ref_hidden", ref_hidden, ndim=3, float_dtype=True)
    V.check_tensor("ref_weight", ref_weight, ndim=2, float_dtype=True)
    # Under autocast the matmuls run in the autocast dtype, as `lm_head(hidden)` would. The
    # drivers cast what they read (linear_chunks.LinearChunks.matmul_dtype), so that no cast
    # copy of a weight outlives the forward and every gradient is accumulated in fp32 and
    # rounded once, to its parameter's own dtype. Autocast stays out of the kernels, which
    # choose their own fp32 accumulation.
    autocast_dtype = _autocast_dtype(policy_hidden.device.type)
    rows, tokens, hidden_size = policy_hidden.shape
    vocab = policy_weight.shape[0]  # this rank's rows under vocabulary parallelism
    if num_pairs is None:
        V.check_pair_rows("policy_hidden", rows)
    if tokens == 0 or (vocab == 0 and shard is None) or hidden_size == 0:
        raise ValueError(
            f"policy_hidden must have T > 0 and H > 0 and policy_weight V > 0, got hidden "
            f"{tuple(policy_hidden.shape)} and weight {tuple(policy_weight.shape)}"
        )
    autocast = autocast_dtype is not None
    _check_pair("policy", policy_hidden, policy_weight, policy_bias, rows, tokens, vocab, autocast)
    _check_pair("ref", ref_hidden, ref_weight, ref_bias, rows, tokens, vocab, autocast)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    V.check_labels(labels, rows=rows, tokens=tokens)
    device = V.check_same_device(
        policy_hidden=policy_hidden,
        policy_weight=policy_weight,
        policy_bias=policy_bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        labels=labels,
        sequence_ids=sequence_ids,
    )
    backend = P.resolve_backend(backend, device)
    element_size = max(  # the logits'
        torch.empty(0, dtype=autocast_dtype or w.dtype).element_size()
        for w in (policy_weight, ref_weight)
    )
    chunks = LinearChunks(
        chunk_rows=chunk_size or default_chunk_rows(max(1, vocab), element_size, device.type),
        vocab_chunk_rows=vocab_chunk_size or 0,
        matmul_dtype=autocast_dtype,
        shard=shard,
    )
    if shard is not None:
        VP.check_vocab_group(shard, labels, options)
    with torch.autocast(device.type, enabled=False) if autocast_dtype else nullcontext():
        return compute_loss(
            LinearEpsilonDPOFunction,
            (policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels),
            n_policy=3,
            labels=labels,
            vocab=vocab if shard is None else shard.vocab,
            options=options,
            backend=backend,
            path_option=chunks,
            sequence_ids=sequence_ids,
            num_pairs=num_pairs,
            sequence_group=sequence_group,
        )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _check_pair(prefix, hidden, weight, bias, rows, tokens, vocab, autocast) -> None:
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


class LinearEpsilonDPOHead(nn.Module):
    """The policy's lm_head as a module whose forward computes the ε-DPO loss.

    Give it the model's own output-embedding module (``model.get_output_embeddings()``), so
    the parameters are shared, tied embeddings included. Under FSDP2 the lm_head weight is
    sharded: either ``fully_shard`` this module (untied head), so its forward all-gathers the
    weight and its backward reduce-scatters the gradient, or call it inside the forward of a
    module that owns both the model and the head and is itself ``fully_shard``-ed (tied
    embeddings live in that root group). ``train/run.py`` does the latter.

    Example:
        >>> head = LinearEpsilonDPOHead(torch.nn.Linear(16, 301, bias=False))
        >>> hidden = torch.randn(4, 6, 16, requires_grad=True)
        >>> labels = torch.randint(0, 301, (4, 6))
        >>> out = head(hidden, hidden.detach(), head.weight.detach(), labels, beta=0.1)
        >>> out.loss.backward()
    """

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
            raise TypeError(
                "lm_head must be a module with a .weight of shape (V, H), e.g. nn.Linear"
            )
        self.lm_head = lm_head

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    def forward(
        self,
        policy_hidden: torch.Tensor,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        ref_bias: torch.Tensor | None = None,
        **loss_kwargs,
    ) -> EpsilonDPOOutput:
        return linear_epsilon_dpo_loss(
            policy_hidden,
            self.weight,
            ref_hidden,
            ref_weight,
            labels,
            policy_bias=self.bias,
            ref_bias=ref_bias,
            **loss_kwargs,
        )
