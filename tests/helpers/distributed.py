"""Process groups for multi-process tests, meeting through the file system."""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback

import torch

# The output fields the multi-rank tests compare with one process.
FIELDS = (
    "loss",
    "losses",
    "steps",
    "beta_used",
    "chosen_logps",
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "p_epsilon_logratios",
    "n_epsilon_logratios",
    "mean_chosen_logits",
    "mean_rejected_logits",
    "chosen_tokens",
    "rejected_tokens",
)


def output_fields(out) -> dict:
    """The ``FIELDS`` of an output (and ``wpo_weights`` when the call asked for them), detached
    copies, for a rank to send back."""
    names = FIELDS + (("wpo_weights",) if out.wpo_weights is not None else ())
    return {name: torch.as_tensor(getattr(out, name)).detach().clone() for name in names}


def interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors here (the interpreter, set by conftest)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def rendezvous_file() -> str:
    """A fresh path for a test process group's FileStore. Ranks meet through the file system:
    a TCP port chosen free in one process can be taken by another before rank 0 binds it, which
    on a busy machine makes multi-process tests fail at random."""
    fd, path = tempfile.mkstemp(prefix="epsdpo-group-")
    os.close(fd)
    os.unlink(path)  # FileStore wants a path that does not exist yet (or an empty file)
    return path


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store_path: str):
    """A gloo process group of ``world`` ranks meeting at ``store_path`` (``rendezvous_file``).

    On success every rank waits at a barrier on every group it made (the default group and any
    DeviceMesh subgroups) before the groups are destroyed: a rank that tears its groups down
    while a slower peer still exchanges data with it, or with gloo's worker threads still
    holding work, aborts the process (SIGABRT, "terminate called without an active
    exception"), which on a busy 2-core machine happened to a 3-rank test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        yield
        made = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", {})
        groups = [dist.group.WORLD, *made]
        for group in dict.fromkeys(groups):
            dist.barrier(group=group)
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, world: int) -> dict:
    """Run ``worker(rank, world, store, results)`` on ``world`` processes meeting through a fresh
    ``rendezvous_file``; the ``results`` each rank wrote into a shared dict (never a shared
    stdout), as a plain dict."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, rendezvous_file(), results), nprocs=world, join=True)
    return dict(results)


def guarded(results, key, fn, *args):
    """In a rank: ``results[key] = fn(*args)``, or the traceback if it raises, so that one
    case's failure is reported by its own test (``result_of``), not by every case after it."""
    try:
        results[key] = fn(*args)
    except Exception:
        results[key] = "error: " + traceback.format_exc()


def result_of(results, key, where: str):
    """What ``guarded`` stored under ``key``; a failure naming ``where`` if the rank raised."""
    got = results[key]
    assert not isinstance(got, str), f"{where}: {got}"
    return got
