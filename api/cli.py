"""The `pel-tune` command line: the demo, the service processes, and a REST client for everyday use.

pel-tune demo                                   # the whole service on the embedded default, real data
pel-tune migrate | api | worker                 # run one part of the service (settings from PELTUNE_* env)
pel-tune datasets add --uri file:///data/bbbc039
pel-tune checkpoints add --file model.pt
pel-tune checkpoints add --file weights.safetensors --architecture '{"name": "unet", "width": 16, "depth": 3}'
pel-tune jobs submit --kind finetune --dataset ID --checkpoint ID --config '{"loss": "pel_ce", "steps": 200}'
pel-tune jobs show ID | jobs list | jobs metrics ID | jobs wait ID | jobs download ID model.pt
pel-tune jobs cancel ID | jobs events ID
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("PELTUNE_URL", "http://127.0.0.1:8000")


def api_command(host: str, port: int | str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port)]


def worker_command() -> list[str]:
    # solo pool: the task itself only supervises a torchrun subprocess, so one job per worker process is the
    # design; scale out with more worker processes (one per GPU node).
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def migrate_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "alembic",
        "-c",
        str(Path(__file__).resolve().parents[1] / "alembic.ini"),
        "upgrade",
        "head",
    ]


def _exec(argv: list[str]) -> int:
    os.execvp(argv[0], argv)


class UsageError(ValueError):
    """A command-line argument the client cannot use; printed in one line."""


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f'--config is not valid JSON ({exc}); example: \'{{"steps": 200, "lr": 1e-4}}\'') from None
    if not isinstance(value, dict):
        raise UsageError(f"--config must be a JSON object, got {type(value).__name__}")
    return value


def _client_command(args: argparse.Namespace) -> int:
    from api.client import PelTuneClient

    with PelTuneClient(args.url, api_key=args.api_key) as client:
        match args.group, args.action:
            case ("datasets" | "checkpoints") as group, "add":
                if group == "datasets":
                    result = client.register_dataset(uri=args.uri, file=args.file, name=args.name)
                else:
                    result = client.register_checkpoint(
                        uri=args.uri, file=args.file, name=args.name, architecture=args.architecture
                    )
            case "datasets", "list":
                result = client.datasets()
            case "checkpoints", "list":
                result = client.checkpoints()
            case "jobs", "submit":
                result = client.submit_job(
                    kind=args.kind,
                    dataset_id=args.dataset,
                    checkpoint_id=args.checkpoint,
                    config=_json_object(args.config),
                    nprocs=args.nprocs,
                    idempotency_key=args.idempotency_key,
                )
            case "jobs", "cancel":
                result = client.cancel_job(args.id)
            case "jobs", "events":
                result = client.events(args.id)
            case "jobs", "list":
                result = client.jobs()
            case "jobs", "show":
                result = client.job(args.id)
            case "jobs", "metrics":
                result = client.metrics(args.id)
            case "jobs", "wait":
                result = client.wait(args.id, timeout=args.timeout)
            case "jobs", "download":
                result = {"path": str(client.download_checkpoint(args.id, Path(args.dest)))}
            case _:
                raise AssertionError(f"unhandled command {args.group} {args.action}")
    print(json.dumps(result, indent=2))
    status = result.get("status") if isinstance(result, dict) else None
    if args.action == "wait":
        return 0 if status == "succeeded" else 1  # scripts wait for a result: cancelled is not one
    return 1 if status == "failed" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pel-tune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="group", required=True)
    demo = sub.add_parser("demo", help="run a real fine-tuning job through the whole service on the embedded default")
    demo.add_argument("--control", action="store_true", help="also run a Dice+CE fine-tune with the same settings")
    sub.add_parser("migrate", help="alembic upgrade head on PELTUNE_DATABASE_URL")
    api = sub.add_parser("api", help="serve the REST API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", default="8000")
    sub.add_parser("worker", help="run a Celery worker that executes jobs")

    for group in ("datasets", "checkpoints", "jobs"):
        group_parser = sub.add_parser(group, help=f"{group} on the API at --url")
        group_parser.add_argument("--url", default=DEFAULT_URL, help="API base URL (env PELTUNE_URL)")
        group_parser.add_argument(
            "--api-key",
            help="your API key (default: env PELTUNE_API_KEY, else the embedded API's key in "
            "$PELTUNE_HOME/local-keys.json)",
        )
        actions = group_parser.add_subparsers(dest="action", required=True)
        actions.add_parser("list")
        if group != "jobs":
            add = actions.add_parser("add", help="register by --uri, or upload --file")
            source = add.add_mutually_exclusive_group(required=True)
            source.add_argument("--uri")
            source.add_argument("--file", type=Path)
            add.add_argument("--name")
            if group == "checkpoints":
                add.add_argument(
                    "--architecture",
                    metavar="JSON",
                    help='for a state_dict/safetensors file: {"name": "unet", ...} or {"name": "smp", "arch": ..., '
                    '"encoder": ...}',
                )
            continue
        submit = actions.add_parser("submit")
        submit.add_argument("--kind", choices=["baseline", "finetune"], default="finetune")
        submit.add_argument("--dataset", required=True)
        submit.add_argument("--checkpoint")
        submit.add_argument("--config", default="{}", help="training settings as JSON (see docs/design.md)")
        submit.add_argument("--nprocs", type=int, default=1)
        submit.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
        for action in ("show", "metrics", "wait", "download", "cancel", "events"):
            action_parser = actions.add_parser(action)
            action_parser.add_argument("id")
            if action == "wait":
                action_parser.add_argument("--timeout", type=float, default=3600)
            if action == "download":
                action_parser.add_argument("dest")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    match args.group:
        case "demo":
            from api.demo import main as demo_main

            return demo_main(control=args.control)
        case "migrate":
            return _exec(migrate_command())
        case "api":
            return _exec(api_command(args.host, args.port))
        case "worker":
            return _exec(worker_command())
    import httpx

    from api.client import ApiError

    try:
        return _client_command(args)
    except (ApiError, UsageError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"no such file: {exc.filename}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `pel-tune jobs show ID | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0
    except httpx.TransportError as exc:
        print(f"cannot reach the PEL Tune API at {args.url}: {exc} (set --url or PELTUNE_URL)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
