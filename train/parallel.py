"""Tensor parallelism for train/run.py (``--tp N``): a data × tensor mesh, a Llama's blocks
split with ``parallelize_module``, and the gradient norm over parameters on both meshes.

The ``world`` ranks form a ``(world / tp, tp)`` mesh named ``("dp", "tp")``. Within a tensor
group every rank holds the same batch; FSDP2 shards over ``dp`` only. Each decoder block is split
Megatron-style: the query, key, value, gate and up projections column-wise (each rank computes
its own heads and its share of the MLP's intermediate features), the output and down projections
row-wise (their partial sums all-reduced, so the residual stream stays replicated). The
embedding is split over the vocabulary (``RowwiseParallel`` on an ``nn.Embedding``), and so is
the lm_head (``ColwiseParallel``, the local output kept a DTensor ``Shard(-1)``): the linear loss
reads the lm_head weight as a ``Shard(0)`` DTensor and the logits loss the sharded logits, and
neither gathers a row of logits. The norms stay whole on every tensor rank: their inputs and
gradients are replicated there (the row-wise all-reduce in the forward, the hidden-state
gradient that the vocabulary-parallel loss completes in the backward).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from train.cli import UsageError

# One decoder block's plan (module paths of transformers' Llama, Mistral, Qwen2 blocks).
BLOCK_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def check_tensor_parallel(tp: int, world: int) -> None:
    """The checks of ``--tp`` that need no model."""
    if tp < 1:
        raise UsageError(f"--tp must be ≥ 1, got {tp}")
    if world % tp:
        raise UsageError(f"--tp {tp} must divide the number of processes ({world})")


def check_model_splits(config, tp: int) -> None:
    """Each tensor rank must get whole attention heads (and whole key/value heads, which grouped
    queries share) and an equal part of the MLP."""
    if tp == 1:
        return
    sizes = {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None)
        or getattr(config, "num_attention_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
    }
    for name, size in sizes.items():
        if not isinstance(size, int) or size % tp:
            raise UsageError(f"--tp {tp} must divide the model's {name} ({size})")


def device_mesh(device_type: str, world: int, tp: int) -> DeviceMesh:
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize_causal_lm(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split ``model``'s blocks, embedding and lm_head over ``tp_mesh`` in place (module
    docstring); tied embeddings stay tied (one ``Shard(0)`` parameter)."""
    if tp_mesh.size() == 1:
        return
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.get_decoder().layers:
        missing = [path for path in BLOCK_PLAN if not _has_linear(layer, path)]
        if missing:
            raise UsageError(
                f"--tp: {type(layer).__name__} has no {', '.join(missing)}: only Llama-style "
                "blocks (q/k/v/o projections, gated MLP) can be split"
            )
        parallelize_module(layer, tp_mesh, {p: styles[s]() for p, s in BLOCK_PLAN.items()})
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embedding.weight
    # A vocabulary-sharded embedding: each rank looks up the ids it owns, the rest read 0,
    # and the partial rows all-reduce.
    parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(head, tp_mesh, ColwiseParallel(use_local_output=False))
    if tied:  # each style made its own Parameter of the one weight: make them one again
        head.weight = embedding.weight


def _has_linear(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


def shard_over_vocabulary(tensor: torch.Tensor | None, tp_mesh: DeviceMesh):
    """A frozen reference lm_head weight or bias as the policy's: ``Shard(0)`` on ``tp_mesh``."""
    if tensor is None or tp_mesh.size() == 1:
        return tensor
    return distribute_tensor(tensor, tp_mesh, [Shard(0)])


def sharded_logits(hidden: torch.Tensor, weight, bias):
    """``hidden @ weight.T + bias`` with a vocabulary-sharded weight: a ``Shard(-1)`` DTensor
    of logits (each rank its own columns), as the policy's ColwiseParallel lm_head returns."""
    if isinstance(weight, DTensor):
        hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
    return nn.functional.linear(hidden, weight, bias)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (its rule and result) for gradients that live on
    different meshes: the tensor-parallel ones on the data × tensor mesh, the rest on the data
    mesh only, whose norms torch's version cannot stack. Each rank sums the squares of its local
    shards, each divided by the number of ranks holding that shard, and one all-reduce over all
    ranks completes the sum (the same value on every rank, so every rank clips alike). Without
    tensor parallelism every gradient shares one mesh and this is torch's own function.
    Returns the total norm before clipping."""
    import torch.distributed as dist

    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    meshes = {g.device_mesh if isinstance(g, DTensor) else None for g in grads}
    if len(meshes) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    world = dist.get_world_size()
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        copies = world
        if isinstance(g, DTensor):
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if not placement.is_replicate():  # Shard, or FSDP2's strided shard
                    copies //= size
            g = g.to_local()
        squares += g.double().square().sum() / copies
    dist.all_reduce(squares)
    total = math.sqrt(float(squares))
    coefficient = max_norm / (total + 1e-6)  # torch's rule
    if coefficient < 1.0:
        for g in grads:
            g.mul_(coefficient)
    return total
