"""deploy/k8s: every kustomization rendered by kustomize (kubectl's built-in), every resource validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), then the wiring checked."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from api.settings import Settings
from tests.conftest import REPO_ROOT
from tests.services import unavailable

K8S = REPO_ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/dev", "overlays/prod", "multinode"]
# The oldest Kubernetes minor still widely run that has everything used here (autoscaling/v2, policy/v1, Indexed
# Jobs with pod hostnames), and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.29.0", latest_version()]
KUSTOMIZE_FILES = {"kustomization.yaml", "cpu-worker.yaml"}  # kustomize inputs that are not whole resources


def entrypoint_commands() -> set[str]:
    """The commands deploy/entrypoint.sh dispatches (its `case` labels: "api)", "worker | migrate)")."""
    labels = re.findall(r"^ {2}([\w |]+)\)$", (REPO_ROOT / "deploy/entrypoint.sh").read_text(), re.MULTILINE)
    return {name.strip() for label in labels for name in label.split("|")}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    if kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(folder)]
    elif kustomize_bin := shutil.which("kustomize"):
        argv = [kustomize_bin, "build", str(folder)]
    else:
        unavailable("kubectl or kustomize (to render deploy/k8s)")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each kustomization's output. prod reads secrets.env, which is kept out of git: rendered from a copy of the
    tree with one written the way a deploy pipeline would (random values, no placeholder left)."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    example = (tree / "overlays/prod/secrets.env.example").read_text()
    (tree / "overlays/prod/secrets.env").write_text(example.replace("CHANGE-ME", secrets.token_urlsafe(32)))
    return {target: kustomize(tree / target) for target in TARGETS}


def environment_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    """What every pod's envFrom gives it: the ConfigMap's data and the Secret's decoded data."""
    secret = find(docs, "Secret", "peltune-secrets")["data"]
    return {
        **find(docs, "ConfigMap", "peltune-config")["data"],
        **{key: base64.b64decode(value).decode() for key, value in secret.items()},
    }


def settings_from(environment: dict[str, str]) -> Settings:
    """Settings as the pods build them from that environment (only PELTUNE_* keys that are real settings)."""
    fields = {f"PELTUNE_{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in environment if key.startswith("PELTUNE_")} - fields
    assert not unknown, f"no such setting: {unknown}"
    return Settings(**{key.removeprefix("PELTUNE_").lower(): v for key, v in environment.items() if key in fields})


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in ("Deployment", "Job")]


def validate(doc: dict[str, Any], where: str) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_resource_is_valid_kubernetes(rendered, target: str) -> None:
    docs = rendered[target]
    assert docs
    for doc in docs:
        validate(doc, target)


def test_every_resource_file_is_valid_on_its_own() -> None:
    """Without a renderer too: each resource file (not kustomize's own files) validates as written."""
    files = [path for path in K8S.rglob("*.yaml") if path.name not in KUSTOMIZE_FILES]
    assert len(files) >= 10
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc, str(path.relative_to(REPO_ROOT)))


