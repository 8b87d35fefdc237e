"""What the scripts in train/ write, and the rules that keep one run per output directory.

- ``check_output_dir``: before anything loads, the directory must be one the script can create
  and write in; nothing is created yet, so a failed start leaves no empty directory behind.
- ``check_run_dir``: a non-empty directory holds another run. It is refused unless the user
  resumes it (and the checkpoint was made with the same configuration) or asks to clear it.
- ``start_run_dir``: once the models and data have loaded, the directory is made (cleared first
  with ``--overwrite``) and the run's configuration written to ``run.json``; every checkpoint
  keeps a copy, so a resume compares against the configuration that made the checkpoint.
- ``MetricsLog``: one strict-JSON row per optimizer step (a non-finite value is written as
  ``null``, with a warning), appended and flushed as it comes, so an interrupted run loses
  nothing it has logged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from train.cli import UsageError

RUN_RECORD = "run.json"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: str, flag: str = "--output-dir") -> None:
    """Fail with one line when ``output_dir`` cannot be a directory this process writes in.
    Creates nothing (a probe file in the nearest existing ancestor is removed at once)."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {output_dir}: exists and is not a directory")
    probe = _nearest_existing(path.absolute())
    if not probe.is_dir():
        raise UsageError(f"{flag} {output_dir}: {probe} is not a directory")
    try:
        # As root, permission bits do not say whether a write succeeds (read-only or virtual
        # file systems); trying one does.
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UsageError(f"{flag} {output_dir}: cannot write in {probe} ({e.strerror})") from None


def check_input_outside_output(dataset: str | None, output_dir: str) -> None:
    """The outputs (the filtered dataset among them) must not land on the data being read."""
    if dataset is None or not Path(dataset).expanduser().exists():
        return
    data = Path(dataset).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    if data == out or data.is_relative_to(out):
        raise UsageError(
            f"--output-dir {output_dir} holds --dataset {dataset}: this run's outputs would "
            "write over the data it reads; pick another --output-dir"
        )


