"""Launching tests/helpers/engine_run.py under each engine TRL users scale with, on CPU ranks.

DDP is torchrun; DeepSpeed and FSDP are ``accelerate launch --config_file`` with the configs of
TRL's ``accelerate_configs`` (2 processes, fp32), as TRL's docs launch them. On CPU: DeepSpeed
takes its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo when oneCCL is absent); FSDP needs the
test-only ``fsdp_on_cpu`` shim, and neither ``sync_module_states`` nor the CPU-RAM-efficient
loading that depends on it (FSDP1 refuses both on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The tiny model's lm_head (save_tiny_model).
HEAD_ROWS, HEAD_COLUMNS = 4000, 32
# Run as a module: as a script, its own folder would come first on sys.path, where this
# package's trl.py would stand for TRL.
MODULE = "tests.helpers.engine_run"

_COMMON = dict(
    compute_environment="LOCAL_MACHINE",
    debug=False,
    machine_rank=0,
    main_training_function="main",
    mixed_precision="no",
    num_machines=1,
    num_processes=2,
    # Port 0: torchrun's store binds a free port itself (a port chosen free beforehand can be
    # taken by another process before rank 0 binds it).
    main_process_port=0,
    rdzv_backend="static",
    same_network=True,
    use_cpu=False,
)
_ZERO = dict(
    deepspeed_multinode_launcher="standard",
    offload_optimizer_device="none",
    offload_param_device="none",
    zero3_init_flag=False,
)
_FSDP = dict(
    fsdp_activation_checkpointing=False,
    fsdp_auto_wrap_policy="TRANSFORMER_BASED_WRAP",
    fsdp_cpu_ram_efficient_loading=False,
    fsdp_offload_params=False,
    fsdp_state_dict_type="FULL_STATE_DICT",
    fsdp_sync_module_states=False,
)
# ZeRO-3 with the parameters and the optimizer states on the CPU. A DeepSpeed config file,
# because the Trainer's optimizer (SGD here) under ZeRO-Offload needs
# zero_force_ds_cpu_optimizer off, which accelerate's own keys cannot say.
_ZERO3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "cpu"},
        "offload_optimizer": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True,
        # transformers fills these from the model (10 × and 0.9 × hidden² elements): the
        # decoder layers are then partitioned too, and only the lm_heads may be whole at the
        # loss.
        "stage3_param_persistence_threshold": "auto",
        "stage3_prefetch_bucket_size": "auto",
    },
    "zero_force_ds_cpu_optimizer": False,
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}

ENGINES = {
    "ddp": None,  # torchrun
    "zero2": dict(distributed_type="DEEPSPEED", deepspeed_config={**_ZERO, "zero_stage": 2}),
    # TRL's zero3.yaml: the models are partitioned as they load.
    "zero3": dict(
        distributed_type="DEEPSPEED",
        deepspeed_config={
            **_ZERO,
            "zero_stage": 3,
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
        },
    ),
    # TRL's QLoRA-style recipe without the quantisation: a LoRA adapter under ZeRO-3, the
    # reference the policy with its adapter disabled.
    "zero3-peft": dict(
        distributed_type="DEEPSPEED",
        deepspeed_config={**_ZERO, "zero_stage": 3, "zero3_init_flag": True},
    ),
    "zero3-offload": dict(
        distributed_type="DEEPSPEED",
        deepspeed_config={
            "deepspeed_multinode_launcher": "standard",
            "deepspeed_config_file": "zero3_offload.json",
            "zero3_init_flag": False,
        },
    ),
    # TRL's fsdp1.yaml (use_orig_params) and the same with flat parameters, but for sharded
    # checkpoints: FSDP1's full state dict on a CPU compute device crashes the process
    # (SIGSEGV cloning the unsharded parameters, TRL's own DPOTrainer too).
    "fsdp1": dict(
        distributed_type="FSDP",
        fsdp_config={
            **_FSDP,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_version": 1,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": True,
            "fsdp_reshard_after_forward": "FULL_SHARD",
            "fsdp_use_orig_params": True,
        },
    ),
    "fsdp1-flat": dict(
        distributed_type="FSDP",
        fsdp_config={
            **_FSDP,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_version": 1,
            "fsdp_reshard_after_forward": "FULL_SHARD",
            "fsdp_use_orig_params": False,
        },
    ),
    # TRL's fsdp2.yaml: reshard_after_forward set, for the policy and (by TRL) the reference.
    "fsdp2": dict(
        distributed_type="FSDP",
        fsdp_config={**_FSDP, "fsdp_version": 2, "fsdp_reshard_after_forward": True},
    ),
}


def save_tiny_model(path: Path) -> Path:
    """The tiny Llama of tests/helpers/trl.py with an untied lm_head of 4000 × 32 = 128000
    elements: above ZeRO-3's parameter persistence thresholds (DeepSpeed's default 1e5, which
    the policy gets; 10 × hidden = 320, which TRL gives the reference), so ZeRO-3 partitions
    both heads between forwards (below it, a head would stay whole on every rank and hide the
    engine)."""
    from tests.helpers.trl import tiny_models

    policy, _ = tiny_models(vocab=HEAD_ROWS, tied=False)
    assert tuple(policy.lm_head.weight.shape) == (HEAD_ROWS, HEAD_COLUMNS)
    policy.save_pretrained(path)
    return path


def launch(engine: str, model: Path, out: Path, timeout: int = 900) -> dict:
    """Run engine_run.py on 2 CPU ranks under ``engine``; its results.json."""
    out.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the torch backend serves CPU training
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    script = ["-m", MODULE, str(out), str(model), engine]
    if ENGINES[engine] is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", *script]
    else:
        config = {**_COMMON, **ENGINES[engine]}
        if "deepspeed_config_file" in config.get("deepspeed_config", {}):
            ds_file = out / "zero3_offload.json"
            ds_file.write_text(json.dumps(_ZERO3_OFFLOAD))
            config["deepspeed_config"] = {
                **config["deepspeed_config"],
                "deepspeed_config_file": str(ds_file),
            }
            # accelerate refuses its own settings beside a DeepSpeed config file; the file's
            # absent bf16/fp16 blocks mean fp32.
            del config["mixed_precision"]
        if config["distributed_type"] == "FSDP":
            env["EPSDPO_TEST_FSDP_ON_CPU"] = "1"
        config_file = out / "accelerate.json"
        config_file.write_text(json.dumps(config))
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        command += ["--config_file", str(config_file), *script]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, f"{engine}: " + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text())
