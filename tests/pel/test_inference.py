"""Sliding-window prediction: exact reconstruction through identity-like models, padding, mode handling."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from pel.inference import sliding_window_predict


class Replicate(nn.Module):
    """Returns the image's channels as logits (optionally prefixed by a zero logit), so output = f(input) pixelwise.

    Any misplaced window or wrong overlap averaging shows up as a mismatch against the whole-image logits.
    """

    def __init__(self, zero_channel: bool) -> None:
        super().__init__()
        self.zero_channel = zero_channel
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(tuple(x.shape))
        assert not self.training
        if self.zero_channel:
            return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
        return x


def dyadic_image(channels: int, h: int, w: int, seed: int) -> Tensor:
    """Values k/16: sums of up to a few thousand of them and the division back are exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 64, (channels, h, w), generator=gen).float() / 16


@pytest.mark.parametrize(
    ("h", "w", "patch", "overlap", "batch_size"),
    [
        (37, 53, 16, 0.25, 8),
        (37, 53, 16, 0.5, 3),
        (31, 29, 8, 0.75, 64),
        (16, 16, 16, 0.25, 1),
        (65, 17, 32, 0.0, 2),
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_identity_model_reconstructs_exactly(
    h: int, w: int, patch: int, overlap: float, batch_size: int, channels: int
) -> None:
    image = dyadic_image(channels, h, w, seed=h * w)
    model = Replicate(zero_channel=channels == 2)
    probs = sliding_window_predict(model, image, patch=patch, overlap=overlap, batch_size=batch_size)

    if channels == 1:
        expected = torch.sigmoid(image)
    else:
        expected = torch.softmax(torch.cat([torch.zeros_like(image[:1]), image]), dim=0)
    assert probs.shape == expected.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-7)
    assert all(c[0] <= batch_size and c[-2:] == (patch, patch) for c in model.calls)


def test_random_float_image_reconstructs_closely() -> None:
    image = torch.randn(3, 45, 50, generator=torch.Generator().manual_seed(0))
    probs = sliding_window_predict(Replicate(zero_channel=False), image, patch=20, overlap=0.6)
    torch.testing.assert_close(probs, torch.softmax(image, dim=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("h", "w"), [(5, 7), (3, 40), (40, 3)])
def test_image_smaller_than_patch_is_padded_and_cropped(h: int, w: int) -> None:
    image = dyadic_image(1, h, w, seed=1)
    model = Replicate(zero_channel=False)
    probs = sliding_window_predict(model, image, patch=16)
    assert probs.shape == (1, h, w)
    torch.testing.assert_close(probs, torch.sigmoid(image), rtol=0, atol=1e-7)
    assert all(c[-2:] == (16, 16) for c in model.calls)


class PositionProbe(nn.Module):
    """Logit = number of windows the model saw so far: overlapping windows must be averaged, not summed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: Tensor) -> Tensor:
        out = torch.stack([torch.full_like(x[0, :1], float(self.seen + i)) for i in range(x.shape[0])])
        self.seen += x.shape[0]
        return out


def test_overlapping_logits_are_averaged() -> None:
    # Width 12, patch 8, stride 4 -> windows at x = 0 and 4 (values 0 and 1); columns 4..7 average to 0.5.
    probs = sliding_window_predict(PositionProbe(), torch.zeros(1, 8, 12), patch=8, overlap=0.5)
    logits = torch.logit(probs[0], eps=0)
    torch.testing.assert_close(logits[:, :4], torch.zeros(8, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 4:8], torch.full((8, 4), 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 8:], torch.ones(8, 4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored_and_no_grad(training: bool) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
    model.train(training)
    stats_before = model[1].running_mean.clone()
    probs = sliding_window_predict(model, torch.randn(1, 20, 20), patch=8)
    assert model.training is training
    assert torch.equal(model[1].running_mean, stats_before)
    assert not probs.requires_grad
    torch.testing.assert_close(probs.sum(0), torch.ones(20, 20))


@pytest.mark.parametrize(
    "kwargs", [{"patch": 0}, {"patch": 8, "overlap": 1.0}, {"patch": 8, "overlap": -0.1}, {"patch": 8, "batch_size": 0}]
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sliding_window_predict(Replicate(zero_channel=False), torch.zeros(1, 10, 10), **kwargs)


def test_rejects_batched_image() -> None:
    with pytest.raises(ValueError, match="C, H, W"):
        sliding_window_predict(Replicate(zero_channel=False), torch.zeros(1, 1, 10, 10), patch=8)
