"""The API process never imports torch: its image ships without it (docs/deploy.md)."""

from __future__ import annotations

import subprocess
import sys


def test_api_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import api.main, api.cli, api.client, api.demo\n"
        "from api.main import app\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(','.join(loaded[:5]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"the API imported torch: {result.stdout.strip()}"


def test_torch_free_import_still_reaches_the_full_api() -> None:
    """The lazy package exports still resolve (to torch-backed objects) when asked for."""
    import pel

    assert pel.TrainConfig.__module__ == "pel.config"
    assert callable(pel.pel_loss)
