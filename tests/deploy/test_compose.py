"""docker-compose.yml, checked without Docker: the Compose Specification schema, then the wiring between services."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from api.cli import DEFAULT_URL
from api.settings import Settings
from tests.conftest import REPO_ROOT

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
# ${VAR}, ${VAR:-default}, ${VAR-default}; "$$" is a literal "$" (Compose interpolation).
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's interpolation with an empty environment (every default taken), over the whole document."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML resolves anchors and "<<" merge keys as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return interpolate(compose)["services"]


def dockerfile_stages() -> set[str]:
    text = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE))


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(compose), key=lambda error: list(error.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    """The check above can fail: a misspelt key and a wrong depends_on condition are caught."""
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    messages = [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(broken)]
    assert any("helthcheck" in message for message in messages)
    assert any("service_ready" in message for message in messages)


def test_every_dependency_exists_and_can_satisfy_its_condition(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on undefined service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no healthcheck"
            if condition == "service_completed_successfully":
                # A one-shot service: restarting it would never "complete".
                assert services[target].get("restart") == "no", f"{target} must be one-shot (restart: 'no')"


def test_the_stack_is_all_there_and_starts_in_order(services: dict[str, Any]) -> None:
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "api", "worker", "worker-cpu"} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "worker-cpu"):
        needs = {target: spec["condition"] for target, spec in services[name]["depends_on"].items()}
        assert needs["migrate"] == "service_completed_successfully"
        assert needs["minio-bucket"] == "service_completed_successfully"
        assert needs["redis"] == "service_healthy"
    for name in ("postgres", "redis", "minio", "api"):
        assert "healthcheck" in services[name], name


def test_named_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            else:
                source, kind = volume["source"], volume["type"]
            if kind == "volume":
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
            elif kind == "bind":
                assert (REPO_ROOT / source).exists(), f"{name} binds {source}, which does not exist (defaults)"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    assert {"pgdata", "redisdata", "miniodata"} <= declared  # the stateful services keep their data


def test_api_is_published_where_the_client_looks(services: dict[str, Any]) -> None:
    client = urlparse(DEFAULT_URL)  # the README's commands use this default
    published = [str(port) for port in services["api"]["ports"]]
    assert f"{client.hostname}:{client.port}:8000" in published
    assert services["api"]["command"] == ["api"]  # entrypoint.sh api listens on 8000 by default


def test_images_and_build_targets(services: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    targets = {}
    for name, service in services.items():
        if "build" in service:
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            assert service["build"]["target"] in stages, f"{name}: no stage {service['build']['target']}"
            targets[name] = service["build"]["target"]
        else:
            image = service["image"]
            tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
            assert tag and tag != "latest", f"{name}: image {image} is not pinned to a version"
    # Migrations and the API come from the torch-free API image; each worker from its own.
    assert targets == {
        "migrate": "api",
        "api": "api",
        "worker": "worker",
        "worker-cpu": "worker-cpu",
    }


def test_gpu_worker_reserves_gpus_and_cpu_worker_is_a_profile(services: dict[str, Any]) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert (gpu["profiles"], cpu["profiles"]) == (["gpu"], ["cpu"])
    assert "deploy" not in cpu
    for worker in (gpu, cpu):
        assert worker["command"] == ["worker"]
        assert worker["shm_size"]  # DDP needs more than Docker's 64 MB /dev/shm


def test_environment_names_real_settings_and_one_bucket(services: dict[str, Any]) -> None:
    fields = {f"PELTUNE_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker", "worker-cpu"):
        environment = services[name]["environment"]
        unknown = {key for key in environment if key.startswith("PELTUNE_")} - fields
        assert not unknown, f"{name}: no such setting {unknown}"
        # The settings the environment gives are accepted by Settings itself.
        values = {key.removeprefix("PELTUNE_").lower(): value for key, value in environment.items() if key in fields}
        settings = Settings(**values)
        assert settings.auto_migrate is False  # the migrate service does it, once
        assert urlparse(settings.storage_url).netloc == "peltune"
    assert "local/peltune" in services["minio-bucket"]["command"][0]
    environment = services["api"]["environment"]
    assert urlparse(environment["PELTUNE_S3_ENDPOINT_URL"]).hostname == "minio"
    # Presigned links are signed for MinIO as the host reaches it: its published port on the loopback.
    public = urlparse(environment["PELTUNE_S3_PUBLIC_ENDPOINT_URL"])
    assert f"{public.hostname}:{public.port}:9000" in services["minio"]["ports"]
