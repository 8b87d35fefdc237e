"""ε-DPO training with FSDP2: a policy, a frozen reference, the fused loss, adaptive β.

    python train/run.py                      # one process; the embedded default
    torchrun --nproc_per_node=N train/run.py [--model ID_OR_PATH] [--dataset ID_OR_PATH] ...
    torchrun --nproc_per_node=N train/run.py --tp T ...   # N/T data- × T tensor-parallel ranks

With no --model/--dataset it trains the embedded default: a tiny Llama built from
train/configs/tiny-llama.json (random init, reference = copy of the initial policy), a byte
tokenizer that needs no download, and the preference data in train/pairs/default. CPU (gloo)
and CUDA (nccl, bf16 mixed precision) both work. Read top to bottom: config, checks, the state
(models, optimizer, β), one training step, evaluation, and the loop that runs them with
logging and checkpoints. The FSDP2 wrappers live in fsdp.py, tensor parallelism
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
from train.data import check_dataset_arg, model_batch, read_pairs
from train.flags import TrainFlags
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
from train.launch import exit_process, launch_workers, launched_worker
from train.metrics import MetricSums, machine_note, peak_memory_note, plot_metrics, truncate_metrics
from train.models import check_model_arg, load_policy_and_reference, load_tokenizer
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
class Config(TrainFlags):
    output_dir: str = option("runs/default", "metrics, plot, checkpoints and the final model")
    global_batch_size: int = option(16, "pairs per optimizer step, all ranks together")
    micro_batch_size: int = option(8, "pairs per forward pass, per rank")
    warmup_steps: int = option(5, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    loss: str = option(
        "linear",
        "linear: the fused loss from hidden states (no logits tensor); "
        "logits: the fused loss on the model's logits",
        choices=["linear", "logits"],
    )
    tp: int = option(
        1,
        "tensor-parallel size: the processes form a (data × tensor) mesh; each group of --tp "
        "ranks splits the model's blocks, embedding and lm_head (vocabulary-parallel loss)",
    )
    padding_free: bool = option(
        False,
        "pack whole sequences into rows of at most --max-length tokens (position_ids keep "
        "attention inside each sequence; same steps as padded rows); off by default: with "
        "sdpa's masked attention it measured slower than padding (docs/API.md, Packed batches)",
        negatable=True,
    )
    save_every: int = option(30, "checkpoint every N steps (0: never)")
    nproc_per_node: int = option(
        1,
        "ranks to start on this machine, as torchrun --standalone --nproc_per_node=N does, "
        "stopped like one process: Ctrl-C prints one line on every rank's behalf",
    )
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
    for name in ("warmup_steps", "eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(cfg, name)}")
    # nan fails every comparison and inf passes "> 0": both once reached AdamW (a traceback, or
    # NaN weights from step 2 on), so each float is checked for a finite value first.
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number ≥ 0, got {cfg.weight_decay}")
    for name in ("lr", "max_grad_norm"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
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
    check_overwrite(cfg.output_dir, cfg.overwrite, cfg.dataset)
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
    if cfg.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be ≥ 1, got {cfg.nproc_per_node}")
    if cfg.nproc_per_node > 1 and not launched_worker():
        # Checked here once, not by every rank after the launch.
        check_config(cfg, cfg.nproc_per_node)
        args = sys.argv[1:] if argv is None else list(argv)
        return launch_workers(cfg.nproc_per_node, os.path.abspath(__file__), args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.nproc_per_node > 1 and "LOCAL_WORLD_SIZE" in os.environ:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        if local != cfg.nproc_per_node:
            raise UsageError(
                f"--nproc-per-node {cfg.nproc_per_node} under a launcher that started {local} "
                "ranks per node: use one of them"
            )
    check_config(cfg, world)
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


@dataclass
class TrainState:
    """Everything the steps read and change: the models, the optimizer and its schedule, the β
    controller, the meshes, and the optimizer steps taken."""

    cfg: Config
    device: torch.device
    dp_mesh: object  # the data-parallel dimension: pairs are split over it
    tokenizer: object
    policy_lm: torch.nn.Module  # the policy's Hugging Face model (what is exported)
    policy: EpsilonDPOPolicy  # policy_lm with its loss, FSDP2-sharded over dp_mesh
    reference: ReferenceHidden
    ref_weight: torch.Tensor  # the reference's lm_head (each rank's shard under --tp)
    ref_bias: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    beta: AdaptiveBeta
    step: int = 0

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp_mesh.size()

    @property
    def accumulation(self) -> int:
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * self.dp_size)


def build_state(cfg: Config, world: int, device: torch.device, tokenizer) -> TrainState:
    """The models (tensor-parallel over ``tp``, then FSDP2 over ``dp``), optimizer and β."""
    # Ranks of one tensor group hold the same pairs: the data is split over `dp` only.
    mesh = device_mesh(device.type, world, cfg.tp)
    dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
    # The loss takes the reference's lm_head weight whole on every rank (over --tp ranks, each
    # its vocabulary shard); its decoder is sharded like the policy's.
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
    return TrainState(
        cfg=cfg,
        device=device,
        dp_mesh=dp_mesh,
        tokenizer=tokenizer,
        policy_lm=policy_lm,
        policy=policy,
        reference=reference,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
        beta=AdaptiveBeta(cfg.beta, cfg.epsilon),
    )


def forward(state: TrainState, pairs, *, train_mode: bool):
    """(loss output, real tokens, positions the model ran on: padding included)."""
    cfg = state.cfg
    batch, tokens = model_batch(
        pairs,
        state.tokenizer.pad_token_id,
        padding_free=cfg.padding_free,
        row_length=cfg.max_length,
    )
    with torch.set_grad_enabled(train_mode):
        out = preference_forward(
            state.policy,
            state.reference,
            batch,
            state.ref_weight,
            state.ref_bias,
            state.beta.beta,
            cfg.epsilon,
            state.device,
        )
    return out, tokens, batch["input_ids"].numel()


def train_step(state: TrainState, train_pairs, order) -> dict:
    """One optimizer step over the global batch of ``state.step``: its metrics row."""
    cfg, dp_rank, dp_size = state.cfg, state.dp_rank, state.dp_size
    t0 = time.perf_counter()
    sums = MetricSums(state.device, state.dp_mesh.get_group())
    for micro in range(state.accumulation):
        # Pairs of the global batch: micro-batch `micro` of data-parallel rank r is slice
        # (micro·dp_size + r).
        first = (
            state.step * cfg.global_batch_size + (micro * dp_size + dp_rank) * cfg.micro_batch_size
        )
        ids = [
            _pair_index(first + i, len(train_pairs), cfg.seed, order)
            for i in range(cfg.micro_batch_size)
        ]
        # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
        state.policy.set_requires_gradient_sync(micro == state.accumulation - 1)
        out, tokens, positions = forward(state, [train_pairs[i] for i in ids], train_mode=True)
        (out.loss / state.accumulation).backward()
        state.beta.observe(out.steps, out.finite_pairs)
        sums.add(out, torch.ones_like(out.losses))
        sums.add_tokens(tokens, positions)
    grad_norm = clip_grad_norm(state.policy.parameters(), cfg.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.scheduler.get_last_lr()[0]
    state.scheduler.step()
    beta_used = state.beta.beta
    state.beta.update(state.dp_mesh.get_group())  # all ranks, once per optimizer step
    state.step += 1
    metrics, tokens, positions = sums.reduce()
    elapsed = time.perf_counter() - t0
    # kl/beta is the β this step's pairs were trained with, as in the library's out.metrics()
    # and in EpsilonDPOTrainer.
    row = {
        "step": state.step,
        **metrics,
        "kl/beta": beta_used,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        # Share of the positions the models ran on that were padding.
        "padding_share": 1.0 - tokens / max(positions, 1.0),
    }
    if state.device.type == "cuda":  # this rank's peak since the start (not per step)
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(state.device) / 2**20
    return row


def evaluate(state: TrainState, eval_pairs) -> dict:
    """The ``eval/`` metrics over every held-out pair, all data-parallel ranks together."""
    cfg, dp_rank, dp_size = state.cfg, state.dp_rank, state.dp_size
    state.policy.eval()
    sums = MetricSums(state.device, state.dp_mesh.get_group())
    # Every rank runs the same number of forwards (FSDP collectives); padding pairs get weight 0.
    mine = eval_pairs[dp_rank::dp_size]
    count = math.ceil(len(eval_pairs) / dp_size)
    for start in range(0, count, cfg.micro_batch_size):
        chunk = [
            mine[i] if i < len(mine) else eval_pairs[0]
            for i in range(start, min(count, start + cfg.micro_batch_size))
        ]
        # Weights built on the device: torch.tensor(list, device=cuda) would block on a copy.
        w = (torch.arange(len(chunk), device=state.device) < len(mine) - start).float()
        out, _, _ = forward(state, chunk, train_mode=False)
        sums.add(out, w)
    state.policy.train()
    return sums.reduce("eval/")[0]


def train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    output_dir = Path(cfg.output_dir).expanduser()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    data_parallel = world // cfg.tp
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * data_parallel)
    log(
        f"world size {world} (data-parallel {data_parallel} × tensor-parallel {cfg.tp}), device "
        f"{device}, gradient accumulation {accumulation}"
    )
    if rank == 0:  # its load warning too: once per run, not once per rank
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
    state = build_state(cfg, world, device, tokenizer)

    # Everything has loaded: only now is the output directory made (or cleared).
    record = run_record(cfg, RUN_DEFINING)
    if rank == 0:
        start_run_dir(output_dir, record, overwrite=cfg.overwrite and not cfg.resume)
    dist.barrier()
    metrics_path = output_dir / "metrics.jsonl"
    metrics_log = MetricsLog(metrics_path)
    if cfg.resume:
        # Every file of the checkpoint checked against its marker, newest first; a truncated or
        # corrupted one is passed over with a note, for the one before it.
        ckpt = latest_checkpoint(output_dir, checksums=True, note=log)
        if ckpt is None:
            log(f"--resume: no complete checkpoint in {output_dir}, starting from scratch")
        else:
            load_checkpoint(ckpt, state)
            log(f"resumed from {ckpt} at step {state.step}, beta {state.beta.beta:.6g}")
    if rank == 0:
        truncate_metrics(metrics_path, state.step)

    order = _epoch_order(len(train_pairs), cfg.seed, 0)
    progress = _progress(rank, cfg.max_steps, state.step)
    state.policy.train()
    last = {}
    speeds = []  # tokens/s of each step this process ran
    nonfinite_steps = []  # the latest run of steps with a non-finite loss or gradient norm
    logged = state.step  # the last step whose metrics row is written
    try:
        while state.step < cfg.max_steps:
            row = train_step(state, train_pairs, order)
            step = state.step
            speeds.append(row["tokens_per_s"])
            if eval_every and (step % eval_every == 0 or step == cfg.max_steps):
                row.update(evaluate(state, eval_pairs))
            if rank == 0:
                metrics_log.append(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", beta=f"{state.beta.beta:.5f}")
                progress.update(1)
            last, logged = row, step
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(state, output_dir, rank, record)
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

    export_final(state, output_dir, rank)
    if rank == 0:
        plot_metrics(metrics_path, output_dir / "metrics.png")
        keys = ("loss", "kl/beta", "rewards/accuracies", "eval/rewards/accuracies")
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last) or "no step to run"
        log(
            f"done: {state.step} steps; {summary}; final β {state.beta.beta:.6g}; "
            f"outputs in {output_dir}"
        )
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
    exit_process(run_main(main))
