"""Command-line plumbing shared by the scripts in train/: user errors as one line, not tracebacks.

A mistake in a flag, a path or a data file raises ``UsageError``; ``run_main`` turns it into
``error: ...`` on stderr (printed by rank 0 only under torchrun) and exit status 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a data row); reported as one line."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during a run; the message says where the run stands and how
    to go on."""


# The shell's convention for a process ended by signal N: 128 + N (SIGINT 130, SIGTERM 143).
_signal_received: int | None = None


# The exit status of a user error (argparse's): one line on stderr, no traceback.
USAGE_ERROR_STATUS = 2


def _on_signal(signum, frame):
    global _signal_received
    _signal_received = signum
    # Later signals are ignored: a launcher forwards the terminal's Ctrl-C to ranks that already
    # got it from the terminal, and users press it twice. Raising again would break the
    # stopping rank's handler (or a checkpoint write it waits for) with a traceback, and one
    # landing in the interpreter's teardown would kill it by the signal. The run is already
    # stopping; kill -9 (or the launcher's own SIGKILL after its timeout) remains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def watch_for_interrupt() -> None:
    """Ctrl-C and SIGTERM (a scheduler's stop, ``kill``, a torchrun agent that stops its
    workers) raise KeyboardInterrupt and are remembered: under torchrun a rank that was inside
    a collective when its peer stopped fails with a connection error instead, and
    ``interrupt_requested`` tells that apart from a real failure. A torchrun worker also asks
    the kernel for SIGTERM when its agent dies, so that a ``kill -9`` of the agent does not
    leave it training."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _terminate_with_parent()


def _terminate_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux; elsewhere nothing (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1  # linux/prctl.h
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() == 1:  # the agent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def interrupt_requested() -> bool:
    return _signal_received is not None


def interrupt_exit_status() -> int:
    return 128 + (_signal_received or signal.SIGINT)


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM itself, or a failure that followed it (a collective whose peer
    stopped)."""
    return isinstance(error, KeyboardInterrupt) or _signal_received is not None


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and one-line errors (no usage block)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        if is_rank_zero():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def option(default, help, **metadata):
    """A config dataclass field that ``add_dataclass_flags`` turns into a documented flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


def check_beta_epsilon(beta: float, epsilon: float) -> None:
    """The loss flags every script shares, checked before anything loads, by the loss's own
    checks (their messages name the argument; here it is a flag)."""
    from epsdpo_kernels.params import check_beta, check_epsilon

    for check, value in ((check_beta, beta), (check_epsilon, epsilon)):
        try:
            check(value)
        except ValueError as e:
            raise UsageError(f"--{e}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag-name`` per field of a config dataclass; the field's ``metadata["help"]`` is
    its description, ``metadata["choices"]`` its allowed values."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            # A flag that is on by default, or says it is negatable, also gets its --no- form.
            negatable = f.default or f.metadata.get("negatable", False)
            action = argparse.BooleanOptionalAction if negatable else "store_true"
            parser.add_argument(flag, action=action, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(f.type.replace(" | None", ""), str)
        parser.add_argument(
            flag, type=kind, default=f.default, help=help_text, choices=f.metadata.get("choices")
        )


def run_main(main, argv=None) -> int:
    """Call ``main(argv)``; a ``UsageError`` becomes one line on stderr and exit status 2, an
    interruption (Ctrl-C) one line and exit status 130."""
    try:
        return main(argv)
    except UsageError as e:
        if is_rank_zero():
            message = " ".join(str(e).split())
            print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except (Interrupted, KeyboardInterrupt) as e:
        if is_rank_zero():
            message = str(e) if isinstance(e, Interrupted) else "interrupted before training began"
            print(message, file=sys.stderr, flush=True)
        return interrupt_exit_status()


def looks_like_path(value: str, suffixes=()) -> bool:
    """Whether a --model/--dataset value that does not exist was meant as a local path rather
    than a Hugging Face id: it starts with / . ~, ends with a data-file suffix, or its first
    component is an existing directory ("data/prefs.jsonl" where data/ exists)."""
    if value.startswith(("/", ".", "~")) or value.endswith(tuple(suffixes)):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and os.path.isdir(head)
