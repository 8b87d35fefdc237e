"""FSDP2 plumbing for train/run.py: the process group, the sharded policy and reference
modules, and sharded checkpoints.

The loss needs the policy's lm_head weight gathered while it runs and its gradient
reduce-scattered after, so the policy LM and its lm_head-as-loss live in one root module
(``EpsilonDPOPolicy``) that is itself ``fully_shard``-ed; the frozen reference is a root module
that returns only its last hidden states (``ReferenceHidden``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
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
from torch.distributed.fsdp import fully_shard

from epsdpo_kernels import LinearEpsilonDPOHead, causal_lm_hidden_and_head, epsilon_dpo_loss
from epsdpo_kernels.hugging_face import logit_transform
from epsdpo_kernels.reference import model_logits
from train.cli import UsageError
from train.outputs import RUN_RECORD, _nearest_existing, replace_whole, write_record
from train.parallel import sharded_logits


def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; a plain `python train/run.py` becomes a group of one, so
    that one code path (FSDP2, all-reduces, sharded checkpoints) serves both."""
    # A group of one meets in an in-process store: no TCP port to pick (and lose to another
    # process between picking and binding it).
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **alone)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **alone)
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------- modules
class EpsilonDPOPolicy(nn.Module):
    """The policy LM and its lm_head-as-loss in one module, so that FSDP2 on this root gathers
    the lm_head (tied to the embedding or not) before the loss and reduce-scatters its gradient
    after. Returns the loss's ``EpsilonDPOOutput`` (a pytree node: FSDP2 finds its tensors)."""

    def __init__(self, model: nn.Module, loss: str):
        super().__init__()
        self.model = model
        self.head = LinearEpsilonDPOHead(model.get_output_embeddings())
        self.loss = loss

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        ref_hidden,
        ref_weight,
        ref_bias,
        beta,
        epsilon,
        position_ids=None,
        sequence_ids=None,
        num_pairs=None,
    ):
        """Padded rows (``attention_mask``), or packed rows (``position_ids`` restarting at 0
        per sequence, ``sequence_ids``, ``num_pairs``, no mask): the loss then takes the rows as
        one stream."""
        layout = {}
        if sequence_ids is not None:
            layout = dict(sequence_ids=sequence_ids.reshape(-1), num_pairs=num_pairs)
            labels = labels.reshape(-1)
        if self.loss == "linear":
            # The model's own logit transform (Gemma 2's soft cap, a scale), fused in the loss.
            hidden, _, _, transform = causal_lm_hidden_and_head(
                self.model,
                input_ids,
                attention_mask,
                position_ids=position_ids,
                return_logit_transform=True,
            )
            if layout:
                hidden, ref_hidden = hidden.flatten(0, 1), ref_hidden.flatten(0, 1)
            out = self.head(
                hidden,
                ref_hidden,
                ref_weight.to(hidden.dtype),
                labels,
                ref_bias=ref_bias,
                beta=beta,
                epsilon=epsilon,
                **transform,
                **layout,
            )
        else:
            # No cache: with none, transformers reads packed sequences from position_ids.
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).logits
            ref_logits = sharded_logits(ref_hidden, ref_weight.to(ref_hidden.dtype), ref_bias)
            # The policy's logits come from its own forward, capped or scaled as the model does;
            # the reference's are formed here from its hidden states, so they get the same.
            ref_logits = model_logits(
                ref_logits, **logit_transform(self.model.config.get_text_config())
            )
            if layout:
                logits, ref_logits = logits.flatten(0, 1), ref_logits.flatten(0, 1)
            out = epsilon_dpo_loss(logits, ref_logits, labels, beta=beta, epsilon=epsilon, **layout)
        return out


