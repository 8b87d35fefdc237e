"""Thin FSDP2 ε-DPO training: a policy, a frozen reference, the fused loss, adaptive β.

    torchrun --nproc_per_node=N train/run.py [--model ID_OR_PATH] [--dataset ID_OR_PATH] ...
    python train/run.py                      # one process; the embedded default

With no --model/--dataset it trains the embedded default: a tiny Llama built from
train/configs/tiny-llama.json (random init, reference = copy of the initial policy), a byte
tokenizer that needs no download, and the preference data in train/data/default. CPU (gloo)
and CUDA (nccl, bf16 mixed precision) both work. Read top to bottom: config, data, models,
loop, logging, checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from data import collate, load_rows, tokenize_rows  # noqa: E402

from epsdpo_kernels import (  # noqa: E402
    AdaptiveBeta,
    EpsilonDPOOutput,
    LinearEpsilonDPOHead,
    causal_lm_hidden_and_head,
    epsilon_dpo_loss,
)

DEFAULT_CONFIG = HERE / "configs" / "tiny-llama.json"
DEFAULT_DATASET = HERE / "data" / "default"


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str | None = None  # HF id or local path; None: the embedded tiny Llama
    dataset: str = str(DEFAULT_DATASET)
    output_dir: str = "runs/default"
    max_steps: int = 60
    global_batch_size: int = 16  # pairs per optimizer step, all ranks together
    micro_batch_size: int = 8  # pairs per forward, per rank
    lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1
    epsilon: float = 0.01
    loss: str = "linear"  # linear | logits
    max_length: int = 128
    max_prompt_length: int = 64
    eval_every: int = 10
    save_every: int = 30
    resume: bool = False
    seed: int = 0


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        elif f.name == "loss":
            parser.add_argument(flag, choices=["linear", "logits"], default=f.default)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default)
    return Config(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; a plain `python train/run.py` becomes a group of one, so
    that one code path (FSDP2, all-reduces, sharded checkpoints) serves both."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------- models
class EpsilonDPOPolicy(nn.Module):
    """The policy LM and its lm_head-as-loss in one module, so that FSDP2 on this root gathers
    the lm_head (tied to the embedding or not) before the loss and reduce-scatters its gradient
    after. Returns a dict of tensors: FSDP2 hooks backward onto the tensors it finds there."""

    def __init__(self, model: nn.Module, loss: str):
        super().__init__()
        self.model = model
        self.head = LinearEpsilonDPOHead(model.get_output_embeddings())
        self.loss = loss

    def forward(self, input_ids, attention_mask, labels, ref_hidden, ref_weight, ref_bias,
                beta, epsilon):  # fmt: skip
        if self.loss == "linear":
            hidden, _, _ = causal_lm_hidden_and_head(self.model, input_ids, attention_mask)
            out = self.head(hidden, ref_hidden, ref_weight.to(hidden.dtype), labels,
                            ref_bias=ref_bias, beta=beta, epsilon=epsilon)  # fmt: skip
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            ref_logits = nn.functional.linear(ref_hidden, ref_weight.to(ref_hidden.dtype),
                                              ref_bias)  # fmt: skip
            out = epsilon_dpo_loss(logits, ref_logits, labels, beta=beta, epsilon=epsilon)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name != "beta"}


class ReferenceHidden(nn.Module):
    """The frozen reference as a root module returning only its last hidden states (FSDP2
    gathers a root's parameters when its own forward runs, not the decoder's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return causal_lm_hidden_and_head(self.model, input_ids, attention_mask)[0]


def load_models(cfg: Config, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    if cfg.model is None:
        from tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
        config = AutoConfig.from_pretrained(DEFAULT_CONFIG)
        policy = AutoModelForCausalLM.from_config(config)
        reference = copy.deepcopy(policy)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        policy = AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    reference.eval().requires_grad_(False)
    return tokenizer, policy.to(device), reference.to(device)


def shard(module: nn.Module, layers, mesh, mixed_precision, *, root_reshard: bool):
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision)
    # The root's params (embeddings, final norm, lm_head) stay gathered between forward and
    # backward: the loss saves the lm_head weight for its backward.
    fully_shard(module, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=root_reshard)


def decoder_layers(model: nn.Module):
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers to shard")
    return list(layers)


# ----------------------------------------------------------------------------- checkpoints
def latest_checkpoint(output_dir: Path) -> Path | None:
    done = [p.parent for p in (output_dir / "checkpoints").glob("step_*/COMPLETE")]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def training_state(policy, optimizer, scheduler, beta_ctl, step):
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict(),
        "beta": beta_ctl.state_dict(),
        "step": step,
        "rng": torch.get_rng_state(),
    }


