"""Finding a job's training processes in /proc, to prove that none is left behind."""

from __future__ import annotations

from pathlib import Path


def training_pids(job_id: str) -> dict[int, str]:
    """Live (non-zombie) processes of this job's training (their command line names its work folder): pid -> RANK
    ("" for torchrun itself)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if job_id not in cmdline or "worker.train_entry" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), "")
        found[int(entry.name)] = "" if "torch.distributed.run" in cmdline else rank
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
