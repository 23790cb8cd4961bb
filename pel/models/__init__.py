"""Segmentation models."""

from pel.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
