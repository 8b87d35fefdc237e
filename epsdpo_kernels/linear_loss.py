"""Public entry point: ε-DPO from hidden states and lm_head weights, without the logits."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .autograd import LinearEpsilonDPOFunction, run
from .call import prepare_linear
from .output import EpsilonDPOOutput, build_output
from .params import LossOptions
from .plans import LinearInputs


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
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    token_weights: torch.Tensor | None = None,
    wpo_weights: bool = False,
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
    them), plus once per process group it spans (the ranks' agreement check); on the Triton
    backend nothing else does.

    Args:
        policy_hidden: ``(2B, T, H)`` last hidden states of the policy (rows ``[0, B)`` chosen,
            ``[B, 2B)`` rejected); ``policy_hidden[:, t]`` scores ``labels[:, t]``.
        policy_weight: ``(V, H)`` policy lm_head weight (tied embeddings are fine); or a
            DTensor sharded over the vocabulary (``Shard(0)`` on one mesh dimension, as
            ``ColwiseParallel`` gives) with the hidden states replicated: vocabulary
            parallelism (distributed/vocab_shard.py); its gradient comes back with its
            placement.
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
        logit_softcap, logit_scale: the model's map from lm_head outputs z to its logits,
            for policy and reference alike (one model family): ``logits = logit_softcap ·
            tanh(logit_scale · z / logit_softcap)``, or ``logit_scale · z`` without a cap, as
            transformers applies them (Gemma 2: ``final_logit_softcapping``; Cohere:
            ``logit_scale``; Granite: ``1 / logits_scaling``). Applied where the kernels read
            each chunk's logits, and its slope in the backward: no extra pass over V. ε-DPO's
            mixes are of these final logits (docs/SPEC.md).
        beta, epsilon, label_smoothing, ignore_index, average_log_prob, backend,
            sequence_group, token_weights, wpo_weights: as for ``epsilon_dpo_loss`` (WPO's
            Σ_v p² of the model's final logits, after ``logit_softcap``/``logit_scale``).
            Under a sequence group, the weight gradients summed over the group equal the
            single-process gradient.

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
    options = LossOptions(
        beta=beta,
        epsilon=epsilon,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        backend=backend,
        wpo_weights=wpo_weights,
        logit_softcap=logit_softcap,
        logit_scale=logit_scale,
    )
    inputs, labels, call = prepare_linear(
        LinearInputs(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias),
        labels,
        options=options,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        sequence_ids=sequence_ids,
        num_pairs=num_pairs,
        sequence_group=sequence_group,
        token_weights=token_weights,
    )
    # Autocast stays out of the kernels and the steps, which cast what they read themselves.
    with (
        torch.autocast(labels.device.type, enabled=False)
        if call.plan.matmul_dtype
        else nullcontext()
    ):
        losses, chosen, rejected, pair = run(LinearEpsilonDPOFunction, *inputs, labels, call=call)
    return build_output(
        losses,
        chosen,
        rejected,
        pair,
        beta=call.params.beta,
        vocab=call.vocab,
        wpo_weights=call.params.wpo_weights,
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
