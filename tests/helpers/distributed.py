"""Process groups for multi-process tests, meeting through the file system."""

from __future__ import annotations

import contextlib
import os
import tempfile


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
