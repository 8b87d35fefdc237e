"""Tiny random causal LMs: the decoder sizes every test model shares, and the families whose
logits are soft-capped or scaled."""

from __future__ import annotations

import pytest
import torch

# The decoder every tiny test Llama (and its Gemma 2 and Mixtral variants) shares.
TINY_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
)
# The special tokens of train/tokenizer.py's byte tokenizer.
BYTE_TOKENS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)


def tiny_transformed_lm(family: str, **transform):
    """A tiny random causal LM of ``family`` ("gemma2", "cohere", "granite") whose config
    carries ``transform`` (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``);
    vocabulary 301, hidden size 32, one layer, in eval mode."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
        bos_token_id=2,
        pad_token_id=0,
    )
    config_cls, model_cls = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
    }[family]
    extra = dict(head_dim=16) if family == "gemma2" else {}
    torch.manual_seed(0)
    return model_cls(config_cls(**common, **extra, **transform)).eval()
