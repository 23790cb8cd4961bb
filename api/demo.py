"""`pel-tune demo`: one real PEL fine-tuning job through the whole service, on the embedded default.

It starts the API (uvicorn) and a Celery worker as real processes on SQLite, a local object store and the
kombu filesystem broker, registers BBBC039 in place, trains a Dice+CE baseline through a job unless one
with the same recipe already succeeded (cached in PELTUNE_HOME), submits the PEL+CE patch fine-tune on
2 DDP ranks through the REST API, follows it with a progress bar, prints whole-image test Dice/IoU before
and after, downloads the fine-tuned checkpoint, and stops every process it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from api.cli import api_command, migrate_command, worker_command
from api.client import ApiError, PelTuneClient, local_api_key

REPO_ROOT = Path(__file__).resolve().parents[1]

# The recipe: whole-image-style training from scratch first (Dice+CE on patches), then the PEL phase. Sized so a
# 2-core CPU machine finishes both plus evaluation of the 50 test images well inside 10 minutes.
BASELINE_CONFIG: dict = {
    "loss": "dice_ce",
    "target": "binary",
    "patch_size": 128,
    "batch_size": 8,
    "fg_fraction": 0.5,
    "steps": 200,
    "lr": 1e-3,
    "val_every": 100,
    "val_images": 10,
    "seed": 0,
    "model": {"in_channels": 1, "out_channels": 2, "width": 16, "depth": 3},
}
# PEL's gradient is 10-100x that of cross entropy (pel-spec.md), hence the lower learning rate.
FINETUNE_CONFIG: dict = {
    "loss": "pel_ce",
    "alpha": 20.0,
    "n": 3.0,
    "region_weight": 1.0,
    "ce_weight": 1.0,
    "target": "binary",
    "patch_size": 128,
    "batch_size": 4,
    "fg_fraction": 0.5,
    "steps": 100,
    "lr": 1e-4,
    "val_every": 50,
    "val_images": 10,
    "seed": 0,
}
FINETUNE_PROCESSES = 2
JOB_TIMEOUT_S = 900.0


class DemoError(RuntimeError):
    """A failure the demo reports in one line and exits non-zero for."""


def find_data() -> Path:
    """BBBC039 from PELTUNE_DATA (the folder holding bbbc039/, or bbbc039 itself), else ../shared/data."""
    candidates = []
    if env := os.environ.get("PELTUNE_DATA"):
        candidates += [Path(env) / "bbbc039", Path(env)]
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "bbbc039")
    for candidate in candidates:
        if (candidate / "images").is_dir() and (candidate / "masks").is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DemoError(
        f"BBBC039 not found (looked in {tried}). Set PELTUNE_DATA to the folder holding bbbc039/ "
        "(images/, masks/, splits.json); BBBC039 is public: https://bbbc.broadinstitute.org/BBBC039"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Services:
    """The API and worker processes, each in its own session so the whole group can be stopped."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PELTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.port = free_port()
        self.processes: list[tuple[str, subprocess.Popen]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def migrate(self) -> None:
        result = subprocess.run(
            migrate_command(),
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise DemoError(f"database migration failed:\n{result.stderr[-2000:]}")

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes.append((name, proc))

    def start_all(self) -> None:
        self.start("api", [*api_command("127.0.0.1", self.port), "--log-level", "warning"])
        self.start("worker", worker_command())
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise DemoError(f"the API did not answer within {timeout:.0f} s; see {self.logs / 'api.log'}")

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None:
                raise DemoError(f"the {name} process exited with code {proc.returncode}; see {self.logs / name}.log")

    def stop(self) -> None:
        for _, proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # The worker's torchrun children run in their own process groups; a clean worker shutdown stops them.
        self.processes.clear()


@contextlib.contextmanager
def running_services(home: Path) -> Iterator[Services]:
    services = Services(home)
    services.migrate()
    try:
        services.start_all()
        yield services
    finally:
        services.stop()


class ProgressBar:
    """One status line, redrawn in place on a terminal and printed every few seconds otherwise."""

    def __init__(self, client: PelTuneClient, label: str, services: Services) -> None:
        self.client = client
        self.label = label
        self.services = services
        self.tty = sys.stdout.isatty()
        self.last_print = 0.0
        self.val_dice: float | None = None

    def __call__(self, job: dict) -> None:
        self.services.check_alive()
        points = self.client.metrics(job["id"]) if job["status"] != "queued" else []
        last = points[-1] if points else {}
        for point in points:
            if point.get("val_dice") is not None:
                self.val_dice = point["val_dice"]
        fraction = float(job.get("progress") or 0.0)
        width = 30
        bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
        parts = [f"{self.label:<9} [{bar}] {fraction:4.0%}", f"{job['status']:<9}"]
        if last:
            parts.append(f"step {last['step']}/{last.get('total_steps', '?')}")
            parts.append(f"loss {last['loss']:+.3f}")
            if "pel_norm" in last:
                parts.append(f"PEL(norm) {last['pel_norm']:.3f}")
            if "dice" in last:
                parts.append(f"Dice-loss {last['dice']:.3f}")
            parts.append(f"CE {last['ce']:.3f}")
        if self.val_dice is not None:
            parts.append(f"val Dice {self.val_dice:.4f}")
        if job["status"] == "running" and not last:
            starting = "scoring the starting model on the test images" if job["kind"] == "finetune" else "loading data"
            parts.append(f"({starting})")
        elif job["status"] == "running" and last.get("step") == last.get("total_steps"):
            parts.append("(scoring the best model on the test images)")
        line = "  ".join(parts)
        final = job["status"] in ("succeeded", "failed", "cancelled")
        if self.tty:
            print("\r" + line.ljust(150), end="\n" if final else "", flush=True)
        elif final or time.monotonic() - self.last_print > 10:
            print(line, flush=True)
            self.last_print = time.monotonic()


def run_job(client: PelTuneClient, services: Services, label: str, **submit: object) -> dict:
    job = client.submit_job(**submit)  # type: ignore[arg-type]
    print(f"{label}: job {job['id']} queued ({job['nprocs']} process(es))")
    job = client.wait(job["id"], timeout=JOB_TIMEOUT_S, on_update=ProgressBar(client, label, services))
    if job["status"] != "succeeded":
        raise DemoError(f"{label} job {job['id']} {job['status']}: {job.get('error') or 'no reason recorded'}")
    return job


def _contains(stored: dict, wanted: dict) -> bool:
    """True when every key of wanted has the same value in stored (the API stores configs with defaults filled)."""
    return all(
        _contains(stored.get(key) or {}, value) if isinstance(value, dict) else stored.get(key) == value
        for key, value in wanted.items()
    )


def cached_baseline(client: PelTuneClient, dataset_id: str) -> dict | None:
    """A succeeded baseline job on this dataset trained with this recipe, if any."""
    for job in client.jobs():
        same_recipe = _contains(job["config"], BASELINE_CONFIG)
        if (
            job["kind"] == "baseline"
            and job["status"] == "succeeded"
            and job["dataset_id"] == dataset_id
            and same_recipe
        ):
            return job
    return None


def ensure_dataset(client: PelTuneClient, data: Path) -> dict:
    uri = data.as_uri()
    for dataset in client.datasets():
        if dataset["uri"] == uri:
            return dataset
    return client.register_dataset(uri=uri, name="bbbc039")


# (row title, how to read it from a summary's metrics); class index -1 is the foreground. Object rows compare
# connected components of the predicted foreground with the instance masks.
TABLE_ROWS: list[tuple[str, Callable[[dict], float]]] = [
    ("Dice, foreground (pooled)", lambda m: m["dice"][-1]),
    ("IoU, foreground (pooled)", lambda m: m["iou"][-1]),
    ("Dice, foreground (mean per image)", lambda m: m["mean_image_dice"][-1]),
    ("IoU, foreground (mean per image)", lambda m: m["mean_image_iou"][-1]),
    ("nuclei F1 at IoU 0.5", lambda m: m["objects"]["f1"]),
    ("nuclei panoptic quality", lambda m: m["objects"]["pq"]),
    ("nuclei AJI", lambda m: m["objects"]["aji"]),
]


def fmt_table(before: dict, arms: dict[str, dict]) -> str:
    """A column for the starting model and one per fine-tuned arm, with the change in points."""
    lines = [f"{'whole-image test metric':<36}{'before':>10}" + "".join(f"{name:>22}" for name in arms)]
    for title, read in TABLE_ROWS:
        old = read(before)
        cells = "".join(f"{read(arm):>10.4f} ({100 * (read(arm) - old):+.2f} pts)" for arm in arms.values())
        lines.append(f"{title:<36}{old:>10.4f}{cells}")
    return "\n".join(lines)


def run_demo(home: Path, *, control: bool = False) -> None:
    data = find_data()
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"PEL Tune demo: data {data}, state in {home}")
    with (
        running_services(home) as services,
        # The embedded API generated this key on its first start (development mode; api/auth.py).
        PelTuneClient(services.url, api_key=local_api_key(home)) as client,
    ):
        print(f"API at {services.url} (OpenAPI docs at {services.url}/docs); logs in {services.logs}")
        dataset = ensure_dataset(client, data)
        print(f"dataset {dataset['id']}: {dataset['num_images']} images, splits {dataset['splits']}")

        baseline = cached_baseline(client, dataset["id"])
        if baseline is None:
            baseline = run_job(
                client, services, "baseline", kind="baseline", dataset_id=dataset["id"], config=BASELINE_CONFIG
            )
        else:
            print(f"baseline: reusing job {baseline['id']} (same recipe, already trained)")

        arms = {"PEL+CE": FINETUNE_CONFIG}
        if control:
            # Same steps, patches, learning rate and seed; only the region term differs.
            arms["Dice+CE (control)"] = {**FINETUNE_CONFIG, "loss": "dice_ce"}
        jobs = {
            name: run_job(
                client,
                services,
                name.split()[0],
                kind="finetune",
                dataset_id=dataset["id"],
                checkpoint_id=baseline["output_checkpoint_id"],
                config=config,
                nprocs=FINETUNE_PROCESSES,
            )
            for name, config in arms.items()
        }
        finetune = jobs["PEL+CE"]
        checkpoint = client.download_checkpoint(finetune["id"], home / "downloads" / f"{finetune['id']}.pt")

    summary = finetune["summary"]
    print()
    print(
        f"Whole-image Dice/IoU on the {summary['test_after']['num_images']} BBBC039 test images "
        f"(stitched sliding-window prediction), {FINETUNE_CONFIG['steps']} fine-tuning steps:"
    )
    print(fmt_table(summary["test_before"], {name: job["summary"]["test_after"] for name, job in jobs.items()}))
    print()
    if not control:
        print("Is the change PEL's doing? `pel-tune demo --control` runs a Dice+CE fine-tune with the same settings")
        print("beside it; on BBBC039 we measured the control gaining more (docs/results.md).")
    print(f"Fine-tuned checkpoint: {checkpoint}")
    print(f"  (also at GET /v1/jobs/{finetune['id']}/checkpoint; best validation Dice at step {summary['best_step']})")
    print(f"Done in {time.monotonic() - started:.0f} s.")


def main(home: Path | None = None, *, control: bool = False) -> int:
    home = (home or Path(os.environ.get("PELTUNE_HOME", REPO_ROOT / ".peltune"))).resolve()
    try:
        run_demo(home, control=control)
    except (DemoError, ApiError, TimeoutError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; services stopped", file=sys.stderr)
        return 130
    return 0
