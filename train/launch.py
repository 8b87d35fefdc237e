"""``--nproc-per-node N``: a script's own ranks on this machine, as ``torchrun --standalone``
starts them, but stopped the way a single process is: Ctrl-C or SIGTERM ends every rank with the
one line the script prints (where the run stands, how to resume) and status 130 or 143; a rank's
failure ends the launch with that rank's status after its own message. torchrun's agent prints
its log lines and a traceback of its own (``SignalException``, ``ChildFailedError``) in both
cases; this launcher runs the same elastic agent in-process and keeps those quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from train.cli import USAGE_ERROR_STATUS

# Set in every worker by the elastic agent: the script is one of the launched ranks.
LAUNCHED = "TORCHELASTIC_RUN_ID"


def launched_worker() -> bool:
    return LAUNCHED in os.environ


def exit_process(status: int) -> NoReturn:
    """End a script with ``status``; a launched rank that ran ends without the interpreter's
    teardown.

    A rank's process groups live on in the objects that hold them (DDP's reducer, an FSDP
    mesh) after ``destroy_process_group``, and are freed during the interpreter's finalization,
    where gloo's worker threads can abort the process (SIGABRT, "terminate called without an
    active exception") after a run that finished, as CI saw once in a two-rank TRL test.
    By the time a script returns a status it has closed everything it writes. A usage error
    ends before any group exists, with the ordinary exit: rank 0 prints its one line while
    the other ranks tear down, before the agent stops it."""
    if launched_worker() and status != USAGE_ERROR_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def launch_workers(nproc: int, script: str, args: list[str]) -> int:
    """Run ``python script *args`` as ``nproc`` ranks (a local c10d rendezvous on a free port,
    no restarts); the exit status of the launch."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's WARNING/ERROR lines ("Received 2 death signal", "failed (exitcode: 1)")
    # repeat what the ranks said; its real failures still raise. Each elastic module's logger
    # sets its own level (torch's LOGLEVEL, WARNING by default), so each is quieted.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"epsdpo-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-u", script, *args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        # A rank ended by signal N has exit code −N.
        return 128 - code if code < 0 else code
    return 0
