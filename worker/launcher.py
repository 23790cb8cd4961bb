"""Start a training run as a subprocess in its own process group, and stop the whole group.

1 process::

    python -m worker.train_entry --config cfg.json --dataset DIR --out DIR [--init model.pt]

N ranks on this host (gloo on CPU, NCCL on GPUs; ``--standalone`` gives every job its own free rendezvous port)::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N --max-restarts 0 \\
        -m worker.train_entry --config cfg.json --dataset DIR --out DIR [--init model.pt]

Why a process group: torchrun's ranks are its children, so killing only torchrun would leave them running
(holding GPU memory). ``start_new_session=True`` makes the launched process the leader of a new group that
contains every rank; ``terminate()`` sends SIGTERM to the group, waits, then SIGKILLs it. On Linux the child
also gets SIGTERM if the supervising worker dies (``PR_SET_PDEATHSIG``), so a killed worker leaves no training
running behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "worker.train_entry"
_PR_SET_PDEATHSIG = 1


def build_command(
    *,
    nprocs: int,
    config: Path,
    dataset: Path,
    out: Path,
    init: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs one training job on ``nprocs`` processes."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    entry = ["-m", ENTRY_MODULE, "--config", str(config), "--dataset", str(dataset), "--out", str(out)]
    if init is not None:
        entry += ["--init", str(init)]
    if nprocs == 1:
        return [python, *entry]
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nprocs),
        # A failed rank fails the job: restarting would replay steps already written to metrics.jsonl.
        "--max-restarts",
        "0",
        *entry,
    ]


def child_environment() -> dict[str, str]:
    """The parent's environment, plus the repository on PYTHONPATH (the entry must import wherever cwd is)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"  # the log file follows the ranks as they print
    return env


def _parent_death_signal(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child must not load libraries
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class TrainingProcess:
    """One launched training run: the leader of its own process group, output appended to ``log_path``.

    Use as a context manager: leaving the block (normally or by an exception) stops the whole group if it is
    still running. The parent-death signal fires when the *thread* that started the process exits, so start it
    from a thread that lives as long as the run (the Celery task's thread does).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else child_environment()
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> TrainingProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # own session => own process group, pgid == pid
                preexec_fn=_parent_death_signal(os.getpid()),
            )
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self._popen().wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the whole group, give it ``grace_s`` to exit, then SIGKILL whatever is left of it."""
        if self.popen is None:
            return None
        pgid = self.popen.pid
        if not _signal_group(pgid, signal.SIGTERM):
            return self.popen.wait()
        deadline = time.monotonic() + grace_s
        # Wait for the leader and for its ranks: the group outlives the leader if a rank ignores SIGTERM.
        while time.monotonic() < deadline:
            self.popen.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        return self.popen.wait()

    def _popen(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError("the training process was not started")
        return self.popen

    def __enter__(self) -> TrainingProcess:
        return self.start() if self.popen is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Even after a clean exit of the leader a rank may linger; stopping an empty group is a no-op.
        self.terminate(grace_s=10.0 if exc_type is None else 5.0)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send sig to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pgid was recycled by someone else's group; ours is gone.
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether any member of the group still runs. Zombies do not count: a rank orphaned by its torchrun
    is reparented to init, which may reap it late (or, in some containers, never)."""
    proc = Path("/proc")
    if not proc.is_dir():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 0)
            return True
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