def test_the_validator_can_fail() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_base_has_every_component(rendered) -> None:
    docs = rendered["base"]
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert kinds == {
        ("ConfigMap", "peltune-config"),
        ("Secret", "peltune-secrets"),
        ("Deployment", "peltune-api"),
        ("Service", "peltune-api"),
        ("HorizontalPodAutoscaler", "peltune-api"),
        ("PodDisruptionBudget", "peltune-api"),
        ("Deployment", "peltune-worker"),
        ("PodDisruptionBudget", "peltune-worker"),
        ("Job", "peltune-migrate"),
    }


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_overlay_wiring(rendered, target: str) -> None:
    docs = rendered[target]
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    namespace = {doc["metadata"].get("namespace") for doc in docs}
    assert len(namespace) == 1 and None not in namespace, f"{target}: one namespace for everything, got {namespace}"

    environment = environment_of(docs)
    assert not any("CHANGE-ME" in value for value in environment.values()), f"{target} still has placeholder secrets"
    settings = settings_from(environment)  # production settings refuse placeholder secrets: these pass
    assert settings.auto_migrate is False and settings.database_url.startswith("postgresql")
    assert settings.env == ("production" if target.endswith("prod") else "development")

    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        for container in spec["containers"]:
            assert container["args"][0] in entrypoint_commands(), f"{workload['metadata']['name']}: {container['args']}"
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in names, f"{workload['metadata']['name']} refers to missing {kind}"
            assert ":" in container["image"] and not container["image"].endswith(":latest")

    api = find(docs, "Deployment", "peltune-api")
    container = pod_spec(api)["containers"][0]
    assert container["args"] == ["api"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == 8000  # entrypoint.sh api listens on PELTUNE_API_PORT, default 8000
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = find(docs, "Service", "peltune-api")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = find(docs, "HorizontalPodAutoscaler", "peltune-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "peltune-api"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    worker = find(docs, "Deployment", "peltune-worker")
    for pdb_name, deployment in (("peltune-api", api), ("peltune-worker", worker)):
        selector = find(docs, "PodDisruptionBudget", pdb_name)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pod_spec(worker)["containers"][0]["args"] == ["worker"]
    assert find(docs, "Job", "peltune-migrate")["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_placeholders_cannot_reach_production(rendered) -> None:
    """The base Secret and prod's example secrets.env hold CHANGE-ME values only, and production settings refuse
    to start with them (api/settings.py), so a forgotten secret fails loudly rather than running."""
    base = environment_of(rendered["base"])
    example = dict(
        line.split("=", 1)
        for line in (K8S / "overlays/prod/secrets.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    prod_config = find(rendered["overlays/prod"], "ConfigMap", "peltune-config")["data"]
    for environment in (base, {**prod_config, **example}):
        secret_keys = set(find(rendered["base"], "Secret", "peltune-secrets")["data"])
        assert all("CHANGE-ME" in environment[key] for key in secret_keys)
        assert environment["PELTUNE_ENV"] == "production"
        with pytest.raises(ValueError, match="PELTUNE_ADMIN_KEY"):
            settings_from(environment)
    assert set(example) == secret_keys  # the example lists every secret the base declares


def test_prod_workers_get_gpus_and_time_to_snapshot(rendered) -> None:
    worker = find(rendered["overlays/prod"], "Deployment", "peltune-worker")
    spec = pod_spec(worker)
    limits = spec["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert spec["terminationGracePeriodSeconds"] >= 600
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "/dev/shm" in {mount["mountPath"] for mount in spec["containers"][0]["volumeMounts"]}
    assert not spec["containers"][0]["image"].split(":")[0].endswith("-cpu")


def test_dev_worker_is_the_cpu_variant(rendered) -> None:
    spec = pod_spec(find(rendered["overlays/dev"], "Deployment", "peltune-worker"))
    container = spec["containers"][0]
    assert container["image"] == "peltune-worker-cpu:dev"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "tolerations" not in spec


def test_multinode_template_is_a_torchrun_rendezvous_over_an_indexed_job(rendered) -> None:
    docs = rendered["multinode"]
    job = find(docs, "Job", "peltune-train")
    service = find(docs, "Service", "peltune-train")
    spec = job["spec"]
    pod = pod_spec(job)
    container = pod["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    nnodes = int(env["NNODES"]["value"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes >= 2
    # Node rank = the pod's completion index; rank 0's stable DNS name through the headless Service.
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    args = container["args"]
    assert args[:3] == ["python", "-m", "torch.distributed.run"]
    options = dict(arg.removeprefix("--").split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    assert options["master-addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(options["master-port"]) == service["spec"]["ports"][0]["port"]
    assert (options["nnodes"], options["node-rank"], options["nproc-per-node"]) == (
        "$(NNODES)",
        "$(NODE_RANK)",
        "$(NPROC_PER_NODE)",
    )
    assert args[args.index("-m", 3) + 1] == "worker.train_entry"  # the same rank entry point as on one node
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(env["NPROC_PER_NODE"]["value"])
    # It runs on the release's configuration (base names are fixed: no hash suffix).
    base_names = {(doc["kind"], doc["metadata"]["name"]) for doc in rendered["base"]}
    for source in container["envFrom"]:
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source.get("configMapRef") or source["secretRef"]
        assert (kind, ref["name"]) in base_names
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
