"""Hugging Face helper: last hidden states and lm_head of a causal LM, without its logits."""

from __future__ import annotations

import torch
from torch import nn


def causal_lm_hidden_and_head(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden_states (N, T, H), lm_head weight (V, H), lm_head bias or None)``.

    Runs only the decoder (``model.get_decoder()``), so the ``(N, T, V)`` logits are never
    formed. ``hidden_states[:, t]`` scores token ``t + 1``: shift labels as for the logits.
    Without a key/value cache (``use_cache=False`` unless given): none is needed to score, and
    with none, transformers reads packed sequences from ``position_ids`` that restart at 0 (when
    ``attention_mask`` is None) and keeps attention inside each.
    Models whose logits are not ``hidden @ W.T + b`` (soft-capped or scaled logits) are refused,
    since the linear loss would compute something else.
    """
    check_linear_head(getattr(model, "config", None))
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
    return hidden, head.weight, getattr(head, "bias", None)


# Config fields by which a Hugging Face model scales or caps its logits after the lm_head matmul.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def check_linear_head(config) -> None:
    """Refuse a model config whose logits are not ``hidden @ W.T + b`` (soft-capped or scaled):
    the linear loss would compute something else than the model's own distribution."""
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"model.config.{attr}={value!r}: its logits are not hidden @ W.T + b, so "
                "linear_epsilon_dpo_loss would not match it; use epsilon_dpo_loss on its logits"
            )
