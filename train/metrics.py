"""What train/run.py logs per optimizer step, and the picture it draws of it."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from epsdpo_kernels import EpsilonDPOOutput
from train.outputs import replace_whole


class MetricSums:
    """Sums of ``EpsilonDPOOutput.pair_metric_sums()`` over a global batch, all-reduced so every key
    is a mean over all pairs of all ranks (what TRL logs per step). ``group``: the ranks that
    hold different pairs (the data-parallel ones; tensor-parallel ranks repeat their pairs)."""

    def __init__(self, device, group=None):
        self.group = group
        self.names: list[str] | None = None
        self.sums = None
        self.device = device
        # [pairs, tokens, positions]: positions count padding too, tokens only real ones.
        self.pairs = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, out: EpsilonDPOOutput, weight: torch.Tensor):
        per_pair = out.pair_metric_sums(weight)
        values = torch.stack(list(per_pair.values()))
        if self.sums is None:
            self.names, self.sums = list(per_pair), torch.zeros_like(values)
        self.sums += values
        self.pairs[0] += weight.sum()

    def add_tokens(self, tokens, positions):
        self.pairs[1] += tokens
        self.pairs[2] += positions

    def reduce(self, prefix=""):
        dist.all_reduce(self.sums, group=self.group)
        dist.all_reduce(self.pairs, group=self.group)
        pairs, tokens, positions = self.pairs.tolist()
        means = (self.sums / max(pairs, 1.0)).tolist()
        return {prefix + k: v for k, v in zip(self.names, means)}, tokens, positions


def load_average() -> float | None:
    """The 1-minute load average, where the system keeps one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_note() -> str:
    """The cores, torch's thread count and the load: what the times a run reports depend on.
    Warns (on stderr) when the machine is busier than its cores."""
    cores = os.cpu_count() or 1
    note = f"machine: {cores} CPU cores, {torch.get_num_threads()} torch threads"
    load = load_average()
    if load is not None:
        note += f", load average {load:.2f} (1 min)"
        if load > cores:
            # On a shared 2-core machine at load 5 the default 2 threads ran train/run.py 7-8×
            # slower than one thread (same metrics bitwise): threads that wait on each other.
            fix = (
                "; run with OMP_NUM_THREADS=1 (torch's threads contend with the other load)"
                if torch.get_num_threads() > 1
                else ""
            )
            print(
                f"warning: the load average ({load:.2f}) exceeds the {cores} cores: the times "
                f"reported here are slower than on an idle machine{fix}",
                file=sys.stderr,
            )
    return note


def peak_memory_note(device: torch.device) -> str:
    """This process's peak memory: allocated CUDA memory on a GPU, resident set on a CPU."""
    if device.type == "cuda":
        mib = torch.cuda.max_memory_allocated(device) / 2**20
        return f"peak memory {mib:.0f} MiB (CUDA, rank 0)"
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak memory {kib / 2**10:.0f} MiB (resident set, rank 0)"


def _parsed_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for every complete row of a ``metrics.jsonl``. A line that does not parse
    (the last one, when an append was cut short by a kill or a full disk) is dropped with a
    note on stderr: one torn row must not make every later resume fail."""
    rows, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            torn.append(number)
    if torn:
        print(
            f"note: {path.name}: dropped line{'s' if len(torn) > 1 else ''} "
            f"{', '.join(map(str, torn))}, which did not parse (an append cut short)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, with ``null`` (a non-finite value) read back as NaN."""
    rows = [row for _, row in _parsed_lines(path)]
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only rows up to ``step``: after a resume, rows the interrupted run logged past its
    last checkpoint are recomputed and must not appear twice. The file is replaced whole
    (written beside it, flushed to disk, then renamed over it), so a kill at any instant leaves
    either the old rows or the new ones."""
    if not path.exists():
        return
    keep = [line for line, row in _parsed_lines(path) if row["step"] <= step]
    replace_whole(path, "".join(line + "\n" for line in keep))


# One colour per series, the same in every panel.
TRAIN, EVAL = "tab:blue", "tab:orange"
STEP_UP, STEP_DOWN = "tab:green", "tab:red"
BELOW_REF, LOGRATIO = "tab:purple", "tab:brown"


def plot_metrics(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    ev = [r for r in rows if "eval/loss" in r]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.2))

    def train_and_eval(ax, key):
        ax.plot(steps, [r[key] for r in rows], color=TRAIN, label="train")
        if ev:
            ax.plot(
                [r["step"] for r in ev],
                [r["eval/" + key] for r in ev],
                "o-",
                color=EVAL,
                label="eval",
            )

    train_and_eval(axes[0], "loss")
    axes[1].plot(steps, [r["kl/beta"] for r in rows], color=TRAIN, label="β used by the step")
    train_and_eval(axes[2], "rewards/accuracies")
    axes[3].plot(
        steps, [r["kl/p_epsilon_steps"] for r in rows], color=STEP_UP, label="s = +1 (weaker KL)"
    )
    axes[3].plot(
        steps,
        [r["kl/n_epsilon_steps"] for r in rows],
        color=STEP_DOWN,
        label="s = −1 (stronger KL)",
    )
    # Displacement: a fraction (left axis) and a log-ratio in nats (right axis), one panel.
    shown = [r for r in rows if "displacement/chosen_below_ref" in r]
    axes[4].plot(
        [r["step"] for r in shown],
        [r["displacement/chosen_below_ref"] for r in shown],
        color=BELOW_REF,
        label="pairs with log π(chosen) < ref",
    )
    axes[4].set_ylim(-0.02, 1.02)
    ratio_ax = axes[4].twinx()
    ratio_ax.plot(
        [r["step"] for r in shown],
        [r["displacement/chosen_logratio"] for r in shown],
        "--",
        color=LOGRATIO,
        label="mean log π/π_ref (chosen), right axis",
    )
    ratio_ax.axhline(0.0, color=LOGRATIO, lw=0.6, alpha=0.5)
    handles = axes[4].get_legend_handles_labels()[0] + ratio_ax.get_legend_handles_labels()[0]
    titles = (
        "loss",
        "β",
        "reward accuracy",
        "fraction of pairs per step s",
        "likelihood displacement (chosen)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax is axes[4]:
            # Two axes share this panel, so no corner is free of both curves: below the plot.
            ax.legend(
                fontsize=8,
                handles=handles,
                loc="upper center",
                ncol=1,
                bbox_to_anchor=(0.5, -0.22),
                frameon=False,
            )
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