def _listing(path: Path, most: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def _differences(saved: dict, current: dict) -> list[str]:
    return [
        f"--{key.replace('_', '-')} {saved.get(key)!r} (saved) vs {current[key]!r} (now)"
        for key in current
        if saved.get(key) != current[key]
    ]


def check_run_dir(
    output_dir: str, record: dict, *, resume: bool | None, overwrite: bool, checkpoint_record=None
) -> None:
    """One run per directory. ``resume`` is None for scripts that cannot resume;
    ``checkpoint_record``, when given, returns the record of the checkpoint a resume would
    continue from (None when there is none)."""
    path = Path(output_dir).expanduser()
    if resume and overwrite:
        raise UsageError(
            "--resume continues the run in --output-dir and --overwrite clears it: pass one of them"
        )
    if not path.is_dir() or not any(path.iterdir()) or overwrite:
        return
    if resume:
        saved = checkpoint_record() if checkpoint_record is not None else None
        where = "its latest checkpoint"
        if saved is None and (path / RUN_RECORD).is_file():
            saved, where = json.loads((path / RUN_RECORD).read_text()), RUN_RECORD
        if saved is None:
            raise UsageError(
                f"--resume: {output_dir} holds no run of this script (no "
                f"{RUN_RECORD}; it has {_listing(path)}); use a new "
                "--output-dir"
            )
        differences = _differences(saved, record)
        if differences:
            raise UsageError(
                f"--resume: {output_dir} was run with another configuration "
                f"({where}): {'; '.join(differences)}. Resume with the saved "
                "values, or start a new --output-dir"
            )
        return
    resume_hint = "continue it with --resume, " if resume is not None else ""
    raise UsageError(
        f"--output-dir {output_dir} is not empty ({_listing(path)}): it holds "
        f"another run; {resume_hint}pick a new --output-dir, or pass --overwrite "
        "to clear it first"
    )


# Everything the scripts of train/ write in an output directory (run.py and run_trl.py: the
# record, metrics, checkpoints, the final model; score.py: scores, histograms, the filtered data).
# --overwrite deletes these names and nothing else.
RUN_OUTPUTS = frozenset(
    {
        RUN_RECORD,
        "metrics.jsonl",
        "metrics.jsonl.partial",  # a truncation a kill cut short (train/metrics.py)
        "metrics.png",
        "checkpoints",
        "final",
        "scores.jsonl",
        "ches_hist.png",
        "filtered",
    }
)


def _is_run_output(name: str) -> bool:
    # score.py's filtered copy of a one-file dataset: <stem>.filtered<suffix>
    return name in RUN_OUTPUTS or ".filtered." in name


def _clearable(path: Path) -> list[Path]:
    """What ``--overwrite`` deletes in ``path``: the outputs of the run recorded there. Anything
    else is refused with one line, before anything is deleted: a directory no run of these
    scripts made (no run.json), one that also holds files no run writes, the home directory,
    the working directory (or one above it) and the file system root."""
    resolved = path.resolve()
    if resolved in {Path("/"), Path.home().resolve()} or Path.cwd().resolve().is_relative_to(
        resolved
    ):
        raise UsageError(
            f"--overwrite: refusing to clear {path}, which holds the home "
            "directory, the working directory or the file system root"
        )
    if not (path / RUN_RECORD).is_file():
        raise UsageError(
            f"--overwrite: {path} holds no run of these scripts (no {RUN_RECORD}; it has "
            f"{_listing(path)}): refusing to delete anything; pick another --output-dir"
        )
    foreign = sorted(p.name for p in path.iterdir() if not _is_run_output(p.name))
    if foreign:
        raise UsageError(
            f"--overwrite: {path} holds a run and also {', '.join(foreign[:4])}"
            f"{', …' if len(foreign) > 4 else ''}, which no run writes: refusing to delete "
            "anything; move those out, or pick another --output-dir"
        )
    return list(path.iterdir())


def check_overwrite(output_dir: str, overwrite: bool, dataset: str | None = None) -> None:
    """Before anything loads: a directory --overwrite would clear must hold only a run, and
    not the --dataset the run reads."""
    path = Path(output_dir).expanduser()
    if overwrite and path.is_dir() and any(path.iterdir()):
        check_input_outside_output(dataset, output_dir)
        _clearable(path)


def start_run_dir(output_dir: Path, record: dict, *, overwrite: bool) -> None:
    """Make the output directory (cleared first with ``overwrite``: the previous run's outputs
    only) and write ``run.json``. Called by one process, once the run has loaded everything."""
    if overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        # run.json last: a clear cut short still looks like a run, so --overwrite can finish it.
        for child in sorted(_clearable(output_dir), key=lambda p: p.name == RUN_RECORD):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_record(output_dir / RUN_RECORD, record)


def replace_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill at any instant leaves the old file or the new
    one: written beside it (``<name>.partial``), flushed to disk, then renamed over it."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_record(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_record(cfg, keys) -> dict:
    """The flags ``keys`` of a script's config as ``run.json`` keeps them: --model/--dataset
    local paths made absolute (the same data named two ways compares equal), ids as given,
    None as the embedded default."""
    record = {k: getattr(cfg, k) for k in keys}
    for key, default in (("model", "embedded tiny Llama"), ("dataset", "embedded default")):
        value = record.get(key, ...)
        if value is None:
            record[key] = default
        elif isinstance(value, str) and Path(value).expanduser().exists():
            record[key] = str(Path(value).expanduser().resolve())
    return record


class MetricsLog:
    """``metrics.jsonl``: one strict-JSON object per optimizer step (``json.loads`` in any
    language reads it). Non-finite values become ``null`` and are reported on stderr."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict) -> list[str]:
        """Write ``row``; return the names of the values written as null."""
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        clean = {k: (None if k in bad else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if bad:
            print(
                f"warning: step {row.get('step')}: non-finite {', '.join(bad)} (written as "
                f"null in {self.path.name})",
                file=sys.stderr,
                flush=True,
            )
        return bad
