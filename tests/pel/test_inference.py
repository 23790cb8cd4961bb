"""Sliding-window prediction: exact reconstruction through identity-like models, padding, mode handling."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from pel.inference import gaussian_importance_map, sliding_window_predict


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


@pytest.mark.parametrize("shape", [(1, 1, 1, 10, 10), (10, 10)])
def test_rejects_image_that_is_neither_2d_nor_3d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="C, H, W"):
        sliding_window_predict(Replicate(zero_channel=False), torch.zeros(shape), patch=8)


@pytest.mark.parametrize(
    "kwargs",
    [{"patch": (8, 8, 8)}, {"patch": (8, 0)}, {"patch": 8, "blend": "linear"}],
    ids=["3d-patch", "zero", "blend"],
)
def test_rejects_bad_window_or_blend(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sliding_window_predict(Replicate(zero_channel=False), torch.zeros(1, 10, 10), **kwargs)


def dyadic_volume(channels: int, shape: tuple[int, ...], seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 64, (channels, *shape), generator=gen).float() / 16


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "batch_size"),
    [
        ((37, 53), 16, 0.5, 3),
        ((31, 29), (8, 12), 0.75, 64),
        ((5, 7), 16, 0.25, 8),  # smaller than the window on both axes
        ((3, 40), (8, 9), 0.5, 2),  # smaller on one axis
        ((13, 17, 11), 8, 0.5, 4),  # 3D, odd sizes
        ((9, 21, 6), (4, 8, 8), 0.25, 5),  # 3D, anisotropic window, depth smaller than the window
        ((3, 5, 7), 8, 0.5, 1),  # 3D smaller than the window everywhere
    ],
)
def test_identity_model_reconstructs_exactly_2d_3d_both_blends(
    shape: tuple[int, ...], patch: int | tuple[int, ...], overlap: float, batch_size: int, blend: str
) -> None:
    # Random floats, not dyadic ones: the float64 blend must give the input back bit for bit for any weights.
    image = torch.randn(2, *shape, generator=torch.Generator().manual_seed(len(shape) * 100 + shape[0]))
    model = Replicate(zero_channel=False)
    probs = sliding_window_predict(model, image, patch=patch, overlap=overlap, batch_size=batch_size, blend=blend)
    window = (patch,) * len(shape) if isinstance(patch, int) else patch
    assert probs.shape == image.shape and probs.dtype == torch.float32
    assert torch.equal(probs, torch.softmax(image, dim=0))
    assert all(c[0] <= batch_size and c[2:] == window for c in model.calls)


def test_gaussian_importance_map_shape_and_profile() -> None:
    weights = gaussian_importance_map((16, 9))
    assert weights.shape == (16, 9) and weights.dtype == torch.float32
    assert weights.max() == 1.0 and (weights > 0).all()
    # Symmetric about the centre, separable, sigma = size / 8: one sigma from the centre the weight is exp(-1/2).
    torch.testing.assert_close(weights, weights.flip(0).flip(1))
    torch.testing.assert_close(weights, torch.outer(weights[:, 4], weights[7, :] / weights[7, 4]))
    row = gaussian_importance_map((1, 81))[0]
    assert row[40] == 1.0
    assert row[40 + round(81 / 8)].item() == pytest.approx(float(torch.exp(torch.tensor(-0.5 * (10 / (81 / 8)) ** 2))))
    # Far corners of a large window underflow without the clamp; every weight stays positive.
    assert (gaussian_importance_map((8, 200, 200)) > 0).all()


def test_gaussian_blend_weights_windows_by_the_map() -> None:
    # Width 12, window 8, stride 4: windows at x = 0 (logit 0) and x = 4 (logit 1) overlap on columns 4..7, where
    # the blend is w1 / (w0 + w1) with w0 the right half of the map and w1 its left half.
    probs = sliding_window_predict(PositionProbe(), torch.zeros(1, 8, 12), patch=8, overlap=0.5, blend="gaussian")
    logits = torch.logit(probs[0].double(), eps=0)
    row = gaussian_importance_map((8, 8))[0].double()
    expected = row[:4] / (row[4:] + row[:4])
    torch.testing.assert_close(logits[:, 4:8], expected.expand(8, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, :4], torch.zeros(8, 4, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 8:], torch.ones(8, 4, dtype=torch.float64), rtol=0, atol=1e-5)


def test_3d_unet_like_model_runs_on_a_volume() -> None:
    model = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3))
    probs = sliding_window_predict(model, torch.randn(1, 10, 20, 15), patch=(8, 16, 16), blend="gaussian")
    assert probs.shape == (3, 10, 20, 15)
    torch.testing.assert_close(probs.sum(0), torch.ones(10, 20, 15))
