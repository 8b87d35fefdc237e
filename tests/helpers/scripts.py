"""Running the scripts of train/ as a user would: in a fresh process, CPU and gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--max-length",
    "96",
]


def script_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the torch backend serves CPU training
    # CPU and gloo even on a GPU machine: two ranks on one GPU would trip NCCL.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run(args, nproc=1, timeout=600, check=True, script="run.py"):
    """Run a script of train/ (run.py unless ``script`` says otherwise) in a fresh process."""
    path = str(ROOT / "train" / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        # --standalone: torchrun's own rendezvous on a port it binds itself (no port race).
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            path,
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run_in_process(script: str, args, capsys, monkeypatch) -> tuple[int, str, str]:
    """A script of train/ (``"run.py"``, ``"run_trl.py"``, ``"score.py"``) as its command line
    would run it, but in this process: (exit status, stdout, stderr). For the error paths,
    which end before any training: no interpreter startup or imports to pay per case. The
    scripts' SIGINT handler is left out (it would outlive the call)."""
    import importlib

    from train import cli

    module = importlib.import_module(f"train.{script.removesuffix('.py')}")
    if hasattr(module, "watch_for_interrupt"):
        monkeypatch.setattr(module, "watch_for_interrupt", lambda: None)
    monkeypatch.setattr(sys, "argv", [f"train/{script}", *args])
    capsys.readouterr()  # what earlier code printed is not this call's
    try:
        code = cli.run_main(module.main, list(args))
    except SystemExit as e:  # argparse: --help, or a malformed flag
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
