"""Segmentation models: the built-in U-Net, models users bring (``pel.models.zoo``) and torch-free intake checks
(``pel.models.intake``, used by the API).

Imports are lazy (PEP 562) so that ``import pel.models.intake`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"UNet": "pel.models.unet", "UNetConfig": "pel.config"}

__all__ = ["UNet", "UNetConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pel.models' has no attribute {name!r}")