class ReferenceHidden(nn.Module):
    """The frozen reference as a root module returning only its last hidden states (FSDP2
    gathers a root's parameters when its own forward runs, not the decoder's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        return causal_lm_hidden_and_head(
            self.model,
            input_ids,
            attention_mask,
            position_ids=position_ids,
            return_logit_transform=True,  # the policy's forward applies it (the same model)
        )[0]


def preference_forward(policy, reference, batch, ref_weight, ref_bias, beta, epsilon, device):
    """The reference (no gradient), then the policy and its loss, on a ``data.model_batch``
    moved to ``device``; the caller decides whether gradients are recorded."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        ref_hidden = reference(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    return policy(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        ref_hidden,
        ref_weight,
        ref_bias,
        beta,
        epsilon,
        position_ids=batch["position_ids"],
        sequence_ids=batch["sequence_ids"],
        num_pairs=batch["num_pairs"],
    )


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
MARKER = "COMPLETE"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_marker(path: Path) -> None:
    """The ``COMPLETE`` marker, written last: the size and CRC-32 of every file of the
    checkpoint, so that a resume can tell a truncated or corrupted one from a whole one."""
    files = {
        str(f.relative_to(path)): [f.stat().st_size, _crc32(f)]
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MARKER
    }
    replace_whole(path / MARKER, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (None: it verifies). Compares every
    file with its marker: present, its size, and (``checksums``) its CRC-32. A marker from
    before markers held a manifest (empty) is taken on trust."""
    try:
        text = (path / MARKER).read_text()
        manifest = json.loads(text)["files"] if text.strip() else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MARKER} marker does not read ({e})"
    if manifest is None:
        return None
    for name, (size, crc) in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if checksums and _crc32(f) != crc:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(output_dir: Path, checksums: bool = False, note=None) -> Path | None:
    """The newest checkpoint that is complete and verifies (``checkpoint_problem``); one
    that does not is passed over, with a line to ``note`` saying which and why."""
    done = [p.parent for p in (output_dir / "checkpoints").glob(f"step_*/{MARKER}")]
    for path in sorted(done, key=lambda p: int(p.name.split("_")[1]), reverse=True):
        problem = checkpoint_problem(path, checksums)
        if problem is None:
            return path
        if note is not None:
            note(f"note: checkpoint {path.name} does not verify ({problem}): passed over")
    return None


def training_state(state) -> dict:
    """What a checkpoint holds of a ``run.TrainState``: the sharded model and optimizer, the
    schedule, the β controller, the step and the RNG."""
    model_sd, optim_sd = get_state_dict(state.policy, state.optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": state.scheduler.state_dict(),
        "beta": state.beta.state_dict(),
        "step": state.step,
        "rng": torch.get_rng_state(),
    }


def save_checkpoint(state, output_dir, rank, record):
    """A sharded checkpoint of ``state`` (a ``run.TrainState``) at its step, with the run's
    configuration ``record`` beside it (a resume compares its own against it)."""
    path = output_dir / "checkpoints" / f"step_{state.step}"
    try:
        dcp.save(training_state(state), checkpoint_id=str(path))
    except (OSError, RuntimeError) as e:
        # A full disk surfaces as "[enforce fail at inline_container.cc] unexpected pos": say
        # what happened and what is kept (the unfinished checkpoint has no marker).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        free = shutil.disk_usage(_nearest_existing(path)).free / 2**30
        raise UsageError(
            f"saving checkpoint {path.name} failed ({first}); {free:.1f} GiB free there: free "
            "space (or save less often, --save-every), then continue with --resume from the "
            "last complete checkpoint"
        ) from None
    dist.barrier()
    if rank == 0:
        write_record(path / RUN_RECORD, record)
        write_marker(path)  # last: a checkpoint cut short is never resumed from
    dist.barrier()


def load_checkpoint(path, state) -> None:
    """``state`` (a ``run.TrainState``) as the checkpoint at ``path`` saved it."""
    saved = training_state(state)
    dcp.load(saved, checkpoint_id=str(path))
    set_state_dict(
        state.policy,
        state.optimizer,
        model_state_dict=saved["model"],
        optim_state_dict=saved["optim"],
    )
    state.scheduler.load_state_dict(saved["scheduler"])
    state.beta.load_state_dict(saved["beta"])
    torch.set_rng_state(saved["rng"])
    state.step = int(saved["step"])


def export_final(state, output_dir, rank):
    """Gather the full policy of ``state`` (a ``run.TrainState``) on rank 0 and write it with
    save_pretrained (+ tokenizer)."""
    policy, policy_lm, tokenizer = state.policy, state.policy_lm, state.tokenizer
    # Under --tp a (dp, tp) mesh's weights gather in two all-gathers, and DTensor warns on every
    # rank that this is "suboptimal": true of a step, noise for a one-time export.
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        full = get_model_state_dict(
            policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    finally:
        redistribute_log.setLevel(level)
    if rank == 0:
        # A tied weight appears under each of its names; gathered, the copies are no longer
        # one tensor, so save_pretrained would write both: keep the first name only.
        names: dict[int, list[str]] = {}
        for name, p in policy.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        tied = {name for group in names.values() for name in group[1:]}
        state = {
            k.removeprefix("model."): v
            for k, v in full.items()
            if k.startswith("model.") and k not in tied
        }
        final = output_dir / "final"
        policy_lm.save_pretrained(final, state_dict=state)
        tokenizer.save_pretrained(final)
    dist.barrier()
