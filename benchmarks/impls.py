"""The implementations the benchmark compares, each a function of the same inputs.

Every implementation starts from hidden states and lm_head weights, as a training step does:
the logits-based rows form the logits with a matmul inside the timed region.
"""

from __future__ import annotations

import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo

IMPLS = ["eager", "compiled", "epsdpo-logits", "epsdpo-linear", "liger-dpo"]


def make_inputs(b, t, h, v, dtype, device, seed=0):
    """Half of every sequence is prompt (ignored), as in real preference data."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    ref_hidden = hidden + 0.1 * torch.randn(2 * b, t, h, generator=gen)
    ref_weight = weight + 0.1 * torch.randn(v, h, generator=gen) / h**0.5
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    labels[:, : t // 2] = -100
    to = dict(device=device, dtype=dtype)
    return dict(
        hidden=hidden.to(**to).requires_grad_(),
        weight=weight.to(**to).requires_grad_(),
        ref_hidden=ref_hidden.to(**to),
        ref_weight=ref_weight.to(**to),
        labels=labels.to(device),
    )


def eager_loss(hidden, weight, ref_hidden, ref_weight, labels, beta, epsilon):
    """What the authors' TRL trainer does: materialise both logits, log-softmax the policy,
    the reference and both mixes over the full vocabulary, autograd through the policy."""
    logits = hidden @ weight.t()
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.t()
    out = reference_epsilon_dpo(
        logits, ref_logits, labels, beta=beta, epsilon=epsilon, dtype=torch.float32
    )
    return out["loss"]


def build(name: str, inputs: dict, beta: float, epsilon: float, device: torch.device):
    """A zero-argument callable returning the scalar loss (differentiable)."""
    args = (
        inputs["hidden"],
        inputs["weight"],
        inputs["ref_hidden"],
        inputs["ref_weight"],
        inputs["labels"],
    )
    if name == "eager":
        return lambda: eager_loss(*args, beta, epsilon)
    if name == "compiled":
        compiled = torch.compile(eager_loss)
        return lambda: compiled(*args, beta, epsilon)
    if name == "epsdpo-logits":

        def logits_step():
            logits = inputs["hidden"] @ inputs["weight"].t()
            with torch.no_grad():
                ref_logits = inputs["ref_hidden"] @ inputs["ref_weight"].t()
            # The logits come from a matmul and feed only this loss: in-place backward is safe.
            return epsilon_dpo_loss(
                logits,
                ref_logits,
                inputs["labels"],
                beta=beta,
                epsilon=epsilon,
                inplace_backward=True,
            ).loss

        return logits_step
    if name == "epsdpo-linear":
        return lambda: linear_epsilon_dpo_loss(*args, beta=beta, epsilon=epsilon).loss
    if name == "liger-dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Plain DPO (no ε-step): less work than ε-DPO. torch.compile only on CUDA.
        loss_fn = LigerFusedLinearDPOLoss(
            beta=beta, compiled=device.type == "cuda", use_ref_model=True
        )

        def liger_step():
            out = loss_fn(
                inputs["weight"],
                inputs["hidden"],
                inputs["labels"],
                ref_input=inputs["ref_hidden"],
                ref_weight=inputs["ref_weight"],
            )
            return out[0] if isinstance(out, tuple) else out

        return liger_step
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")
