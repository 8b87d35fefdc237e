"""The flags the scripts share, as dataclass bases that each script's ``Config`` extends.

``DataFlags``: the model, the data and how sequences are cut, for every script (run.py,
run_trl.py, score.py): they read pairs exactly alike. ``TrainFlags``: what both training scripts
add (steps, learning rate, β and ε, packing, evaluation, overwriting). A script redeclares a
field to change its default or its help (the field keeps its place in ``--help``).
"""

from __future__ import annotations

from dataclasses import dataclass

from train.cli import option
from train.data import DATASET_HELP
from train.models import MODEL_HELP


@dataclass
class DataFlags:
    model: str | None = option(None, MODEL_HELP)
    dataset: str | None = option(None, DATASET_HELP)
    output_dir: str = option("runs/default", "where the outputs go")
    max_length: int = option(128, "tokens per sequence, prompt and completion")
    max_prompt_length: int = option(64, "prompt tokens kept (from the right)")
    seed: int = option(0, "seed of the initial weights, the data order and the eval hold-out")


@dataclass
class TrainFlags(DataFlags):
    max_steps: int = option(60, "optimizer steps")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    beta: float = option(0.1, "initial KL coefficient β (> 0); adapted every step")
    epsilon: float = option(0.01, "ε-DPO perturbation ε in [0, 1); 0 is plain DPO")
    padding_free: bool = option(
        False,
        "pack each micro-batch's whole sequences into rows (position_ids keep attention inside "
        "each sequence; the same steps as padded rows)",
        negatable=True,
    )
    eval_every: int = option(10, "evaluate every N steps (0: never)")
    overwrite: bool = option(
        False,
        "clear a non-empty --output-dir first (without it, a directory holding another run is "
        "refused)",
    )
