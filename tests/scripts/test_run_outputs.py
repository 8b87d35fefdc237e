"""What train/run.py leaves in --output-dir: one run per directory, checked resumes, Ctrl-C as
one line, strict JSON metrics and a clear stop when training diverges. Run as a user would, in
subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.helpers.scripts import FAST, ROOT, metrics, run, run_in_process  # noqa: E402
from tests.helpers.scripts import script_env as _env

# Every test here runs a script of train/ in a subprocess.
pytestmark = pytest.mark.slow


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _strict_rows(path) -> list[dict]:
    """metrics.jsonl read by a parser that refuses NaN and Infinity, as non-Python ones do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_directory_holds_one_run(tmp_path):
    out = tmp_path / "out"
    first = ["--max-steps", "2", *FAST, "--save-every", "2", "--output-dir", str(out)]
    run(first)
    before = (out / "metrics.jsonl").read_text()
    assert json.loads((out / "checkpoints" / "step_2" / "run.json").read_text())["beta"] == 0.1

    # Another run into it is refused, with the three ways out, and nothing is touched.
    line = _one_error_line(
        run([*first[:-2], "--max-steps", "1", "--output-dir", str(out)], check=False)
    )
    assert f"--output-dir {out} is not empty" in line
    assert "--resume" in line and "--overwrite" in line and "new --output-dir" in line
    assert (out / "metrics.jsonl").read_text() == before

    # A resume with another configuration says what differs.
    line = _one_error_line(
        run([*first, "--resume", "--beta", "0.2", "--max-length", "80"], check=False)
    )
    assert "--beta 0.1 (saved) vs 0.2 (now)" in line and "--max-length 96 (saved) vs 80" in line
    assert (out / "metrics.jsonl").read_text() == before

    # --overwrite clears the old run first: no stale checkpoint is left to resume from.
    proc = run(["--max-steps", "1", *FAST, "--output-dir", str(out), "--overwrite"])
    assert "done: 1 steps" in proc.stdout
    assert not (out / "checkpoints").exists()
    assert [r["step"] for r in metrics(out)] == [1]
    assert json.loads((out / "run.json").read_text())["max_steps"] == 1
    assert (out / "final" / "model.safetensors").exists()
    line = _one_error_line(run(["--output-dir", str(out), "--overwrite", "--resume"], check=False))
    assert "pass one of them" in line


def _signal_at_first_checkpoint(args, out, signum, times=1) -> tuple[int, str]:
    """Run train/run.py with ``args``, send ``signum`` once its step-1 checkpoint into ``out``
    is complete; (exit status, stderr). SIG_DFL for SIGINT first, since a shell that starts a
    job in the background makes it ignore SIGINT, and the tests must not depend on how they
    were run."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train" / "run.py"), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_1" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.01)
    for i in range(times):
        proc.send_signal(signum)
        time.sleep(0.05 * (i + 1 < times))
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "out"
    args = ["--max-steps", "4", *FAST, "--save-every", "1", "--output-dir", str(out)]
    returncode, stderr = _signal_at_first_checkpoint(args, out, signal.SIGINT)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    rows = _strict_rows(out / "metrics.jsonl")
    saved = max(
        int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*/COMPLETE")
    )
    expected = (
        f"interrupted at step {len(rows)}; the last checkpoint is step {saved}; resume "
        "with --resume"
    )
    assert stderr.strip().splitlines()[-1] == expected, stderr
    assert not (out / "final").exists()

    run([*args, "--resume"])
    assert [r["step"] for r in _strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_second_ctrl_c_while_stopping_is_ignored(tmp_path):
    """A launcher forwards the terminal's Ctrl-C to ranks that already got it, and users press
    it twice: the second one used to break the stopping rank's handler with a traceback."""
    out = tmp_path / "out"
    args = ["--max-steps", "40", *FAST, "--save-every", "1", "--output-dir", str(out)]
    returncode, stderr = _signal_at_first_checkpoint(args, out, signal.SIGINT, times=3)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith("resume with --resume"), last


