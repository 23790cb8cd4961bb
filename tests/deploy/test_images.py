"""deploy/Dockerfile and .dockerignore, checked by parsing (no Docker engine on the CI machines)."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
RUNTIME_STAGES = {"api": "api", "worker-cpu": "worker", "worker": "worker"}  # stage -> its default command
PINNED = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) from deploy/Dockerfile (line continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        elif current is None:
            assert keyword == "ARG", f"only ARGs before the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile()


def base_image(base: str, args: dict[str, str]) -> str:
    match = re.fullmatch(r"\$\{(\w+)\}", base)
    return args[match.group(1)] if match else base


def root_stage(name: str, stages: dict[str, Stage]) -> str:
    """The stage a stage is ultimately built FROM (following stage-on-stage FROMs)."""
    while stages[name].base in stages:
        name = stages[name].base
    return name


def test_every_base_image_is_pinned_by_tag_and_digest(dockerfile) -> None:
    args, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue
        image = base_image(stage.base, args)
        assert PINNED.match(image), f"stage {stage.name}: base {image} is not pinned (name:tag@sha256:digest)"


def test_runtime_images_run_the_entrypoint_as_a_non_root_user(dockerfile) -> None:
    _, stages = dockerfile
    for name, command in RUNTIME_STAGES.items():
        stage = stages[name]
        user = stage.all("USER")[-1]
        assert user.split(":")[0] not in ("root", "0"), f"{name} runs as {user}"
        assert stage.all("ENTRYPOINT")[-1] == '["/app/deploy/entrypoint.sh"]'
        assert stage.all("CMD")[-1] == f'["{command}"]'
        # USER comes after everything that needs root (package installs, useradd).
        keywords = [kw for kw, _ in stage.instructions]
        assert "RUN" not in keywords[keywords.index("USER") :], f"{name}: RUN after USER"


def test_api_image_has_no_torch_and_no_cuda(dockerfile) -> None:
    args, stages = dockerfile
    api = stages["api"]
    assert "cuda" not in base_image(api.base, args).lower()
    sources = {copy.split("--from=")[1].split()[0] for copy in api.all("COPY") if "--from=" in copy}
    assert sources == {"api-deps"}
    install = " ".join(stages["api-deps"].all("RUN"))
    assert "pip install ." in install and "[worker]" not in install and "torch" not in install.split("import torch")[0]
    assert 'import torch" 2>/dev/null; then' in install  # the build fails if torch got in anyway
    assert not any(copy.split()[0] == "worker" for copy in api.all("COPY")), "the API image needs no worker code"
    # ... which holds because the project's base dependencies carry no torch (the `worker` extra does).
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ;]", requirement)[0].lower() for requirement in project["dependencies"]]
    assert "torch" not in names and not any(name.startswith("nvidia") for name in names)
    assert any(requirement.startswith("torch==") for requirement in project["optional-dependencies"]["worker"])
    assert "pel-tune[worker]" in project["optional-dependencies"]["dev"]  # `make test` installs everything


def test_gpu_worker_is_on_a_cuda_base_and_the_cpu_worker_is_not(dockerfile) -> None:
    args, stages = dockerfile
    assert base_image(stages["worker"].base, args).startswith("nvidia/cuda:")
    assert "cuda" not in base_image(stages["worker-cpu"].base, args)
    assert "download.pytorch.org/whl/cpu" in args.get("TORCH_INDEX_CPU", "") or any(
        "download.pytorch.org/whl/cpu" in arg for arg in stages["worker-cpu-deps"].all("ARG")
    )
    assert any("download.pytorch.org/whl/cu" in arg for arg in stages["worker-deps"].all("ARG"))


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches from the context root ("**/" at any depth), and a matched
    folder excludes everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for prefix in prefixes:
            if pattern.startswith("**/"):
                if fnmatch.fnmatch(prefix.rsplit("/", 1)[-1], pattern[3:]):
                    return True
            elif fnmatch.fnmatch(prefix, pattern):
                return True
    return False


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile) -> None:
    _, stages = dockerfile
    patterns = dockerignore_patterns()
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue
            *sources, _dest = [part for part in copy.split() if not part.startswith("--")]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{stage.name}: COPY {source}: no such path"
                assert not ignored(source, patterns), f"{stage.name}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".peltune", "tests", ".env", "deploy/k8s", "api/__pycache__"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("api", "pel", "worker", "migrations", "alembic.ini", "pyproject.toml", "README.md"):
        assert not ignored(path, patterns), f"{path} is needed by the build"


def test_entrypoint_is_an_executable_posix_shell_script() -> None:
    script = REPO_ROOT / "deploy" / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
