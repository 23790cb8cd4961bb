"""The `pel-tune` command line as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_demo_without_data_fails_naming_where_it_looked(tmp_path):
    # REPO_ROOT is pointed into tmp_path so that the ../shared/data fallback does not exist either.
    env = {
        "PATH": "/usr/bin:/bin",
        "PELTUNE_DATA": str(tmp_path / "nowhere"),
        "PELTUNE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, api.demo as d; d.REPO_ROOT = d.Path(sys.argv[1]); sys.exit(d.main())",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "BBBC039 not found" in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr
    assert "PELTUNE_DATA" in result.stderr


def test_client_command_against_an_unreachable_api_is_an_error_not_a_traceback():
    result = run_cli("jobs", "--url", "http://127.0.0.1:9", "list")
    assert result.returncode == 1
    assert "cannot reach the PEL Tune API at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_demo_and_the_service_parts():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "migrate", "api", "worker", "jobs"):
        assert command in result.stdout


def test_malformed_config_json_is_a_one_line_error():
    result = run_cli("jobs", "--url", "http://127.0.0.1:9", "submit", "--dataset", "d", "--config", "{steps: 5}")
    assert result.returncode == 1
    assert "--config is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_upload_file_is_a_one_line_error_not_a_traceback():
    result = run_cli("checkpoints", "--url", "http://127.0.0.1:9", "add", "--file", "no-such-model.pt")
    assert result.returncode == 1
    assert result.stderr.strip() == "no such file: no-such-model.pt"
