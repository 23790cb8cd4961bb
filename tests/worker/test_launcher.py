"""The launcher: the training command, and process groups that die whole (TERM, then KILL; with the parent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.factories import make_dataset
from worker.launcher import TrainingProcess, build_command, child_environment
from worker.tasks import failure_reason


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (dead, waiting for a reaper) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise TimeoutError(f"{path} not written")


def wait_dead(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def family_script(pid_file: Path, *, ignore_term: bool = False) -> list[str]:
    """A parent that starts a child (like torchrun and a rank); both sleep; pids written to pid_file."""
    code = textwrap.dedent(
        f"""
        import os, signal, subprocess, sys, time
        if {ignore_term!r}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN) if {ignore_term!r} else None; "
                                  "time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        print("started", flush=True)
        time.sleep(120)
        """
    )
    return [sys.executable, "-c", code]


def test_single_process_command_is_plain_python(tmp_path: Path) -> None:
    argv = build_command(nprocs=1, config=tmp_path / "c.json", dataset=tmp_path / "d", out=tmp_path / "o")
    assert argv == [
        sys.executable,
        "-m",
        "worker.train_entry",
        "--config",
        str(tmp_path / "c.json"),
        "--dataset",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "o"),
    ]


def test_multi_process_command_uses_torchrun_standalone(tmp_path: Path) -> None:
    argv = build_command(nprocs=3, config=Path("c"), dataset=Path("d"), out=Path("o"), init=Path("m.pt"))
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in argv  # a free rendezvous port per job
    assert argv[argv.index("--nproc-per-node") + 1] == "3"
    assert argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[-10:] == ["-m", "worker.train_entry", "--config", "c", "--dataset", "d", "--out", "o", "--init", "m.pt"]
    with pytest.raises(ValueError):
        build_command(nprocs=0, config=Path("c"), dataset=Path("d"), out=Path("o"))


def test_child_environment_can_import_the_entry_from_anywhere(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import worker.train_entry, pel.train"],
        cwd=tmp_path,
        env=child_environment(),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_output_goes_to_the_log_and_exit_codes_come_back(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    with TrainingProcess([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log_path=log) as process:
        assert process.wait(timeout=30) == 3
    assert "hello" in log.read_text()
    assert log.read_text().startswith("$ ")  # the command line heads the log


@pytest.mark.parametrize("ignore_term", [False, True])
def test_terminate_kills_the_whole_group(tmp_path: Path, ignore_term: bool) -> None:
    pid_file = tmp_path / "pids"
    process = TrainingProcess(family_script(pid_file, ignore_term=ignore_term), log_path=tmp_path / "log").start()
    pids = [int(p) for p in wait_for_file(pid_file).split()]
    assert all(pid_alive(p) for p in pids)
    started = time.monotonic()
    process.terminate(grace_s=1.0)
    assert wait_dead(pids), "a member of the group survived"
    # SIGTERM suffices unless it is ignored; then SIGKILL follows the grace period.
    assert (time.monotonic() - started >= 1.0) == ignore_term


def test_leaving_the_block_by_an_exception_kills_the_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(RuntimeError), TrainingProcess(family_script(pid_file), log_path=tmp_path / "log"):
        pids = [int(p) for p in wait_for_file(pid_file).split()]
        raise RuntimeError("supervisor failed")
    assert wait_dead(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_training_dies_with_its_supervisor(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    supervisor_code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from worker.launcher import TrainingProcess
        argv = {family_script(pid_file)!r}
        TrainingProcess(argv, log_path=Path({str(tmp_path / "log")!r})).start()
        time.sleep(120)
        """
    )
    supervisor = subprocess.Popen([sys.executable, "-c", supervisor_code], env=child_environment())
    try:
        pids = [int(p) for p in wait_for_file(pid_file).split()]
        os.kill(supervisor.pid, signal.SIGKILL)  # the worker is killed outright (OOM killer, kill -9)
        supervisor.wait(timeout=10)
        # The leader gets SIGTERM from the kernel; its child is in the same group but is only killed by the leader
        # (as torchrun does for its ranks); here it is orphaned, so check the leader and clean up the child.
        assert wait_dead(pids[:1]), "the training leader outlived its supervisor"
    finally:
        for pid in pids if "pids" in locals() else []:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if supervisor.poll() is None:
            supervisor.kill()


def _rank_pid(local_rank: int, timeout: float = 60.0) -> int:
    """The pid of this machine's training rank with that LOCAL_RANK (read from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                if b"worker.train_entry" not in (entry / "cmdline").read_bytes():
                    continue
                if f"LOCAL_RANK={local_rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    raise TimeoutError(f"no rank with LOCAL_RANK={local_rank}")


def test_a_rank_killed_by_a_signal_is_named_in_the_reason(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "ds", n=6)
    config = tmp_path / "cfg.json"
    endless = {
        "mode": "baseline",
        "loss": "dice_ce",
        "steps": 10**6,
        "val_every": 10**6,
        "patch_size": 32,
        "batch_size": 2,
        "model": {"width": 4, "depth": 1},
    }
    config.write_text(json.dumps(endless))
    out, log = tmp_path / "out", tmp_path / "train.log"
    command = build_command(nprocs=2, config=config, dataset=dataset, out=out)
    with TrainingProcess(command, log_path=log) as process:
        wait_for_file(out / "metrics.jsonl", timeout=90)  # both ranks are training
        os.kill(_rank_pid(1), signal.SIGKILL)
        code = process.wait(timeout=60)
    assert code != 0
    reason = failure_reason(out, log, code)
    assert reason.startswith("rank 1 was killed by SIGKILL (torchrun's first observed failure)"), reason