def save_checkpoint(output_dir, policy, optimizer, scheduler, beta_ctl, step, rank):
    path = output_dir / "checkpoints" / f"step_{step}"
    dcp.save(training_state(policy, optimizer, scheduler, beta_ctl, step), checkpoint_id=str(path))
    dist.barrier()
    if rank == 0:
        (path / "COMPLETE").touch()  # written last: a checkpoint cut short is never resumed from
    dist.barrier()


def load_checkpoint(path, policy, optimizer, scheduler, beta_ctl) -> int:
    state = training_state(policy, optimizer, scheduler, beta_ctl, 0)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    beta_ctl.load_state_dict(state["beta"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------- metrics
class MetricSums:
    """Sums of ``EpsilonDPOOutput.pair_metrics()`` over a global batch, all-reduced so every key
    is a mean over all pairs of all ranks (what TRL logs per step)."""

    def __init__(self, device):
        self.names: list[str] | None = None
        self.sums = None
        self.device = device
        self.pairs = torch.zeros(2, dtype=torch.float64, device=device)  # [pairs, tokens]

    def add(self, out: EpsilonDPOOutput, weight: torch.Tensor):
        per_pair = out.pair_metrics()
        values = torch.stack([(v.double() * weight).sum() for v in per_pair.values()])
        if self.sums is None:
            self.names, self.sums = list(per_pair), torch.zeros_like(values)
        self.sums += values
        self.pairs[0] += weight.sum()

    def add_tokens(self, n):
        self.pairs[1] += n

    def reduce(self, prefix=""):
        dist.all_reduce(self.sums)
        dist.all_reduce(self.pairs)
        pairs, tokens = self.pairs.tolist()
        means = (self.sums / max(pairs, 1.0)).tolist()
        return {prefix + k: v for k, v in zip(self.names, means)}, tokens


# ----------------------------------------------------------------------------- the run
def lr_lambda(cfg: Config):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def main(argv=None) -> int:
    cfg = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        return train(cfg, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(cfg: Config, rank: int, world: int, device: torch.device) -> int:
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
            f"--micro-batch-size × world size = {cfg.micro_batch_size} × {world}"
        )
    accumulation = cfg.global_batch_size // per_step
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log(f"world size {world}, device {device}, gradient accumulation {accumulation}")

    # Data.
    tokenizer, policy_lm, reference = load_models(cfg, device)
    train_rows, eval_rows = load_rows(cfg.dataset, seed=cfg.seed)
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_pairs = tokenize_rows(train_rows, tokenizer, source=f"{cfg.dataset} (train)", **kw)
    eval_pairs = tokenize_rows(eval_rows, tokenizer, source=f"{cfg.dataset} (eval)", **kw)
    log(f"{len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs")

    # Models: the reference's lm_head stays replicated (the loss needs all of it on every rank);
    # its decoder is sharded like the policy's.
    ref_head = reference.get_output_embeddings()
    ref_weight = ref_head.weight.detach().clone()
    ref_bias = None if getattr(ref_head, "bias", None) is None else ref_head.bias.detach().clone()
    mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
    mixed = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if device.type == "cuda" else None,
        reduce_dtype=torch.float32,
    )
    if device.type == "cuda":
        ref_weight = ref_weight.to(torch.bfloat16)
        ref_bias = None if ref_bias is None else ref_bias.to(torch.bfloat16)
    policy = EpsilonDPOPolicy(policy_lm, cfg.loss)
    shard(policy, decoder_layers(policy_lm), mesh, mixed, root_reshard=False)
    reference = ReferenceHidden(reference)
    shard(reference, decoder_layers(reference.model), mesh, mixed, root_reshard=True)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    beta_ctl = AdaptiveBeta(cfg.beta, cfg.epsilon)

    step = 0
    metrics_path = output_dir / "metrics.jsonl"
    if cfg.resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            log(f"--resume: no complete checkpoint in {output_dir}, starting from scratch")
        else:
            step = load_checkpoint(ckpt, policy, optimizer, scheduler, beta_ctl)
            log(f"resumed from {ckpt} at step {step}, beta {beta_ctl.beta:.6g}")
    if rank == 0:
        _truncate_metrics(metrics_path, step)

    def run_batch(pairs, *, train_mode):
        batch = {k: v.to(device) for k, v in collate(pairs, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            ref_hidden = reference(batch["input_ids"], batch["attention_mask"])
        with torch.set_grad_enabled(train_mode):
            fields = policy(
                batch["input_ids"], batch["attention_mask"], batch["labels"],
                ref_hidden, ref_weight, ref_bias, beta_ctl.beta, cfg.epsilon,
            )  # fmt: skip
        out = EpsilonDPOOutput(**fields, beta=beta_ctl.beta)
        return out, int(batch["attention_mask"].sum())

    def evaluate():
        policy.eval()
        sums = MetricSums(device)
        # Every rank runs the same number of forwards (FSDP collectives); padding pairs get
        # weight 0.
        mine = eval_pairs[rank::world]
        count = math.ceil(len(eval_pairs) / world)
        for start in range(0, count, cfg.micro_batch_size):
            chunk = [mine[i] if i < len(mine) else eval_pairs[0]
                     for i in range(start, min(count, start + cfg.micro_batch_size))]  # fmt: skip
            w = torch.tensor([1.0 if start + i < len(mine) else 0.0 for i in range(len(chunk))],
                             device=device)  # fmt: skip
            out, _ = run_batch(chunk, train_mode=False)
            sums.add(out, w)
        policy.train()
        return sums.reduce("eval/")[0]

    order = _epoch_order(len(train_pairs), cfg.seed, 0)
    progress = _progress(rank, cfg.max_steps, step)
    policy.train()
    last = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        sums = MetricSums(device)
        for micro in range(accumulation):
            # Pairs of the global batch: micro-batch `micro` of rank r is slice (micro·world + r).
            first = step * cfg.global_batch_size + (micro * world + rank) * cfg.micro_batch_size
            ids = [_pair_index(first + i, len(train_pairs), cfg.seed, order)
                   for i in range(cfg.micro_batch_size)]  # fmt: skip
            # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
            policy.set_requires_gradient_sync(micro == accumulation - 1)
            out, tokens = run_batch([train_pairs[i] for i in ids], train_mode=True)
            (out.loss / accumulation).backward()
            beta_ctl.observe(out.steps)
            sums.add(out, torch.ones_like(out.losses))
            sums.add_tokens(tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        beta_used = beta_ctl.beta
        new_beta = beta_ctl.update()  # all ranks, once per optimizer step
        step += 1
        metrics, tokens = sums.reduce()
        elapsed = time.perf_counter() - t0
        row = {"step": step, **metrics, "beta": beta_used, "kl/beta": new_beta, "lr": lr,
               "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                  else grad_norm),
               "tokens_per_s": tokens / elapsed}  # fmt: skip
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            row.update(evaluate())
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            progress.set_postfix(loss=f"{row['loss']:.4f}", beta=f"{new_beta:.5f}")
            progress.update(1)
        last = row
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(output_dir, policy, optimizer, scheduler, beta_ctl, step, rank)
    progress.close()

    export_final(policy, policy_lm, tokenizer, output_dir, rank)
    if rank == 0:
        plot_metrics(metrics_path, output_dir / "metrics.png")
        keys = ("loss", "beta", "rewards/accuracies", "eval/rewards/accuracies")
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last)
        log(f"done: {step} steps; {summary}; outputs in {output_dir}")
    return 0


def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def _pair_index(i, n, seed, first_order):
    epoch, j = divmod(i, n)
    order = first_order if epoch == 0 else _epoch_order(n, seed, epoch)
    return int(order[j])


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only rows up to ``step``: after a resume, rows the interrupted run logged past its
    last checkpoint are recomputed and must not appear twice."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r)["step"] <= step]
    path.write_text("".join(r + "\n" for r in keep))


def _progress(rank, total, initial):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, desc="ε-DPO", dynamic_ncols=True)


def export_final(policy, policy_lm, tokenizer, output_dir, rank):
    """Gather the full policy on rank 0 and write it with save_pretrained (+ tokenizer)."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))  # fmt: skip
    if rank == 0:
        state = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
        final = output_dir / "final"
        policy_lm.save_pretrained(final, state_dict=state)
        tokenizer.save_pretrained(final)
    dist.barrier()


def plot_metrics(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot(steps, [r["loss"] for r in rows], label="train")
    ev = [(r["step"], r) for r in rows if "eval/loss" in r]
    if ev:
        axes[0].plot([s for s, _ in ev], [r["eval/loss"] for _, r in ev], "o-", label="eval")
        axes[2].plot([s for s, _ in ev], [r["eval/rewards/accuracies"] for _, r in ev], "o-",
                     label="eval")  # fmt: skip
    axes[1].plot(steps, [r["kl/beta"] for r in rows])
    axes[2].plot(steps, [r["rewards/accuracies"] for r in rows], label="train")
    axes[3].plot(steps, [r["kl/p_epsilon_steps"] for r in rows], label="s = +1")
    axes[3].plot(steps, [r["kl/n_epsilon_steps"] for r in rows], label="s = −1")
    for ax, title in zip(axes, ("loss", "β", "reward accuracy", "step fractions")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2], axes[3]):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
