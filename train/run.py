"""ε-DPO training with FSDP2: a policy, a frozen reference, the fused loss, adaptive β.

    python train/run.py                      # one process; the embedded default
    torchrun --nproc_per_node=N train/run.py [--model ID_OR_PATH] [--dataset ID_OR_PATH] ...
    torchrun --nproc_per_node=N train/run.py --tp T ...   # N/T data- × T tensor-parallel ranks

With no --model/--dataset it trains the embedded default: a tiny Llama built from
train/configs/tiny-llama.json (random init, reference = copy of the initial policy), a byte
tokenizer that needs no download, and the preference data in train/data/default. CPU (gloo)
and CUDA (nccl, bf16 mixed precision) both work. Read top to bottom: config, checks, data,
models, the loop, logging, checkpoints. The FSDP2 wrappers live in fsdp.py, tensor parallelism
in parallel.py, data formats in data.py, model loading in models.py, metric sums and the plot in
metrics.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from epsdpo_kernels import AdaptiveBeta
from train.cli import (
    ArgumentParser,
    Interrupted,
    UsageError,
    add_dataclass_flags,
    check_beta_epsilon,
    interrupt_requested,
    is_interruption,
    option,
    run_main,
    watch_for_interrupt,
)
from train.data import DATASET_HELP, check_dataset_arg, model_batch, read_pairs
from train.fsdp import (
    EpsilonDPOPolicy,
    ReferenceHidden,
    decoder_layers,
    export_final,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    preference_forward,
    save_checkpoint,
    shard,
)
from train.metrics import MetricSums, machine_note, peak_memory_note, plot_metrics, truncate_metrics
from train.models import MODEL_HELP, check_model_arg, load_policy_and_reference, load_tokenizer
from train.outputs import (
    RUN_RECORD,
    MetricsLog,
    check_output_dir,
    check_overwrite,
    check_run_dir,
    read_record,
    run_record,
    start_run_dir,
)
from train.parallel import (
    check_model_splits,
    check_tensor_parallel,
    clip_grad_norm,
    device_mesh,
    parallelize_causal_lm,
    shard_over_vocabulary,
)


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str | None = option(None, MODEL_HELP)
    dataset: str | None = option(None, DATASET_HELP)
    output_dir: str = option("runs/default", "metrics, plot, checkpoints and the final model")
    max_steps: int = option(60, "optimizer steps")
    global_batch_size: int = option(16, "pairs per optimizer step, all ranks together")
    micro_batch_size: int = option(8, "pairs per forward pass, per rank")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(5, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    beta: float = option(0.1, "initial KL coefficient β (> 0); adapted every step")
    epsilon: float = option(0.01, "ε-DPO perturbation ε in [0, 1); 0 is plain DPO")
    loss: str = option(
        "linear",
        "linear: the fused loss from hidden states (no logits tensor); "
        "logits: the fused loss on the model's logits",
        choices=["linear", "logits"],
    )
    max_length: int = option(128, "tokens per sequence, prompt and completion")
    tp: int = option(
        1,
        "tensor-parallel size: the processes form a (data × tensor) mesh; each group of --tp "
        "ranks splits the model's blocks, embedding and lm_head (vocabulary-parallel loss)",
    )
    padding_free: bool = option(
        False,
        "pack whole sequences into rows of at most --max-length tokens (position_ids keep "
        "attention inside each sequence; same steps as padded rows); off by default: with "
        "sdpa's masked attention it measured slower than padding (README, Packed batches)",
        negatable=True,
    )
    max_prompt_length: int = option(64, "prompt tokens kept (from the right)")
    eval_every: int = option(10, "evaluate every N steps (0: never)")
    save_every: int = option(30, "checkpoint every N steps (0: never)")
    resume: bool = option(
        False,
        "continue from the latest complete checkpoint in --output-dir "
        "(made with the same configuration)",
    )
    overwrite: bool = option(
        False,
        "clear a non-empty --output-dir first (without it, or "
        "--resume, a directory holding another run is refused)",
    )
    seed: int = option(0, "seed of the initial weights, the data order and the eval hold-out")


# The flags that define a run: a resume must use the values its checkpoint was made with.
# (Micro-batch size and world size may change: the same global batch gives the same steps.)
RUN_DEFINING = (
    "model",
    "dataset",
    "max_steps",
    "global_batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "beta",
    "epsilon",
    "loss",
    "max_length",
    "max_prompt_length",
    "seed",
)
# Optimizer steps in a row with a non-finite loss or gradient norm before the run stops.
NONFINITE_PATIENCE = 3


def parse_args(argv=None) -> Config:
    parser = ArgumentParser(prog="train/run.py", description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, Config)
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg: Config, world: int) -> None:
    """Every check that needs no model or data, before anything is loaded."""
    check_beta_epsilon(cfg.beta, cfg.epsilon)
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "max_prompt_length"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.max_grad_norm > 0):
        raise UsageError("--lr and --max-grad-norm must be > 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise UsageError(
            f"--max-prompt-length ({cfg.max_prompt_length}) must be smaller than "
            f"--max-length ({cfg.max_length})"
        )
    check_tensor_parallel(cfg.tp, world)
    data_parallel = world // cfg.tp
    per_step = cfg.micro_batch_size * data_parallel
    if cfg.global_batch_size % per_step:
        raise UsageError(
            f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
            f"--micro-batch-size × data-parallel size = {cfg.micro_batch_size} × "
            f"{data_parallel} (world size {world} / --tp {cfg.tp})"
        )
    check_model_arg(cfg.model)
    check_dataset_arg(cfg.dataset)
    check_output_dir(cfg.output_dir)
    check_overwrite(cfg.output_dir, cfg.overwrite)
    checkpoints = Path(cfg.output_dir).expanduser()
    check_run_dir(
        cfg.output_dir,
        run_record(cfg, RUN_DEFINING),
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        checkpoint_record=lambda: _checkpoint_record(checkpoints),
    )


def _checkpoint_record(output_dir: Path) -> dict | None:
    ckpt = latest_checkpoint(output_dir)
    return None if ckpt is None else read_record(ckpt / RUN_RECORD)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    watch_for_interrupt()
    rank, world, device = init_distributed()
    try:
        return train(cfg, rank, world, device)
    finally:
        if not interrupt_requested():  # a peer may be gone: tearing down could wait for it
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the run
def lr_lambda(cfg: Config):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    # Ranks of one tensor group hold the same pairs: the data is split over `dp` only.
    mesh = device_mesh(device.type, world, cfg.tp)
    dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
    dp_rank, dp_size, dp_group = dp_mesh.get_local_rank(), dp_mesh.size(), dp_mesh.get_group()
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
    output_dir = Path(cfg.output_dir).expanduser()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log(
        f"world size {world} (data-parallel {dp_size} × tensor-parallel {cfg.tp}), device "
        f"{device}, gradient accumulation {accumulation}"
    )
    log(machine_note())

    # Data: read and tokenised before the models load, so a bad file fails fast.
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = read_pairs(
        cfg.dataset,
        tokenizer,
        seed=cfg.seed,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        log=log,
    )
    eval_every = cfg.eval_every if eval_pairs else 0
    if cfg.eval_every and not eval_pairs:
        log("note: no eval pairs (the dataset is too small to hold any out); evaluation is off")

    # Models: the loss takes the reference's lm_head weight whole on every rank (over --tp ranks,
    # each its vocabulary shard); its decoder is sharded like the policy's.
    policy_lm, reference = load_policy_and_reference(cfg.model, cfg.seed)
    check_model_splits(policy_lm.config, cfg.tp)
    policy_lm, reference = policy_lm.to(device), reference.to(device)
    ref_head = reference.get_output_embeddings()
    ref_weight = ref_head.weight.detach().clone()
    ref_bias = None if getattr(ref_head, "bias", None) is None else ref_head.bias.detach().clone()
    mixed = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if device.type == "cuda" else None, reduce_dtype=torch.float32
    )
    if device.type == "cuda":
        ref_weight = ref_weight.to(torch.bfloat16)
        ref_bias = None if ref_bias is None else ref_bias.to(torch.bfloat16)
    # Tensor parallelism first, then FSDP2 over the data-parallel ranks of the result.
    for model in (policy_lm, reference):
        parallelize_causal_lm(model, tp_mesh)
    ref_weight, ref_bias = (shard_over_vocabulary(t, tp_mesh) for t in (ref_weight, ref_bias))
    policy = EpsilonDPOPolicy(policy_lm, cfg.loss)
    shard(policy, decoder_layers(policy_lm), dp_mesh, mixed, root_reshard=False)
    reference = ReferenceHidden(reference)
    shard(reference, decoder_layers(reference.model), dp_mesh, mixed, root_reshard=True)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    beta_ctl = AdaptiveBeta(cfg.beta, cfg.epsilon)

    # Everything has loaded: only now is the output directory made (or cleared).
    record = run_record(cfg, RUN_DEFINING)
    if rank == 0:
        start_run_dir(output_dir, record, overwrite=cfg.overwrite and not cfg.resume)
    dist.barrier()
    step = 0
    metrics_path = output_dir / "metrics.jsonl"
    metrics_log = MetricsLog(metrics_path)
    if cfg.resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            log(f"--resume: no complete checkpoint in {output_dir}, starting from scratch")
        else:
            step = load_checkpoint(ckpt, policy, optimizer, scheduler, beta_ctl)
            log(f"resumed from {ckpt} at step {step}, beta {beta_ctl.beta:.6g}")
    if rank == 0:
        truncate_metrics(metrics_path, step)

    def run_batch(pairs, *, train_mode):
        """(loss output, real tokens, positions the model ran on: padding included)."""
        batch, tokens = model_batch(
            pairs, tokenizer.pad_token_id, padding_free=cfg.padding_free, row_length=cfg.max_length
        )
        with torch.set_grad_enabled(train_mode):
            out = preference_forward(
                policy, reference, batch, ref_weight, ref_bias, beta_ctl.beta, cfg.epsilon, device
            )
        return out, tokens, batch["input_ids"].numel()

    def evaluate():
        policy.eval()
        sums = MetricSums(device, dp_group)
        # Every rank runs the same number of forwards (FSDP collectives); padding pairs get
        # weight 0.
        mine = eval_pairs[dp_rank::dp_size]
        count = math.ceil(len(eval_pairs) / dp_size)
        for start in range(0, count, cfg.micro_batch_size):
            chunk = [
                mine[i] if i < len(mine) else eval_pairs[0]
                for i in range(start, min(count, start + cfg.micro_batch_size))
            ]
            w = torch.tensor(
                [1.0 if start + i < len(mine) else 0.0 for i in range(len(chunk))], device=device
            )
            out, _, _ = run_batch(chunk, train_mode=False)
            sums.add(out, w)
        policy.train()
        return sums.reduce("eval/")[0]

    order = _epoch_order(len(train_pairs), cfg.seed, 0)
    progress = _progress(rank, cfg.max_steps, step)
    policy.train()
    last = {}
    speeds = []  # tokens/s of each step this process ran
    nonfinite_steps = []  # the latest run of steps with a non-finite loss or gradient norm
    logged = step  # the last step whose metrics row is written
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            sums = MetricSums(device, dp_group)
            for micro in range(accumulation):
                # Pairs of the global batch: micro-batch `micro` of data-parallel rank r is
                # slice (micro·dp_size + r).
                first = (
                    step * cfg.global_batch_size
                    + (micro * dp_size + dp_rank) * cfg.micro_batch_size
                )
                ids = [
                    _pair_index(first + i, len(train_pairs), cfg.seed, order)
                    for i in range(cfg.micro_batch_size)
                ]
                # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
                policy.set_requires_gradient_sync(micro == accumulation - 1)
                out, tokens, positions = run_batch([train_pairs[i] for i in ids], train_mode=True)
                (out.loss / accumulation).backward()
                beta_ctl.observe(out.steps)
                sums.add(out, torch.ones_like(out.losses))
                sums.add_tokens(tokens, positions)
            grad_norm = clip_grad_norm(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            beta_used = beta_ctl.beta
            beta_ctl.update(dp_group)  # all ranks, once per optimizer step
            step += 1
            metrics, tokens, positions = sums.reduce()
            elapsed = time.perf_counter() - t0
            # kl/beta is the β this step's pairs were trained with, as in the library's
            # out.metrics() and in EpsilonDPOTrainer.
            row = {
                "step": step,
                **metrics,
                "kl/beta": beta_used,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed,
                # Share of the positions the models ran on that were padding.
                "padding_share": 1.0 - tokens / max(positions, 1.0),
            }
            if device.type == "cuda":  # this rank's peak since the start (not per step)
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            speeds.append(row["tokens_per_s"])
            if eval_every and (step % eval_every == 0 or step == cfg.max_steps):
                row.update(evaluate())
            if rank == 0:
                metrics_log.append(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", beta=f"{beta_ctl.beta:.5f}")
                progress.update(1)
            last, logged = row, step
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(
                    output_dir, policy, optimizer, scheduler, beta_ctl, step, rank, record
                )
            # The reduced loss and norm are the same on every rank, so all ranks stop together.
            finite = math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
            nonfinite_steps = [] if finite else nonfinite_steps + [step]
            if len(nonfinite_steps) >= NONFINITE_PATIENCE:
                progress.close()
                raise UsageError(
                    f"training diverged: the loss or gradient norm was non-finite at steps "
                    f"{nonfinite_steps[0]}-{step} (--beta {cfg.beta:g}, --lr {cfg.lr:g}); "
                    "lower them, and start again with --overwrite"
                )
    except (KeyboardInterrupt, Exception) as e:
        if not is_interruption(e):
            raise
        progress.close()
        raise Interrupted(_interrupted_message(output_dir, logged)) from None
    progress.close()

    export_final(policy, policy_lm, tokenizer, output_dir, rank)
    if rank == 0:
        plot_metrics(metrics_path, output_dir / "metrics.png")
        keys = ("loss", "kl/beta", "rewards/accuracies", "eval/rewards/accuracies")
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last) or "no step to run"
        log(f"done: {step} steps; {summary}; final β {beta_ctl.beta:.6g}; outputs in {output_dir}")
        resources = [peak_memory_note(device)]
        if len(speeds) > 1:  # the first step includes compilation and allocator warm-up
            steady = sorted(speeds[1:])[len(speeds[1:]) // 2]
            resources.insert(
                0, f"throughput: median {steady:.0f} tokens/s over steps after the first"
            )
        log("; ".join(resources))
    return 0


def _interrupted_message(output_dir: Path, step: int) -> str:
    """``step``: the last step whose metrics were logged."""
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return (
            f"interrupted at step {step}; no checkpoint was saved (--save-every); start "
            "again with --overwrite"
        )
    return (
        f"interrupted at step {step}; the last checkpoint is step {ckpt.name.split('_')[1]}; "
        "resume with --resume"
    )


def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def _pair_index(i, n, seed, first_order):
    epoch, j = divmod(i, n)
    order = first_order if epoch == 0 else _epoch_order(n, seed, epoch)
    return int(order[j])


def _progress(rank, total, initial):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, desc="ε-DPO", dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
