"""Models and tokenizer for the scripts in train/: the embedded default or a Hugging Face model.

With no ``--model``: a tiny Llama built from train/configs/tiny-llama.json (random init, seeded)
and a byte tokenizer that needs no download. Otherwise a Hugging Face id or a local directory.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from cli import UsageError, looks_like_path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-llama.json"


def check_model_arg(model: str | None) -> None:
    """Fail before anything loads when --model names a local path that does not exist."""
    if (
        model is not None
        and not os.path.exists(os.path.expanduser(model))
        and looks_like_path(model)
    ):
        raise UsageError(f"--model {model}: no such directory")


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    if model is None:
        from tokenizer import byte_tokenizer

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
    if model is None:
        policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEFAULT_CONFIG))
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
    try:
        return cls.from_pretrained(os.path.expanduser(model), **kwargs)
    except OSError as e:  # missing files, unknown id, offline: the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load it ({first})") from None
