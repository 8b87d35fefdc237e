"""A tiny EpsilonDPOTrainer on the embedded data: no download, CPU, fp32."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from epsdpo_kernels.trl import EpsilonDPOConfig, EpsilonDPOTrainer
from tests.helpers.models import BYTE_TOKENS, TINY_DECODER
from train.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT / "train" / "pairs" / "default" / "train.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pairs(n: int, offset: int = 0) -> Dataset:
    with open(DEFAULT_DATA) as f:
        rows = [json.loads(line) for line in f][offset : offset + n]
    return Dataset.from_list(rows)


def token_pairs(seed: int = 0, n: int = 4) -> Dataset:
    """Token-id pairs of ragged lengths; the first has an empty prompt, so its first completion
    token opens a sequence and must not be scored (it has no preceding token of its own)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high, (), generator=gen))
        return torch.randint(0, 256, (length,), generator=gen).tolist()

    rows = [dict(prompt_ids=[], chosen_ids=ids(3, 9), rejected_ids=ids(3, 9))]
    rows += [
        dict(prompt_ids=ids(2, 14), chosen_ids=ids(1, 12), rejected_ids=ids(1, 12))
        for _ in range(n - 1)
    ]
    return Dataset.from_list(rows)


def tiny_models(seed: int = 0, vocab: int = 260, tied: bool = True, softcap: float | None = None):
    """A tiny Llama policy and an equal reference; with ``softcap``, a tiny Gemma 2 whose
    logits are capped at it (``final_logit_softcapping``)."""
    sizes = dict(
        vocab_size=vocab,
        num_hidden_layers=1,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        **TINY_DECODER,
        **BYTE_TOKENS,
    )
    if softcap is None:
        config, model_cls = LlamaConfig(**sizes), LlamaForCausalLM
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=softcap)
        model_cls = Gemma2ForCausalLM
    torch.manual_seed(seed)
    policy = model_cls(config)
    reference = model_cls(config)
    reference.load_state_dict(policy.state_dict())
    return policy, reference


def config(tmp_path, **overrides) -> EpsilonDPOConfig:
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=10,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        beta=0.1,
        epsilon=0.05,
        dataloader_num_workers=0,
        bf16=False,  # TRL's default is bf16 autocast; fp32 keeps the comparisons exact
    )
    options.update(overrides)
    return EpsilonDPOConfig(**options)


def make_trainer(tmp_path, train=None, eval_dataset=None, seed=0, softcap=None, **overrides):
    policy, reference = tiny_models(seed, softcap=softcap)
    return EpsilonDPOTrainer(
        policy,
        ref_model=reference,
        args=config(tmp_path, **overrides),
        train_dataset=train if train is not None else pairs(8),
        eval_dataset=eval_dataset,
        processing_class=byte_tokenizer(),
    )


def dpo_trainer(tmp_path, peft_config=None, **overrides):
    """TRL's own DPOTrainer with the DPOConfig fields of ``config(tmp_path, epsilon=0, ...)``, on
    the tiny policy ``make_trainer`` builds (and its reference, unless a PEFT adapter is
    trained): the trainer EpsilonDPOTrainer at ε = 0 is compared with."""
    from trl import DPOConfig, DPOTrainer

    args = config(tmp_path, **{"epsilon": 0.0, **overrides})
    fields = {k for k in args.to_dict() if k in DPOConfig.__dataclass_fields__}
    policy, reference = tiny_models()
    return DPOTrainer(
        policy,
        ref_model=None if peft_config else reference,
        train_dataset=pairs(8),
        args=DPOConfig(**{k: getattr(args, k) for k in fields}),
        processing_class=byte_tokenizer(),
        peft_config=peft_config,
    )


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]
