"""Models and tokenizer for the scripts in train/: the embedded default or a Hugging Face model.

With no ``--model``: a tiny Llama built from train/configs/tiny-llama.json (random init, seeded)
and a byte tokenizer that needs no download. A model config ``.json`` (e.g.
train/configs/llama-1b.json): the same, random init from that config. Otherwise a Hugging Face id
or a local directory.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from train.cli import UsageError, looks_like_path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-llama.json"
MODEL_HELP = (
    "Hugging Face id or local directory of a causal LM, or a model config .json (random init, "
    "byte tokenizer); default: the embedded tiny Llama (random init)"
)
BYTE_VOCAB = 260  # the byte tokenizer: 256 bytes + <bos>, <eos>, <pad>, <unk>


def check_model_arg(model: str | None) -> None:
    """Fail before anything loads when --model names a local path that does not exist, or a
    config file the byte tokenizer cannot serve."""
    if model is None:
        return
    if not os.path.exists(os.path.expanduser(model)) and (
        looks_like_path(model) or model.endswith(".json")
    ):
        raise UsageError(f"--model {model}: no such file or directory")
    if is_config_file(model):
        import json

        try:
            with open(os.path.expanduser(model)) as f:
                vocab = json.load(f).get("vocab_size", 0)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--model {model}: cannot read it as a JSON model config ({e})"
            ) from None
        if not isinstance(vocab, int) or vocab < BYTE_VOCAB:
            raise UsageError(
                f"--model {model}: a config file is trained with the byte tokenizer, which "
                f"needs vocab_size ≥ {BYTE_VOCAB}, got {vocab}"
            )


def is_config_file(model: str | None) -> bool:
    """--model given as a model config .json: random init from it, byte tokenizer."""
    return (
        model is not None and model.endswith(".json") and os.path.isfile(os.path.expanduser(model))
    )


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    if model is None or is_config_file(model):
        from train.tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
    else:
        tokenizer = _from_pretrained(AutoTokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy_and_reference(model: str | None, seed: int, *, reference: bool = True):
    """(policy, reference or None), fp32, on the CPU; the reference frozen and in eval mode.

    Every rank calls this with the same seed, so a randomly initialised default is identical
    everywhere; its reference is a copy of the initial policy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if model is None or is_config_file(model):
        config = DEFAULT_CONFIG if model is None else os.path.expanduser(model)
        policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
        ref = copy.deepcopy(policy) if reference else None
    else:
        # fp32 master weights whatever the checkpoint's dtype (.float(): the dtype keyword was
        # renamed across the transformers versions we support).
        policy = _from_pretrained(AutoModelForCausalLM, model).float()
        ref = _from_pretrained(AutoModelForCausalLM, model).float() if reference else None
    if ref is not None:
        ref.eval().requires_grad_(False)
    return policy, ref


def _from_pretrained(cls, model: str, **kwargs):
    # huggingface_hub logs every retry of a failed request ("'[Errno -2] ...' thrown while
    # requesting HEAD ...", five times) before the error: the one line below says it all.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return cls.from_pretrained(os.path.expanduser(model), **kwargs)
    except OSError as e:  # missing files, unknown id, offline: the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load it ({first})") from None
    finally:
        hub_logger.setLevel(level)
