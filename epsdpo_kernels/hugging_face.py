"""Hugging Face helper: last hidden states and lm_head of a causal LM, without its logits."""

from __future__ import annotations

import torch
from torch import nn


def causal_lm_hidden_and_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    return_logit_transform: bool = False,
    **kwargs,
):
    """``(hidden_states (N, T, H), lm_head weight (V, H), lm_head bias or None)``, and with
    ``return_logit_transform=True`` a fourth item: the keyword arguments that give
    ``linear_epsilon_dpo_loss`` the model's own logits (``logit_transform(model.config)``).

    Runs only the decoder (``model.get_decoder()``), so the ``(N, T, V)`` logits are never
    formed. ``hidden_states[:, t]`` scores token ``t + 1``: shift labels as for the logits.
    Without a key/value cache (``use_cache=False`` unless given): none is needed to score, and
    with none, transformers reads packed sequences from ``position_ids`` that restart at 0 (when
    ``attention_mask`` is None) and keeps attention inside each.

    A model whose logits are soft-capped or scaled (Gemma 2, Cohere, Granite, ...) is refused
    unless ``return_logit_transform=True``: its logits are not ``hidden @ W.T + b``, and the
    loss must be given the transform to match them.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transform = logit_transform(text_config)
    if not return_logit_transform and transform != PLAIN:
        raise ValueError(
            f"{type(model).__name__}'s logits are {_describe(transform)}, not hidden @ W.T + "
            "b: call causal_lm_hidden_and_head(..., return_logit_transform=True) and pass the "
            "fourth item it returns to linear_epsilon_dpo_loss (**transform)"
        )
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        raise TypeError(
            "model must be a Hugging Face causal LM with get_decoder() and "
            f"get_output_embeddings(), got {type(model).__name__}"
        )
    kwargs.setdefault("use_cache", False)
    outputs = get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    found = (hidden, head.weight, getattr(head, "bias", None))
    return (*found, transform) if return_logit_transform else found


# The keyword arguments of a model whose logits are hidden @ W.T + b.
PLAIN = {"logit_softcap": None, "logit_scale": 1.0}

# Config fields that transform the logits which no supported rule maps to the loss's
# (logit_softcap, logit_scale): refused by name.
_UNSUPPORTED_TRANSFORMS = ("output_multiplier_scale",)


def logit_transform(config) -> dict:
    """``{"logit_softcap": …, "logit_scale": …}`` of a Hugging Face text config, read as
    transformers applies them after the lm_head matmul (and as TRL 1.16's fused head reads
    them): ``final_logit_softcapping`` (Gemma 2, Gemma 3n, VaultGemma, …) caps; the scale is
    ``logit_scale`` (Cohere), ``output_multiplier`` or ``lm_head_multiplier`` (Falcon-H1), or
    ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it). A ValueError
    names a field that transforms the logits in a way the loss cannot follow."""
    for attr in _UNSUPPORTED_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"model.config.{attr}={value!r}: this model transforms its logits in a way "
                "linear_epsilon_dpo_loss does not reproduce; use epsilon_dpo_loss on its logits"
            )
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = None
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, attr, None) is not None:
            scale = getattr(config, attr)
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        model_type = getattr(config, "model_type", "")
        scale = scaling if model_type == "hyperclovax" else 1.0 / scaling
    return {
        "logit_softcap": None if not softcap else float(softcap),
        "logit_scale": 1.0 if scale is None else float(scale),
    }


def _describe(transform: dict) -> str:
    parts = []
    if transform["logit_scale"] != 1.0:
        parts.append(f"scaled by {transform['logit_scale']:g}")
    if transform["logit_softcap"] is not None:
        parts.append(f"soft-capped at {transform['logit_softcap']:g}")
    return " and ".join(parts)


def check_same_transform(policy_config, ref_config) -> dict:
    """The one transform of a policy and its reference (the loss takes one for both: models
    of one family); a ValueError when their configs differ."""
    policy, ref = logit_transform(policy_config), logit_transform(ref_config)
    if policy != ref:
        raise ValueError(
            f"the policy's logits are {_describe(policy) or 'plain'} and the reference's "
            f"{_describe(ref) or 'plain'}: linear_epsilon_dpo_loss applies one transform to "
            "both; use a reference of the policy's family"
        )
    return policy
