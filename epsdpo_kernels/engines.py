"""A model's lm_head where training engines keep it in shards (DeepSpeed ZeRO-3, FSDP1, FSDP2).

Engines that shard parameters gather a module's parameters only around that module's forward,
with hooks on the module (ZeRO-3: a fetch before the forward, a release after it, a fetch again
when the gradient reaches the module's outputs; FSDP2: the same for a unit) or in a wrapper's
forward (FSDP1). A fused loss that reads ``lm_head.weight`` without calling ``lm_head`` meets
none of them: it finds an empty partition (ZeRO-3) or freed storage (FSDP after a reshard), and
its weight gradient has nothing gathered to land on.

Two tools keep the gathering where the engines put it, one lm_head at a time, never the model:

- ``run_as_forward``: the loss run as the policy head's own forward, inside the policy's
  forward, so that each engine gathers the head for the loss's forward and again for its
  backward, and reduces its gradient, exactly as for ``lm_head(hidden)``;
- ``whole_head``/``whole_parameters``: a frozen head (the reference's) gathered for reading only,
  for the duration of a block.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def _parameter_owner(head: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The module inside ``head`` that holds ``weight`` as one of its own parameters (a PEFT
    ``modules_to_save`` wrapper holds it in a child), whose hooks ZeRO-3 and FSDP2 run for it;
    ``head`` when none does (FSDP1 flattens the parameters into its wrapper)."""
    for module in head.modules():
        if any(p is weight for p in module.parameters(recurse=False)):
            return module
    return head


def run_as_forward(head: nn.Module, function, hidden: torch.Tensor):
    """``function(hidden)`` run as the forward of ``head``'s weight's module, through that
    module's ``__call__``: every hook an engine put there (ZeRO-3's parameter fetch and
    release, an FSDP2 unit's unshard and reshard, and their counterparts on the outputs for the
    backward) runs around ``function`` as around the module's own forward; an FSDP1 wrapper's
    forward unshards and then calls ``function``. ``hidden``, which needs a gradient, is the one
    positional input (the engines attach their after-backward release to positional inputs);
    ``function`` returns a tuple of tensors, which the engines see (they attach their
    before-backward gathering to the outputs). Call it inside the model's own forward: FSDP
    unshards its root unit there, where an unwrapped head lives."""
    inner = getattr(head, "_fsdp_wrapped_module", None)
    if inner is not None:
        called, target = head, inner
    else:
        called = target = _parameter_owner(head, head.weight)
    own = target.__dict__.get("forward")
    target.forward = function
    try:
        return called(hidden)
    finally:
        if own is None:
            del target.forward
        else:
            target.forward = own


def _is_zero3_partitioned(param) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose whole tensor is not gathered on this rank now."""
    if not hasattr(param, "ds_status"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status != ZeroParamStatus.AVAILABLE


@contextlib.contextmanager
def whole_parameters(*params: torch.Tensor | None):
    """The whole of each parameter, for reading inside the block (``None`` stays ``None``): a
    ZeRO-3 partition is gathered in place for the block (``deepspeed.zero.GatheredParameters``,
    released after it), an FSDP2 shard (a DTensor) is all-gathered without gradient, anything
    else is itself (no copy). For parameters that take no gradient from what the block computes
    (the loss detaches the reference's): nothing written to a gathered copy reaches the shards.
    A parameter the engine already holds whole (the policy's own head, inside its forward, when
    the reference shares it) is not gathered again."""
    # Each parameter once: ZeRO-3 mishandles a parameter listed twice.
    partitioned = {id(p): p for p in params if p is not None and _is_zero3_partitioned(p)}
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(partitioned.values()))
    with gather:
        whole = []
        for param in params:
            if param is None:
                whole.append(None)
            elif hasattr(param, "full_tensor"):
                with torch.no_grad():
                    whole.append(param.full_tensor())
            else:
                whole.append(param)
        yield tuple(whole)


@contextlib.contextmanager
def whole_head(model: nn.Module, head: nn.Module):
    """``(weight, bias)`` of ``head``, a frozen lm_head of ``model`` (as prepared by its engine)
    whose forward has returned, whole for the block (``whole_parameters``). Under
    FSDP1 the head's unit (the innermost wrapper around it) is unsharded for the block, alone
    (``summon_full_params(recurse=False)``): a flat parameter cannot be gathered in parts, so
    with the usual wrapping (one unit per decoder layer) the root unit's embeddings and final
    norm come with the head."""
    summon = contextlib.nullcontext()
    units = [unit for unit in _fsdp1_units(model) if any(m is head for m in unit.modules())]
    if units:
        from torch.distributed.fsdp import FullyShardedDataParallel

        innermost = min(units, key=lambda unit: sum(1 for _ in unit.modules()))
        summon = FullyShardedDataParallel.summon_full_params(
            innermost, recurse=False, writeback=False
        )
    with summon, whole_parameters(head.weight, getattr(head, "bias", None)) as params:
        yield params