def test_sigterm_is_one_line_with_the_resume_hint(tmp_path):
    """SIGTERM (a scheduler's stop, `kill`) once ended the run with no message and status −15."""
    out = tmp_path / "out"
    args = ["--max-steps", "40", *FAST, "--save-every", "1", "--output-dir", str(out)]
    returncode, stderr = _signal_at_first_checkpoint(args, out, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith("resume with --resume"), last


@pytest.mark.xdist_group("multi_process")
def test_ctrl_c_of_launched_ranks_is_one_line(tmp_path):
    """--nproc-per-node 2 and Ctrl-C at the terminal (SIGINT to the whole process group): one
    line and status 130, where torchrun's agent added its log lines and a 20-line traceback."""
    out = tmp_path / "out"
    args = ["--nproc-per-node", "2", "--max-steps", "200", *FAST, "--save-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train" / "run.py"), *args, "--output-dir", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step_1" / "COMPLETE").exists():
            assert proc.poll() is None and time.time() < deadline, "ended before its checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    # What is left once rank 0's progress bar (carriage-return updates) and the note of a
    # busy machine are taken out.
    lines = [
        line
        for line in stderr.replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith(("ε-DPO", "warning: the load average"))
    ]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("interrupted at step ") and lines[0].endswith("--resume"), stderr


def test_launched_ranks_are_checked_once_before_the_launch(tmp_path, capsys, monkeypatch):
    code, _, err = run_in_process(
        "run.py", ["--nproc-per-node", "3", "--output-dir", str(tmp_path)], capsys, monkeypatch
    )
    assert code == 2 and err.count("error:") == 1
    assert "data-parallel size = 8 × 3 (world size 3" in err
    code, _, err = run_in_process("run.py", ["--nproc-per-node", "0"], capsys, monkeypatch)
    assert code == 2 and "--nproc-per-node must be ≥ 1" in err


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.xdist_group("multi_process")
def test_workers_stop_when_their_torchrun_agent_is_killed(tmp_path):
    """kill -9 of the torchrun agent once left its workers training, orphaned."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train" / "run.py"),
        "--max-steps",
        "200",
        *FAST,
        "--save-every",
        "1",
        "--output-dir",
        str(out),
    ]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step_1" / "COMPLETE").exists():
            assert agent.poll() is None and time.time() < deadline, "ended before its checkpoint"
            time.sleep(0.05)
        workers = [
            w for w in _children(agent.pid) if b"run.py" in Path(f"/proc/{w}/cmdline").read_bytes()
        ]
        assert len(workers) == 2, workers
        agent.kill()
        agent.wait(timeout=60)
        # With the request to the kernel they get SIGTERM at once and stop at the next Python
        # instruction; without it they went on until a collective or the agent's store failed
        # them (about 40 s in this test, minutes or never in a long run).
        killed = time.time()
        while any(_alive(w) for w in workers) and time.time() < killed + 20:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their agent by 20 s"
    finally:
        for w in _children(agent.pid) + (workers if "workers" in locals() else []):
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


def test_absurd_beta_writes_strict_json_and_stops(tmp_path):
    out = tmp_path / "out"
    proc = run(["--beta", "1e30", "--max-steps", "8", *FAST, "--output-dir", str(out)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0], proc.stderr
    assert "--beta 1e+30" in errors[0]
    rows = _strict_rows(out / "metrics.jsonl")
    assert 3 <= len(rows) < 8  # stopped after three non-finite steps in a row
    assert all(r["grad_norm"] is None or r["loss"] is None for r in rows[-3:])
    assert "written as null in metrics.jsonl" in proc.stderr


@pytest.mark.parametrize(
    "launched, status, teardown",
    [(True, 0, False), (True, 130, False), (True, 2, True), (False, 0, True)],
)
def test_a_launched_rank_that_ran_ends_without_the_interpreters_teardown(
    launched, status, teardown
):
    """exit_process: a launched rank's status passes through, its printed lines are flushed,
    and the interpreter's teardown (atexit, finalizers: where gloo's threads can abort) is
    skipped, except after a usage error, whose ordinary exit lets rank 0 print first."""
    code = (
        "import atexit, sys\n"
        "from train.launch import exit_process\n"
        "atexit.register(lambda: print('teardown', file=sys.stderr))\n"
        "print('done', end='')\n"
        f"exit_process({status})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCHELASTIC_RUN_ID", None)
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == status
    assert proc.stdout == "done"
    assert ("teardown" in proc.stderr) == teardown
