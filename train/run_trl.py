"""ε-DPO with TRL: EpsilonDPOTrainer on the embedded default, or on your model and data.

    python train/run_trl.py                                   # tiny Llama, embedded data, CPU ok
    python train/run_trl.py --model ID_OR_PATH --dataset ID_OR_PATH --max-steps 500

The same models and data as train/run.py (``--model``: a Hugging Face id, a local directory or a
model config .json; ``--dataset``: .json/.jsonl(.gz) files, a directory or a Hugging Face id),
handed to ``epsdpo_kernels.trl.EpsilonDPOTrainer``: TRL tokenizes, batches, logs and checkpoints;
the loss is the fused linear ε-DPO loss. Rows are passed to TRL as they are (TRL splits implicit
prompts itself). Outputs in --output-dir: TRL's checkpoints (with β) and trainer_state.json.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cli import (  # noqa: E402
    ArgumentParser,
    UsageError,
    add_dataclass_flags,
    check_beta_epsilon,
    option,
    run_main,
)
from data import DATASET_HELP, DEFAULT_DATASET, check_dataset_arg, load_rows  # noqa: E402
from models import (  # noqa: E402
    MODEL_HELP,
    check_model_arg,
    load_policy_and_reference,
    load_tokenizer,
)


@dataclass
class Config:
    model: str | None = option(None, MODEL_HELP)
    dataset: str | None = option(None, DATASET_HELP)
    output_dir: str = option("runs/trl", "TRL's checkpoints and logs")
    max_steps: int = option(60, "optimizer steps")
    batch_size: int = option(8, "pairs per device per micro-batch")
    gradient_accumulation_steps: int = option(2, "micro-batches per optimizer step")
    lr: float = option(2e-3, "peak learning rate")
    beta: float = option(0.1, "initial KL coefficient β (> 0); adapted every step")
    epsilon: float = option(0.01, "ε-DPO perturbation ε in [0, 1); 0 is plain DPO")
    max_length: int = option(128, "tokens per sequence, prompt and completion")
    eval_every: int = option(20, "evaluate every N steps (0: never)")
    seed: int = option(0, "seed of the initial weights and the data order")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="train/run_trl.py", description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, Config)
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise UsageError("--max-steps, --batch-size and --gradient-accumulation-steps must be ≥ 1")
    if cfg.max_length < 2 or cfg.eval_every < 0:
        raise UsageError("--max-length must be ≥ 2 and --eval-every ≥ 0")
    check_beta_epsilon(cfg.beta, cfg.epsilon)
    check_model_arg(cfg.model)
    check_dataset_arg(cfg.dataset)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 5.x warns about TrainingArguments.gradient_checkpointing on every config TRL
    # builds, whether or not it is set: noise for this script's users.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated",
                            category=FutureWarning)  # fmt: skip

    import torch
    from datasets import Dataset

    from epsdpo_kernels.trl import EpsilonDPOConfig, EpsilonDPOTrainer

    train_rows, eval_rows = load_rows(cfg.dataset or str(DEFAULT_DATASET), seed=cfg.seed)
    to_dataset = lambda rows: Dataset.from_list([r.data for r in rows])  # noqa: E731
    tokenizer = load_tokenizer(cfg.model)
    policy, reference = load_policy_and_reference(cfg.model, cfg.seed)
    try:
        args = EpsilonDPOConfig(
            output_dir=cfg.output_dir, max_steps=cfg.max_steps, learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, beta=cfg.beta,
            epsilon=cfg.epsilon, max_length=cfg.max_length, seed=cfg.seed, logging_steps=1,
            eval_strategy="steps" if cfg.eval_every and eval_rows else "no",
            eval_steps=cfg.eval_every or None, save_strategy="no", report_to="none",
            use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
            lr_scheduler_type="cosine", warmup_steps=5,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    trainer = EpsilonDPOTrainer(
        policy, ref_model=reference, args=args, processing_class=tokenizer,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows) if eval_rows and cfg.eval_every else None,
    )  # fmt: skip
    trainer.train()
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    beta, accuracy = trainer.adaptive_beta.beta, last["rewards/accuracies"]
    print(f"done: {cfg.max_steps} steps; loss {last['loss']:.4g}, β {beta:.5g}, "
          f"rewards/accuracies {accuracy:.3g}; outputs in {cfg.output_dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
