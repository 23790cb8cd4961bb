"""UNet and UNetConfig: shapes for any input size, configuration round trip, validation, learning."""

from __future__ import annotations

import json

import pytest
import torch

from pel.models import UNet, UNetConfig


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (UNetConfig(), (2, 1, 64, 64)),
        (UNetConfig(), (2, 1, 37, 53)),  # not multiples of 2**depth
        (UNetConfig(), (2, 1, 1, 1)),
        (UNetConfig(in_channels=3, out_channels=3, width=4, depth=2), (1, 3, 30, 17)),
        (UNetConfig(width=4, depth=0), (2, 1, 9, 9)),
        (UNetConfig(width=8, depth=4, norm="group"), (1, 1, 45, 71)),
    ],
)
def test_output_shape_matches_input(config: UNetConfig, shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    model = UNet(config)
    out = model(torch.rand(shape))
    assert out.shape == (shape[0], config.out_channels, *shape[2:])
    assert torch.isfinite(out).all()


def test_padding_is_cropped_back_so_the_top_left_agrees_with_a_larger_input() -> None:
    # With replicate padding, the output far from the padded border must not depend on how much was padded.
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2)).eval()
    x = torch.rand(1, 1, 64, 64)
    full = model(x)
    cropped = model(x[..., :63, :61])
    assert cropped.shape[-2:] == (63, 61)
    torch.testing.assert_close(cropped[..., :40, :40], full[..., :40, :40], atol=1e-5, rtol=1e-5)


def test_wrong_channel_count_is_a_clear_error() -> None:
    model = UNet(UNetConfig(in_channels=1))
    with pytest.raises(ValueError, match=r"expects input \(B, 1, H, W\)"):
        model(torch.rand(1, 3, 16, 16))


def test_width_and_depth_change_the_model() -> None:
    def count(config: UNetConfig) -> int:
        return sum(p.numel() for p in UNet(config).parameters())

    assert count(UNetConfig(width=8)) < count(UNetConfig(width=16)) < count(UNetConfig(width=32))
    assert count(UNetConfig(depth=2)) < count(UNetConfig(depth=3))
    assert len(UNet(UNetConfig(depth=3)).encoders) == 3


def test_config_round_trips_through_json() -> None:
    config = UNetConfig(in_channels=3, out_channels=3, width=8, depth=2, norm="group")
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert UNetConfig.from_dict({"width": 4}) == UNetConfig(width=4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"widht": 8}, "unknown UNetConfig keys: widht"),
        ({"width": 0}, "width must be a positive integer"),
        ({"depth": 9}, "depth must be an integer in"),
        ({"norm": "layer"}, "norm must be 'batch' or 'group'"),
        ({"in_channels": 1.5}, "in_channels must be a positive integer"),
    ],
)
def test_invalid_config_is_rejected(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict(data)


def test_fits_a_tiny_segmentation_problem() -> None:
    # A bright square on a dark background: a working U-Net separates it within a few dozen Adam steps.
    torch.manual_seed(0)
    x = torch.zeros(4, 1, 32, 32)
    y = torch.zeros(4, 32, 32, dtype=torch.int64)
    for i in range(4):
        x[i, 0, 4 + 4 * i : 14 + 4 * i, 6:20] = 1.0
        y[i, 4 + 4 * i : 14 + 4 * i, 6:20] = 1
    x += 0.1 * torch.randn_like(x)
    model = UNet(UNetConfig(width=4, depth=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.97
