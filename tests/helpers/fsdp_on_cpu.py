"""Test-only: accelerate's FSDP1 and FSDP2 on CPU processes (gloo), imported by a launched rank
before the trainer is built.

accelerate sets ``DistributedType.FSDP`` only for accelerator devices (``AcceleratorState``);
on CPU processes it keeps ``MULTI_CPU`` and silently runs DDP instead. Making the same
assignment for ``MULTI_CPU`` lets accelerate's real FSDP preparation, TRL's ``prepare_fsdp`` of
the reference and the Trainer's FSDP checkpointing run on gloo. FSDP1 itself runs on CPU, but
refuses ``device_id=cpu`` (which accelerate and TRL pass) against its CPU device handle's
"cpu:0": on CPU no ``device_id`` is given.
"""

from __future__ import annotations

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import _init_utils

_accelerator_state_init = AcceleratorState.__init__
_device_from_device_id = _init_utils._get_device_from_device_id


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _cpu_device_id(device_id, rank, device_handle):
    device = _device_from_device_id(device_id, rank, device_handle)
    return None if device is not None and device.type == "cpu" else device


AcceleratorState.__init__ = _init
_init_utils._get_device_from_device_id = _cpu_device_id
