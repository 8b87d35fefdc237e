"""The implementations the benchmark compares, each a function of the same inputs.

Every implementation starts from hidden states and lm_head weights, as a training step does:
the logits-based rows form the logits with a matmul inside the timed region.
"""

from __future__ import annotations

import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from epsdpo_kernels.reference import reference_epsilon_dpo

IMPLS = [
    "eager",
    "compiled",
    "epsdpo-logits",
    "epsdpo-linear",
    "epsdpo-linear-softcap",
    "trl-dpo",
    "liger-dpo",
]
# Gemma 2's final_logit_softcapping: the capped row is checked against eager with the same cap.
SOFTCAP = 30.0
# Plain DPO (no ε step): less work than ε-DPO; checked against eager at ε = 0.
PLAIN_DPO = ("trl-dpo", "liger-dpo")


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


def eager_loss(hidden, weight, ref_hidden, ref_weight, labels, beta, epsilon, softcap=None):
    """What the authors' TRL trainer does: materialise both logits, log-softmax the policy,
    the reference and both mixes over the full vocabulary, autograd through the policy."""
    logits = hidden @ weight.t()
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.t()
    out = reference_epsilon_dpo(
        logits,
        ref_logits,
        labels,
        beta=beta,
        epsilon=epsilon,
        dtype=torch.float32,
        logit_softcap=softcap,
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
    if name == "epsdpo-linear-softcap":
        # Gemma 2's logits: the cap fused where the kernels read each chunk's logits.
        return lambda: (
            linear_epsilon_dpo_loss(*args, beta=beta, epsilon=epsilon, logit_softcap=SOFTCAP).loss
        )
    if name == "trl-dpo":
        return _trl_dpo(inputs, beta)
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


def _trl_dpo(inputs: dict, beta: float):
    """What TRL 1.16's DPOTrainer runs (sigmoid loss): its fused LM head,
    ``trl.kernels.ChunkedLogProbFunction`` (cuBLAS tiles of 4096 tokens × 32768 vocabulary
    entries folded by a Triton kernel; torch ops on CPU), on the scored positions of policy and
    reference, with the per-token outputs the trainer asks for, then per-sequence sums and
    −log σ(β·((π_c − π_r) − (ref_c − ref_r)))."""
    import torch.nn.functional as F
    from trl.kernels import ChunkedLogProbFunction

    try:  # the trainer's own vocabulary width (a private constant of trl.trainer.utils)
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk_size
    except ImportError:
        chunk_size = 32768
    labels = inputs["labels"]
    mask = labels != -100
    policy_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # DPOTrainer's metrics

    def sequence_logps(hidden, weight, outputs):
        per_token = ChunkedLogProbFunction.apply(
            hidden[mask], weight, None, labels[mask], 1.0, chunk_size, None, 1.0, outputs
        )[0]
        return per_token.new_zeros(mask.shape).masked_scatter(mask, per_token).sum(-1)

    def trl_step():
        policy = sequence_logps(inputs["hidden"], inputs["weight"], policy_outputs)
        with torch.no_grad():
            ref = sequence_logps(inputs["ref_hidden"], inputs["ref_weight"], ("log_probs",))
        b = policy.shape[0] // 2
        margin = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:])
        return -F.logsigmoid(beta * margin).mean()

    return trl_step
