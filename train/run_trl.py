"""ε-DPO with TRL: EpsilonDPOTrainer on the embedded default, or on your model and data.

    python train/run_trl.py                                   # tiny Llama, embedded data, CPU ok
    python train/run_trl.py --model ID_OR_PATH --dataset ID_OR_PATH --max-steps 500

The same models and data as train/run.py (``--model``: a Hugging Face id, a local directory or a
model config .json; ``--dataset``: .json/.jsonl(.gz) files, a directory or a Hugging Face id),
read, split, tokenized and truncated exactly as train/run.py does (the same pairs, the same
notes on what was skipped or cut), and handed to ``epsdpo_kernels.trl.EpsilonDPOTrainer`` as
token ids: TRL batches, logs and runs the loop; the loss is the fused linear ε-DPO loss.
Outputs in --output-dir: ``metrics.jsonl`` and ``metrics.png`` (as train/run.py writes them),
``run.json`` (the configuration) and ``final/`` (the trained model and its tokenizer, with
``save_pretrained``). No intermediate checkpoints are kept.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from transformers import TrainerCallback

from train.cli import (
    ArgumentParser,
    Interrupted,
    UsageError,
    add_dataclass_flags,
    check_beta_epsilon,
    is_interruption,
    option,
    run_main,
    watch_for_interrupt,
)
from train.data import check_dataset_arg, read_pairs
from train.flags import TrainFlags
from train.launch import exit_process
from train.metrics import machine_note, plot_metrics
from train.models import check_model_arg, load_policy_and_reference, load_tokenizer
from train.outputs import (
    MetricsLog,
    check_output_dir,
    check_overwrite,
    check_run_dir,
    run_record,
    start_run_dir,
)


@dataclass
class Config(TrainFlags):
    output_dir: str = option("runs/trl", "metrics, plot and the final model")
    seed: int = option(0, "seed of the initial weights and the data order")
    batch_size: int = option(8, "pairs per device per micro-batch")
    gradient_accumulation_steps: int = option(2, "micro-batches per optimizer step")
    padding_free: bool = option(
        False,
        "each micro-batch's sequences packed whole into one row with position_ids "
        "(EpsilonDPOConfig(padding_free=True)); the same steps as padded rows",
        negatable=True,
    )
    eval_every: int = option(20, "evaluate every N steps (0: never)")


# Every flag but where the outputs go defines the run (run.json).
RUN_DEFINING = [f.name for f in fields(Config) if f.name not in ("output_dir", "overwrite")]


def check_config(cfg: Config) -> None:
    """Every check that needs no model or data, before anything is loaded."""
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise UsageError("--max-steps, --batch-size and --gradient-accumulation-steps must be ≥ 1")
    if cfg.eval_every < 0:
        raise UsageError(f"--eval-every must be ≥ 0, got {cfg.eval_every}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not 1 <= cfg.max_prompt_length < cfg.max_length:
        raise UsageError(
            f"--max-prompt-length ({cfg.max_prompt_length}) must be ≥ 1 and "
            f"smaller than --max-length ({cfg.max_length})"
        )
    check_beta_epsilon(cfg.beta, cfg.epsilon)
    check_model_arg(cfg.model)
    check_dataset_arg(cfg.dataset)
    check_output_dir(cfg.output_dir)
    check_overwrite(cfg.output_dir, cfg.overwrite, cfg.dataset)
    check_run_dir(cfg.output_dir, {}, resume=None, overwrite=cfg.overwrite)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="train/run_trl.py", description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, Config)
    cfg = Config(**vars(parser.parse_args(argv)))
    check_config(cfg)
    watch_for_interrupt()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 5.x warns about TrainingArguments.gradient_checkpointing on every config TRL
    # builds, whether or not it is set: noise for this script's users.
    warnings.filterwarnings(
        "ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning
    )

    import torch
    from datasets import Dataset

    from epsdpo_kernels.trl import EpsilonDPOConfig, EpsilonDPOTrainer

    main_process = os.environ.get("RANK", "0") == "0"
    log = print if main_process else (lambda *a: None)
    if main_process:  # its load warning too: once per run, not once per rank
        log(machine_note())
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = read_pairs(
        cfg.dataset,
        tokenizer,
        seed=cfg.seed,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        log=log,
    )

    def to_dataset(pairs):
        return Dataset.from_list(
            [
                dict(prompt_ids=p.prompt_ids, chosen_ids=p.chosen_ids, rejected_ids=p.rejected_ids)
                for p in pairs
            ]
        )

    policy, reference = load_policy_and_reference(cfg.model, cfg.seed)
    evaluate = bool(cfg.eval_every and eval_pairs)
    try:
        args = EpsilonDPOConfig(
            output_dir=cfg.output_dir,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            max_length=cfg.max_length,
            padding_free=cfg.padding_free,
            seed=cfg.seed,
            logging_steps=1,
            eval_strategy="steps" if evaluate else "no",
            eval_steps=cfg.eval_every or None,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
            lr_scheduler_type="cosine",
            warmup_steps=5,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    trainer = EpsilonDPOTrainer(
        policy,
        ref_model=reference,
        args=args,
        processing_class=tokenizer,
        train_dataset=to_dataset(train_pairs),
        eval_dataset=to_dataset(eval_pairs) if evaluate else None,
    )

    # Everything has loaded: only now is the output directory made (or cleared).
    output_dir = Path(cfg.output_dir).expanduser()
    if main_process:
        start_run_dir(output_dir, run_record(cfg, RUN_DEFINING), overwrite=cfg.overwrite)
    metrics = MetricsRows(MetricsLog(output_dir / "metrics.jsonl"), enabled=main_process)
    trainer.add_callback(metrics)
    _quiet_step_logs(trainer)
    try:
        trainer.train()
    except (KeyboardInterrupt, Exception) as e:
        if not is_interruption(e):
            raise
        metrics.flush()
        raise Interrupted(
            f"interrupted at step {trainer.state.global_step}; its metrics are in "
            f"{output_dir / 'metrics.jsonl'}; run_trl.py keeps no checkpoints: start again "
            "with --overwrite"
        ) from None
    metrics.flush()
    trainer.save_model(str(output_dir / "final"))  # the model and its tokenizer
    if main_process:
        plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    log(
        f"done: {trainer.state.global_step} steps; loss {last['loss']:.4g}, kl/beta "
        f"{last['kl/beta']:.4g}, rewards/accuracies {last['rewards/accuracies']:.4g}; final β "
        f"{trainer.adaptive_beta.beta:.6g}; outputs in {output_dir}"
    )
    # Under torchrun nothing else destroys the process group, and gloo's teardown at the
    # interpreter's exit can abort a rank whose peer still holds its connection (SIGABRT,
    # "terminate called without an active exception"): meet, then tear down while all are alive.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _quiet_step_logs(trainer) -> None:
    """The progress bar without the metrics dict transformers prints under it every step (64
    lines for 64 steps): the rows are in metrics.jsonl, and the end prints a summary."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    had_bar = any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(ProgressBarOnly)


class MetricsRows(TrainerCallback):
    """TRL's log entries as train/run.py's ``metrics.jsonl`` rows: one per optimizer step, with
    ``lr`` for ``learning_rate`` and the evaluation of that step as ``eval/*``. A row is written
    once its step has ended and its evaluation (if any) has been logged."""

    # Per-call bookkeeping of Trainer.log, not metrics of the model.
    _SKIPPED = ("epoch", "runtime", "samples_per_second", "steps_per_second")

    def __init__(self, log: MetricsLog, enabled: bool):
        self.log, self.enabled = log, enabled
        self.row = None

    def flush(self):
        if self.row is not None and self.enabled:
            self.log.append(self.row)
        self.row = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.flush()
            self.row = {"step": state.global_step}
            for key, value in logs.items():
                if key not in self._SKIPPED:
                    self.row["lr" if key == "learning_rate" else key] = value
        elif self.row is not None and any(k.startswith("eval_") for k in logs):
            for key, value in logs.items():
                name = key.removeprefix("eval_")
                if key.startswith("eval_") and name not in self._SKIPPED:
                    self.row[f"eval/{name}"] = value


if __name__ == "__main__":
    exit_process(run_main(main))
