"""The model's forward, patched for the fused loss: the backbone's last hidden states handed to a
function of (hidden states, lm_head) inside the forward, where every engine expects the
parameters to be used; and what that forward computes besides (an MoE's load-balancing loss)."""

from __future__ import annotations

import contextlib
import functools

import torch


def hidden_state_forward(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` for the fused loss, which never forms the logits:
    ``model(..., epsdpo_head=f)`` runs the backbone and returns ``f(hidden, lm_head)`` (a tuple
    of tensors) with the MoE load-balancing loss (or None) after it.

    ``f`` runs inside the model's forward, where every engine expects the model's parameters to
    be used: FSDP's root unit is unsharded there, and FSDP and ZeRO-3 attach their
    before-backward gathering to the forward's outputs. The policy's ``f`` runs the loss as the
    lm_head's forward (``engines.run_as_forward``), so the head's own hooks gather it too; the
    reference's keeps its hidden states and head aside and returns nothing, so no engine or
    mixed-precision wrapper touches them on the way out.

    Going through ``model.forward`` (rather than calling the backbone directly) keeps DDP,
    FSDP, DeepSpeed and PEFT wrappers in the path. The backbone and the head are looked up on
    every call because FSDP and PEFT replace them after patching. Any other call is the forward
    as it was (TRL's fused head, generation). With ``output_router_logits=True`` (an MoE
    policy) the load-balancing loss is computed as the model's own forward computes it.
    """
    wrapped = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, epsdpo_head=None, **kwargs):
        if epsdpo_head is None:
            return wrapped(*args, **kwargs)
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self)(
                outputs.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
        return (*epsdpo_head(outputs.last_hidden_state, self.get_output_embeddings()), aux_loss)

    model.forward = forward.__get__(model)


def head_bias(head: torch.nn.Module) -> torch.Tensor | None:
    return getattr(head, "bias", None)


def router_aux_loss(model):
    """The load-balancing loss function an MoE causal LM's forward adds to its loss
    (``load_balancing_loss_func`` of its modeling module, called with the model's
    ``num_experts`` and ``num_experts_per_tok``, as Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and the
    other transformers MoE families do), or a ``ValueError`` naming what is missing."""
    import sys

    module = sys.modules.get(type(model).__module__)
    function = getattr(module, "load_balancing_loss_func", None)
    missing = [name for name in ("num_experts", "num_experts_per_tok") if not hasattr(model, name)]
    if function is None or missing:
        what = "load_balancing_loss_func in its module" if function is None else missing
        raise ValueError(
            f"router_aux_loss_coef: {type(model).__name__} has no {what}, so the trainer cannot "
            "compute its load-balancing loss as the model's forward does; set "
            "router_aux_loss_coef=0.0"
        )
    return function


@contextlib.contextmanager
def no_checkpointing(model, checkpointing_kwargs):
    """Activation checkpointing off for the block, under transformers' current names
    (``activation_checkpointing_*`` from 5.x, ``gradient_checkpointing_*`` before)."""
    new_names = hasattr(model, "activation_checkpointing_enable")
    prefix = "activation_checkpointing" if new_names else "gradient_checkpointing"
    enabled = getattr(model, f"is_{prefix}", False)
    if enabled:
        getattr(model, f"{prefix}_disable")()
    try:
        yield
    finally:
        if enabled:
            getattr(model, f"{prefix}_enable")(checkpointing_kwargs)
