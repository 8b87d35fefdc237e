"""The device a benchmark script measures on: CUDA, or with ``--dry-run`` CPU tensors through
Triton's interpreter (the plumbing without a GPU). Imports nothing at module level: the
interpreter must be switched on before triton is first imported."""

from __future__ import annotations

import os


def benchmark_device(parser, dry_run: bool):
    """``torch.device("cuda")``, or ``"cpu"`` with ``TRITON_INTERPRET=1`` set for a dry run;
    a one-line parser error when neither is possible."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run, through Triton's CPU interpreter)")
    return torch.device("cpu" if dry_run else "cuda")
