"""Score every preference pair of a dataset by CHES (likelihood-displacement risk); optionally
write the dataset without its highest-scoring pairs.

    python train/score.py                          # the embedded default model and data
    python train/score.py --model ID_OR_PATH --dataset ID_OR_PATH --drop-top 10

Reads the dataset as train/run.py does (same formats, prompt splitting, tokenization and
truncation flags, same model loading), runs the model's decoder over each batch of pairs
(no logits, no gradients), and writes to --output-dir:

- scores.jsonl: one line per dataset row, in order: its split, file and line, ``ches`` and
  ``ches_normalized`` (``epsdpo_kernels.ches_scores``), the response token counts; rows that
  cannot form a pair get ``skipped`` with the reason instead of scores;
- ches_hist.png: histograms of both scores;
- with --drop-top K: the dataset without the K% highest-ranked training pairs (by --rank-by),
  in the input's format (a file, or a directory with the eval split copied unchanged), ready
  for ``train/run.py --dataset``.

Memory is one batch of activations; the dataset's text is read whole, as train/run.py does.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from epsdpo_kernels import ches_scores
from train.cli import ArgumentParser, UsageError, add_dataclass_flags, option, run_main
from train.data import (
    DEFAULT_DATASET,
    check_dataset_arg,
    collate,
    data_suffix,
    read_splits,
    tokenize_rows,
)
from train.flags import DataFlags
from train.models import check_model_arg, load_policy_and_reference, load_tokenizer
from train.outputs import (
    check_output_dir,
    check_overwrite,
    check_run_dir,
    run_record,
    start_run_dir,
)

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclass
class Config(DataFlags):
    output_dir: str = option("runs/ches", "scores.jsonl, ches_hist.png and the filtered dataset")
    seed: int = option(0, "seed of the embedded default model's random init")
    batch_size: int = option(16, "pairs per forward pass")
    drop_top: float | None = option(
        None, "write the dataset without the top K%% of training pairs by --rank-by (0 < K < 100)"
    )
    rank_by: str = option(
        "ches_normalized",
        "score that ranks pairs for --drop-top",
        choices=["ches_normalized", "ches"],
    )
    device: str = option("auto", "cuda, cpu, or auto (cuda when available)")
    overwrite: bool = option(
        False,
        "clear --output-dir first when it holds an earlier run's outputs (anything else in it "
        "is refused)",
    )


# What run.json records of a scoring run.
RUN_DEFINING = [f.name for f in fields(Config) if f.name not in ("output_dir", "overwrite")]


def parse_args(argv=None) -> Config:
    parser = ArgumentParser(prog="train/score.py", description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, Config)
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg: Config) -> None:
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    if not 1 <= cfg.max_prompt_length < cfg.max_length:
        raise UsageError(
            f"--max-prompt-length ({cfg.max_prompt_length}) must be ≥ 1 and "
            f"smaller than --max-length ({cfg.max_length})"
        )
    if cfg.drop_top is not None and not 0 < cfg.drop_top < 100:
        raise UsageError(f"--drop-top must be a percentage in (0, 100), got {cfg.drop_top}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {cfg.device}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: no CUDA device is available")
    check_model_arg(cfg.model)
    check_dataset_arg(cfg.dataset)
    check_output_dir(cfg.output_dir)
    # The training scripts' rules: one run per directory, --overwrite clears only a run's outputs.
    check_overwrite(cfg.output_dir, cfg.overwrite, cfg.dataset)
    check_run_dir(cfg.output_dir, {}, resume=None, overwrite=cfg.overwrite)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    check_config(cfg)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    source = cfg.dataset or str(DEFAULT_DATASET)
    tokenizer = load_tokenizer(cfg.model)
    splits = read_splits(source)
    model, _ = load_policy_and_reference(cfg.model, cfg.seed, reference=False)
    if not callable(getattr(model, "get_decoder", None)):
        raise UsageError(
            f"--model {cfg.model}: {type(model).__name__} has no get_decoder(), "
            "so its last hidden states cannot be read without its logits"
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    out_dir = Path(cfg.output_dir).expanduser()

    records = []
    for split, (_, rows) in splits.items():
        records += score_split(split, rows, model, tokenizer, cfg, device)
    # Only now: a failed start leaves nothing behind (and clears nothing).
    start_run_dir(out_dir, run_record(cfg, RUN_DEFINING), overwrite=cfg.overwrite)
    scores_path = out_dir / "scores.jsonl"
    with open(scores_path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    scored = [r for r in records if "skipped" not in r]
    print(f"scored {len(scored)} of {len(records)} rows of {source} -> {scores_path}")
    for key in ("ches", "ches_normalized"):
        values = [r[key] for r in scored if math.isfinite(r[key])]
        print(summary_line(key, values))
    skipped = len(records) - len(scored)
    if skipped:
        print(f"note: {skipped} rows cannot form a pair; their lines in scores.jsonl say why")
    plot_histograms(scored, out_dir / "ches_hist.png")
    print(f"histograms -> {out_dir / 'ches_hist.png'}")
    if cfg.drop_top is not None:
        written, dropped, kept = write_filtered(source, splits, records, cfg, out_dir)
        print(
            f"dropped the top {cfg.drop_top:g}% by {cfg.rank_by}: {dropped} training pairs; "
            f"{kept} training rows kept -> {written}"
        )
        print(f"train on it: python train/run.py --dataset {written}")
    return 0


def score_split(split, rows, model, tokenizer, cfg: Config, device) -> list[dict]:
    """One record per row, in row order."""
    from tqdm import tqdm

    lengths = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    tokenized = tokenize_rows(rows, tokenizer, **lengths)
    for note in tokenized.notes(split, **lengths):
        print(f"note: {note}")
    reasons = {where: reason for reason, wheres in tokenized.skipped.items() for where in wheres}
    scores = {}
    pairs = tokenized.pairs
    pad = tokenizer.pad_token_id
    for start in tqdm(
        range(0, len(pairs), cfg.batch_size),
        desc=f"scoring {split}",
        unit="batch",
        disable=not pairs,
        file=sys.stderr,
    ):
        batch = pairs[start : start + cfg.batch_size]
        inputs = {k: v.to(device) for k, v in collate(batch, pad).items()}
        with torch.no_grad():
            # The decoder alone: CHES needs hidden states, not logits (so models with
            # soft-capped or scaled logits are fine here).
            hidden = model.get_decoder()(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            labels = inputs["labels"]
            plain = ches_scores(hidden, labels).tolist()
            normalized = ches_scores(hidden, labels, length_normalized=True).tolist()
        counts = (labels != -100).sum(dim=1).tolist()
        for i, pair in enumerate(batch):
            scores[pair.where] = dict(
                ches=plain[i],
                ches_normalized=normalized[i],
                chosen_tokens=counts[i],
                rejected_tokens=counts[len(batch) + i],
            )
    records = []
    for row in rows:
        record = {"split": split, "file": row.file, "line": row.line}
        if row.where in scores:
            record.update(scores[row.where])
        else:
            record["skipped"] = reasons.get(row.where, "not scored")
        records.append(record)
    return records


def summary_line(key: str, values: list[float]) -> str:
    if not values:
        return f"{key}: no finite scores"
    ordered = torch.tensor(values, dtype=torch.float64)
    quantiles = torch.quantile(ordered, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    parts = ", ".join(f"q{int(q * 100)} {v:.4g}" for q, v in zip(QUANTILES, quantiles))
    return f"{key}: n {len(values)}, mean {ordered.mean().item():.4g}, {parts}"


# Values beyond this many interquartile ranges outside the quartiles are drawn as outliers at
# the edge of the histogram instead of stretching its axis (3: Tukey's "far out").
OUTLIER_IQRS = 3.0


def histogram_range(values: list[float]) -> tuple[float, float]:
    """The x-range the histogram shows: the data's own range, cut to the quartiles ± 3 IQR so
    that one far outlier does not squeeze every other pair into one bar."""
    ordered = torch.tensor(values, dtype=torch.float64)
    q1, q3 = torch.quantile(ordered, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    low, high = ordered.min().item(), ordered.max().item()
    spread = q3 - q1
    if spread > 0:
        low, high = max(low, q1 - OUTLIER_IQRS * spread), min(high, q3 + OUTLIER_IQRS * spread)
    return low, high


def plot_histograms(scored: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in zip(
        axes, ("ches", "ches_normalized"), ("CHES (sums)", "length-normalised CHES (means)")
    ):
        values = [r[key] for r in scored if math.isfinite(r[key])]
        if not values:
            ax.set_title(f"{title}: no finite scores")
            continue
        low, high = histogram_range(values)
        shown = [v for v in values if low <= v <= high]
        ax.hist(shown, bins=min(50, max(5, len(shown) // 4)), range=(low, high), color="tab:blue")
        # Outliers: counted and marked at the edge they lie beyond, with the extreme value.
        for outside, edge, extreme, side, align, dx in (
            ([v for v in values if v < low], low, min(values), "below", "left", 3),
            ([v for v in values if v > high], high, max(values), "above", "right", -3),
        ):
            if outside:
                ax.axvline(edge, color="tab:red", lw=1, ls="--")
                ax.annotate(
                    f"{len(outside)} {side}\n(to {extreme:.3g})",
                    xy=(edge, 1),
                    xycoords=("data", "axes fraction"),
                    xytext=(dx, -3),
                    textcoords="offset points",
                    ha=align,
                    va="top",
                    fontsize=8,
                    color="tab:red",
                )
        ax.set_title(title)
        ax.set_xlabel("score (higher: more displacement risk)")
        ax.set_ylabel("pairs")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_filtered(source, splits, records, cfg: Config, out_dir: Path):
    """(path written, pairs dropped, training rows kept). Ranks the scored training pairs by
    ``cfg.rank_by`` (NaN ranks lowest) and drops the top ``ceil(K% · n)``; rows that could not
    be scored are kept (train/run.py skips them again with its notes)."""
    train_file, train_rows = splits["train"]
    train_records = [r for r in records if r["split"] == "train"]
    ranked = [i for i, r in enumerate(train_records) if "skipped" not in r]
    key = lambda i: train_records[i][cfg.rank_by]  # noqa: E731
    ranked.sort(key=lambda i: key(i) if math.isfinite(key(i)) else -math.inf, reverse=True)
    drop = set(ranked[: math.ceil(cfg.drop_top / 100 * len(ranked))])
    kept = [row for i, row in enumerate(train_rows) if i not in drop]
    if train_file is None:  # a Hugging Face dataset: JSONL, which --dataset reads back
        target = out_dir / "filtered" / "train.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_rows(target, kept)
        for split, (_, rows) in splits.items():
            if split != "train":
                _write_rows(target.parent / f"{split}.jsonl", rows)
        return target.parent, len(drop), len(kept)
    suffix = data_suffix(train_file)
    if Path(source).expanduser().is_dir():
        target_dir = out_dir / "filtered"
        target_dir.mkdir(parents=True, exist_ok=True)
        _write_rows(target_dir / f"train{suffix}", kept)
        for split, (path, _) in splits.items():
            if split != "train":
                (target_dir / path.name).write_bytes(path.read_bytes())
        return target_dir, len(drop), len(kept)
    stem = train_file.name[: -len(suffix)]
    target = out_dir / f"{stem}.filtered{suffix}"
    _write_rows(target, kept)
    return target, len(drop), len(kept)


def _write_rows(path: Path, rows) -> None:
    """Rows in the format the file name says: JSONL (one row per line) or a JSON list;
    gzip-compressed when it ends in .gz."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r.data, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps([r.data for r in rows], ensure_ascii=False, indent=1) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(run_main(main))
