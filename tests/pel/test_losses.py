"""PEL, soft Dice and CompoundLoss against independent float64 references and the spec's cross-checks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pel.losses import CompoundLoss, PELLoss, dice_loss, pel_loss, pel_normalised

# ---------------------------------------------------------------------------------------------------------------
# Independent references: float64, explicit float one-hot, plain loops. Deliberately naive so that they share
# nothing with the gather/scatter implementation under test.


def _probs_and_onehot(logits: Tensor, target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """-> probs (B, K, N), one-hot (B, K, N), valid (B, N) in float64 / bool."""
    x = logits.detach().double().flatten(2)
    if x.shape[1] == 1:
        fg = torch.sigmoid(x[:, 0])
        probs = torch.stack([1 - fg, fg], dim=1)
    else:
        probs = torch.softmax(x, dim=1)
    k = probs.shape[1]
    t = target.flatten(1).long()
    valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    onehot = torch.zeros_like(probs)
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            if valid[b, i]:
                onehot[b, int(t[b, i]), i] = 1.0
    assert onehot.shape[1] == k
    return probs, onehot, valid


def reference_pel(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float,
    n: float,
    include_background: bool = True,
    ignore_index: int | None = None,
) -> float:
    probs, onehot, valid = _probs_and_onehot(logits, target, ignore_index)
    patch_values = []
    for b in range(probs.shape[0]):
        class_values = []
        for c in range(probs.shape[1]):
            if c == 0 and not include_background:
                continue
            p = probs[b, c][valid[b]]
            g = onehot[b, c][valid[b]]
            if g.sum() == 0:
                continue
            class_values.append(1 - alpha * float((p**n * g).sum()) / float(p.sum() + g.sum()))
        if class_values:
            patch_values.append(sum(class_values) / len(class_values))
    return sum(patch_values) / len(patch_values) if patch_values else 0.0


def reference_soft_dice(logits: Tensor, target: Tensor) -> float:
    """Plain soft Dice loss 1 - 2Σpg/(Σp+Σg) per (patch, present class), mean per patch, mean over patches."""
    probs, onehot, _ = _probs_and_onehot(logits, target, None)
    dice = 1 - 2 * (probs * onehot).sum(-1) / (probs.sum(-1) + onehot.sum(-1))
    present = onehot.sum(-1) > 0
    per_patch = (dice * present).sum(1) / present.sum(1)
    return float(per_patch.mean())


def make_case(shape: tuple[int, ...], channels: int, seed: int, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    """Random logits (B, C, *S) and labels (B, *S); C == 1 means binary labels 0/1."""
    gen = torch.Generator().manual_seed(seed)
    b, *spatial = shape
    logits = scale * torch.randn(b, channels, *spatial, generator=gen)
    target = torch.randint(0, max(channels, 2), (b, *spatial), generator=gen)
    return logits, target


def perfect_logits(target: Tensor, channels: int, magnitude: float = 60.0) -> Tensor:
    if channels == 1:
        return (magnitude * (2 * target.float() - 1)).unsqueeze(1)
    return magnitude * F.one_hot(target, channels).movedim(-1, 1).float()


CASES = [
    pytest.param((2, 6, 7), 3, id="2d-3class"),
    pytest.param((3, 5, 4), 2, id="2d-2class"),
    pytest.param((2, 6, 5), 1, id="2d-binary-sigmoid"),
    pytest.param((2, 3, 4, 5), 4, id="3d-4class"),
    pytest.param((2, 3, 4, 3), 1, id="3d-binary-sigmoid"),
]


# ---------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize(("alpha", "n"), [(20.0, 3.0), (2.0, 1.0), (5.0, 0.5), (1.5, 2.0)])
def test_pel_matches_reference(shape: tuple[int, ...], channels: int, alpha: float, n: float) -> None:
    logits, target = make_case(shape, channels, seed=1)
    got = pel_loss(logits, target, alpha=alpha, n=n)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_pel(logits, target, alpha=alpha, n=n), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(("shape", "channels"), CASES)
def test_alpha2_n1_equals_plain_soft_dice(shape: tuple[int, ...], channels: int) -> None:
    logits, target = make_case(shape, channels, seed=2)
    expected = reference_soft_dice(logits, target)
    assert pel_loss(logits, target, alpha=2.0, n=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert pel_normalised(logits, target, n=1.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize(("alpha", "n"), [(20.0, 3.0), (2.0, 1.0), (7.0, 0.5)])
def test_perfect_prediction_gives_one_minus_half_alpha(
    shape: tuple[int, ...], channels: int, alpha: float, n: float
) -> None:
    _, target = make_case(shape, channels, seed=3)
    got = pel_loss(perfect_logits(target, channels), target, alpha=alpha, n=n)
    assert got.item() == pytest.approx(1 - alpha / 2, abs=1e-5)
    assert pel_normalised(perfect_logits(target, channels), target, n=n).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize("alpha", [20.0, 2.0])
def test_all_wrong_gives_one(shape: tuple[int, ...], channels: int, alpha: float) -> None:
    _, target = make_case(shape, channels, seed=4)
    wrong = (target + 1) % max(channels, 2)
    logits = perfect_logits(wrong, channels)
    assert pel_loss(logits, target, alpha=alpha).item() == pytest.approx(1.0, abs=1e-6)
    assert pel_normalised(logits, target).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize(("alpha", "n", "include_background"), [(20.0, 3.0, True), (3.0, 2.0, False)])
def test_raw_is_affine_in_normalised(
    shape: tuple[int, ...], channels: int, alpha: float, n: float, include_background: bool
) -> None:
    logits, target = make_case(shape, channels, seed=5)
    raw = pel_loss(logits, target, alpha=alpha, n=n, include_background=include_background)
    norm = pel_normalised(logits, target, n=n, include_background=include_background)
    assert 0.0 <= norm.item() <= 1.0
    assert raw.item() == pytest.approx((1 - alpha / 2) + (alpha / 2) * norm.item(), abs=1e-5)


def test_values_bounded_for_hard_labels_and_negative_allowed() -> None:
    logits, target = make_case((4, 8, 8), 3, seed=6, scale=6.0)
    raw = pel_loss(logits, target).item()
    assert 1 - 20 / 2 <= raw <= 1
    # A good prediction must come out negative: nothing may clamp the raw value at 0.
    assert pel_loss(perfect_logits(target, 3, magnitude=3.0), target).item() < 0


def test_include_background_false_skips_class_zero() -> None:
    logits, target = make_case((3, 6, 6), 3, seed=7)
    got = pel_loss(logits, target, include_background=False)
    assert got.item() == pytest.approx(reference_pel(logits, target, alpha=20, n=3, include_background=False), abs=1e-5)
    assert got.item() != pytest.approx(pel_loss(logits, target).item(), abs=1e-4)


def test_per_patch_reduction_differs_from_pooling() -> None:
    # Two patches with very different foreground sizes: the per-patch mean must weigh them equally.
    logits, _ = make_case((2, 8, 8), 2, seed=8)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, :1, :2] = 1
    target[1, :6, :6] = 1
    got = pel_loss(logits, target).item()
    per_patch = [pel_loss(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    assert got == pytest.approx(sum(per_patch) / 2, abs=1e-6)
    pooled = pel_loss(logits.permute(1, 0, 2, 3).reshape(1, 2, 16, 8), target.reshape(1, 16, 8)).item()
    assert abs(got - pooled) > 1e-3


def test_soft_onehot_target_equals_integer_target() -> None:
    logits, target = make_case((2, 5, 6), 3, seed=9)
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    for fn in (pel_loss, pel_normalised, dice_loss):
        assert fn(logits, onehot).item() == pytest.approx(fn(logits, target).item(), abs=1e-6)
    binary_target = target.clamp(max=1)
    assert pel_loss(logits[:, :1], binary_target.unsqueeze(1).float()).item() == pytest.approx(
        pel_loss(logits[:, :1], binary_target).item(), abs=1e-6
    )


def test_module_twin_matches_function() -> None:
    logits, target = make_case((2, 6, 6), 3, seed=10)
    module = PELLoss(alpha=4.0, n=2.0, include_background=False, ignore_index=2)
    expected = pel_loss(logits, target, alpha=4.0, n=2.0, include_background=False, ignore_index=2)
    assert module(logits, target).item() == pytest.approx(expected.item(), abs=0)


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def _binary_probability_leaf(seed: int, shape: tuple[int, int] = (5, 6)) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = (0.02 + 0.96 * torch.rand(1, 1, *shape, generator=gen, dtype=torch.float64)).requires_grad_()
    g = torch.randint(0, 2, (1, *shape), generator=gen)
    g[0, 0, 0] = 1
    return p, g


@pytest.mark.parametrize(("alpha", "n"), [(20.0, 3.0), (2.0, 1.0), (5.0, 2.0), (20.0, 0.5)])
def test_closed_form_gradient_wrt_probabilities(alpha: float, n: float) -> None:
    # Single patch, single class: the foreground class of a sigmoid input with the background class left out.
    # logit(p) is the exact inverse of the sigmoid, so autograd w.r.t. the leaf p is the gradient w.r.t. p.
    p, g = _binary_probability_leaf(seed=11)
    loss = pel_loss(torch.logit(p), g, alpha=alpha, n=n, include_background=False)
    (grad,) = torch.autograd.grad(loss, p)

    pd, gd = p.detach().double()[0, 0], g[0].double()
    big_i = alpha * (pd**n * gd).sum()
    big_u = pd.sum() + gd.sum()
    expected = big_i / big_u**2 - alpha * n * pd ** (n - 1) * gd / big_u
    torch.testing.assert_close(grad[0, 0], expected, rtol=1e-9, atol=1e-12)
    # The spec's observation: every background pixel gets the same push, however wrong it is.
    bg = grad[0, 0][g[0] == 0]
    torch.testing.assert_close(bg, torch.full_like(bg, float(big_i / big_u**2)), rtol=1e-9, atol=0)


def _gradcheck(fn: Callable[[Tensor], Tensor], logits: Tensor) -> None:
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("channels", "kwargs"),
    [
        pytest.param(3, {"alpha": 20.0, "n": 3.0}, id="pel-3class"),
        pytest.param(3, {"alpha": 4.0, "n": 0.5, "include_background": False}, id="pel-n0.5-nobg"),
        pytest.param(3, {"alpha": 20.0, "n": 3.0, "ignore_index": 255}, id="pel-ignore"),
        pytest.param(1, {"alpha": 20.0, "n": 3.0}, id="pel-binary"),
        pytest.param(1, {"alpha": 2.0, "n": 2.0, "ignore_index": -1}, id="pel-binary-ignore"),
    ],
)
def test_gradcheck_pel(channels: int, kwargs: dict) -> None:
    logits, target = make_case((2, 3, 4), channels, seed=12)
    if "ignore_index" in kwargs:
        target[0, 0, :2] = kwargs["ignore_index"]
    logits = logits.double().requires_grad_()
    _gradcheck(lambda x: pel_loss(x, target, **kwargs), logits)
    norm_kwargs = {k: v for k, v in kwargs.items() if k != "alpha"}
    _gradcheck(lambda x: pel_normalised(x, target, **norm_kwargs), logits)


@pytest.mark.parametrize("channels", [3, 1])
def test_gradcheck_dice_soft_targets_and_3d(channels: int) -> None:
    logits, target = make_case((2, 2, 3, 2), channels, seed=13)
    logits = logits.double().requires_grad_()
    _gradcheck(lambda x: dice_loss(x, target), logits)
    soft = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if channels > 1:
        soft = soft / soft.sum(1, keepdim=True)
    _gradcheck(lambda x: pel_loss(x, soft), logits)


@pytest.mark.parametrize("region", ["pel", "dice", "none"])
@pytest.mark.parametrize("channels", [3, 1])
def test_gradcheck_compound(region: str, channels: int) -> None:
    logits, target = make_case((2, 3, 4), channels, seed=14)
    target[1, 2, :] = -100
    loss = CompoundLoss(region, region_weight=0.7, ce_weight=1.3, ignore_index=-100)  # type: ignore[arg-type]
    _gradcheck(lambda x: loss(x, target), logits.double().requires_grad_())


# ---------------------------------------------------------------------------------------------------------------
# ignore_index, empty classes, precision, dimensions


@pytest.mark.parametrize(("channels", "ignore_index"), [(3, 255), (3, -100), (1, 255), (4, 0)])
def test_ignore_index_zero_gradient_and_value_of_removed_pixels(channels: int, ignore_index: int) -> None:
    logits, target = make_case((3, 6, 7), channels, seed=15)
    gen = torch.Generator().manual_seed(16)
    ignored = torch.rand(target.shape, generator=gen) < 0.3
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    # Extreme logits on ignored pixels would dominate every sum if they leaked in.
    logits = torch.where(ignored.unsqueeze(1), torch.full_like(logits, 50.0), logits).requires_grad_()

    for fn in (
        lambda x, t: pel_loss(x, t, ignore_index=ignore_index),
        lambda x, t: pel_normalised(x, t, n=2.0, ignore_index=ignore_index),
        lambda x, t: dice_loss(x, t, ignore_index=ignore_index),
        CompoundLoss("pel", ignore_index=ignore_index),
    ):
        value = fn(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.all(grad.movedim(1, -1)[ignored] == 0)
        assert torch.any(grad.movedim(1, -1)[~ignored] != 0)
        if isinstance(fn, CompoundLoss):
            continue  # its CE is a pixel mean over the whole batch: checked against F.cross_entropy below
        # Same loss on each patch with the ignored pixels cut out (as a 1 x N_valid patch), averaged over patches.
        kept = []
        for b in range(3):
            keep = ~ignored[b]
            kept.append(fn(logits[b][:, keep].reshape(1, channels, 1, -1), target[b][keep][None, None]).item())
        assert value.item() == pytest.approx(sum(kept) / 3, abs=1e-5)

    expected = reference_pel(logits, target, alpha=20, n=3, ignore_index=ignore_index)
    assert pel_loss(logits, target, ignore_index=ignore_index).item() == pytest.approx(expected, abs=1e-5)


def test_compound_ce_honours_ignore_index() -> None:
    logits, target = make_case((2, 5, 5), 3, seed=17)
    target[0, :2] = 255
    terms = CompoundLoss("none", ignore_index=255).terms(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6)

    binary_logits, binary_target = make_case((2, 5, 5), 1, seed=18)
    binary_target[1, 3:] = 255
    keep = binary_target != 255
    expected_bce = F.binary_cross_entropy_with_logits(binary_logits[:, 0][keep], binary_target[keep].float())
    got = CompoundLoss("none", ignore_index=255).terms(binary_logits, binary_target)["ce"]
    assert got.item() == pytest.approx(expected_bce.item(), rel=1e-6)


def test_everything_ignored_is_attached_zero() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    for value in (
        pel_loss(logits, target, ignore_index=255),
        CompoundLoss("pel", ignore_index=255)(logits, target),
    ):
        assert value.item() == 0.0
        assert value.requires_grad
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.all(grad == 0)


@pytest.mark.parametrize("channels", [3, 1])
def test_empty_class_is_left_out_and_finite(channels: int) -> None:
    logits, _ = make_case((2, 6, 6), channels, seed=19)
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[0, 2:4, 2:4] = 1  # patch 0: classes 0 and 1; patch 1: background only; class 2 absent everywhere
    logits.requires_grad_()
    value = pel_loss(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    assert math.isfinite(value.item()) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(reference_pel(logits, target, alpha=20, n=3), abs=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_all_background_without_background_class_is_attached_zero(channels: int) -> None:
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    value = pel_loss(logits, target, include_background=False)
    assert value.item() == 0.0 and value.requires_grad
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.all(grad == 0)
    with_bg = pel_loss(logits, target)
    assert math.isfinite(with_bg.item()) and with_bg.item() < 1.0


def test_patch_without_present_class_is_left_out_of_patch_mean() -> None:
    logits, _ = make_case((2, 5, 5), 2, seed=20)
    target = torch.zeros(2, 5, 5, dtype=torch.long)
    target[1, 1:3, 1:4] = 1
    both = pel_loss(logits, target, include_background=False)
    only_second = pel_loss(logits[1:], target[1:], include_background=False)
    assert both.item() == pytest.approx(only_second.item(), abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_512_half_precision_patch_is_finite(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    logits32 = 8 * torch.randn(1, 2, 512, 512, generator=gen)
    target = (torch.rand(1, 512, 512, generator=gen) < 0.2).long()
    logits = logits32.to(dtype).requires_grad_()
    terms = CompoundLoss("pel")(logits, target), pel_loss(logits, target)
    for value in terms:
        assert value.dtype == torch.float32 and math.isfinite(value.item())
        (grad,) = torch.autograd.grad(value, logits)
        assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Internals in float32: the half-precision result matches float32 on the same (rounded) logits.
    expected = pel_loss(logits.detach().float(), target)
    assert terms[1].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("n", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_stay_finite(channels: int, n: float, dtype: torch.dtype) -> None:
    # Saturated logits underflow probabilities to exactly 0; with n < 1, p**n would have an infinite slope there.
    _, target = make_case((2, 6, 6), channels, seed=25)
    wrong = (target + 1) % max(channels, 2)
    half_wrong = torch.where(torch.arange(target.numel()).reshape(target.shape) % 2 == 0, target, wrong)
    logits = perfect_logits(half_wrong, channels, magnitude=6e4)
    logits = logits.to(dtype).requires_grad_()
    for value in (pel_loss(logits, target, n=n), CompoundLoss("pel", n=n)(logits, target)):
        (grad,) = torch.autograd.grad(value, logits)
        assert math.isfinite(value.item()) and torch.isfinite(grad).all()


def test_3d_input_matches_reference_and_backpropagates() -> None:
    logits, target = make_case((2, 4, 5, 6), 3, seed=22)
    logits.requires_grad_()
    value = pel_loss(logits, target, ignore_index=None)
    value.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert value.item() == pytest.approx(reference_pel(logits, target, alpha=20, n=3), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# CompoundLoss and option checking


@pytest.mark.parametrize(
    ("region", "keys"),
    [("pel", {"loss", "ce", "pel", "pel_norm"}), ("dice", {"loss", "ce", "dice"}), ("none", {"loss", "ce"})],
)
@pytest.mark.parametrize(("region_weight", "ce_weight"), [(1.0, 1.0), (0.25, 2.0), (0.0, 1.0)])
@pytest.mark.parametrize("channels", [3, 1])
def test_compound_terms_and_weights(
    region: str, keys: set[str], region_weight: float, ce_weight: float, channels: int
) -> None:
    logits, target = make_case((2, 6, 5), channels, seed=23)
    loss = CompoundLoss(region, region_weight=region_weight, ce_weight=ce_weight, alpha=10.0, n=2.0)  # type: ignore[arg-type]
    terms = loss.terms(logits, target)
    assert set(terms) == keys

    if channels == 1:
        ce = F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    else:
        ce = F.cross_entropy(logits, target)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    region_value = {"pel": pel_loss(logits, target, alpha=10.0, n=2.0), "dice": dice_loss(logits, target)}.get(region)
    if region_value is not None:
        assert terms[region].item() == pytest.approx(region_value.item(), abs=1e-6)
    if region == "pel":
        assert terms["pel_norm"].item() == pytest.approx(pel_normalised(logits, target, n=2.0).item(), abs=1e-6)
    expected = ce_weight * ce.item() + (region_weight * region_value.item() if region_value is not None else 0.0)
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert loss(logits, target).item() == pytest.approx(terms["loss"].item(), abs=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0.0},
        {"n": -1.0},
        {"n": float("nan")},
        {"alpha": 0.0},
        {"alpha": float("inf")},
        {"region": "focal"},
        {"region_weight": -1.0},
        {"ce_weight": float("nan")},
    ],
)
def test_compound_rejects_bad_options(kwargs: dict) -> None:
    region = kwargs.pop("region", "pel")
    with pytest.raises(ValueError, match=next(iter(kwargs), "region")):
        CompoundLoss(region, **kwargs)


@pytest.mark.parametrize("kwargs", [{"n": 0.0}, {"n": -2.0}, {"alpha": -1.0}])
def test_pel_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PELLoss(**kwargs)
    logits, target = make_case((1, 3, 3), 2, seed=24)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        pel_loss(logits, target, **kwargs)


@pytest.mark.parametrize(
    ("logits_shape", "target", "match"),
    [
        ((2, 3, 4, 4), torch.full((2, 4, 4), 3), "labels"),
        ((2, 1, 4, 4), torch.full((2, 4, 4), 2), "labels"),
        ((2, 3, 4, 4), torch.full((2, 4, 5), 0), "shape|target"),
        ((2, 3, 4, 4), torch.zeros(2, 3, 4, 5), "shape"),
        ((2, 3), torch.zeros(2, dtype=torch.long), "spatial"),
    ],
)
def test_bad_targets_rejected(logits_shape: tuple[int, ...], target: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pel_loss(torch.zeros(logits_shape), target)


# ---------------------------------------------------------------------------------------------------------------
# The options of issue 3: power_of, denominator, batch, class_weights, from_logits, empty_classes.
# One independent float64 reference covers all of them: explicit probabilities and one-hot, plain loops per row
# (patch, or the whole batch) and class, straight from the formulas in docs/pel-spec.md.


def reference_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 20.0,
    n: float = 3.0,
    power_of: str = "prediction",
    denominator: str = "sum",
    batch: bool = False,
    include_background: bool = True,
    class_weights: list[float] | None = None,
    ignore_index: int | None = None,
    from_logits: bool = True,
    empty_classes: str = "skip",
    normalised: bool = False,
) -> float:
    x = logits.detach().double().flatten(2)
    if from_logits:
        probs = torch.softmax(x, 1) if x.shape[1] > 1 else torch.cat([1 - torch.sigmoid(x), torch.sigmoid(x)], 1)
    else:
        probs = x if x.shape[1] > 1 else torch.cat([1 - x, x], 1)
    if target.is_floating_point():
        g = target.double().flatten(2)
        g = g if g.shape[1] > 1 else torch.cat([1 - g, g], 1)
        valid = torch.ones(g.shape[0], g.shape[2], dtype=torch.bool)
    else:
        _, g, valid = _probs_and_onehot(logits, target, ignore_index)
    k = probs.shape[1]
    if batch:  # one row: every patch's pixels side by side
        probs, g, valid = (t.movedim(0, -2).reshape(*t.shape[1:-1], 1, -1).movedim(-2, 0) for t in (probs, g, valid))
    r_max = 0.5 if denominator == "sum" else 1.0
    scale = 1 / r_max if normalised else alpha
    weights = class_weights or [1.0] * k
    row_values = []
    for row in range(probs.shape[0]):
        num = den = 0.0
        for c in range(k):
            w = weights[c] if (c > 0 or include_background) else 0.0
            p, gc = probs[row, c][valid[row]], g[row, c][valid[row]]
            if w == 0 or (gc.sum() == 0 and empty_classes == "skip"):
                continue
            top = (p**n * gc).sum() if power_of == "prediction" else ((p * gc) ** n).sum()
            bottom = p.sum() + gc.sum() - ((p * gc).sum() if denominator == "jaccard" else 0)
            ratio = float(top / bottom) if bottom > 0 else 0.0
            num += w * (1 - scale * ratio)
            den += w
        if den > 0:
            row_values.append(num / den)
    return sum(row_values) / len(row_values) if row_values else 0.0


def soft_target(shape: tuple[int, ...], channels: int, seed: int) -> Tensor:
    """Random class probabilities (B, C, *S) (foreground probabilities for channels == 1), float64."""
    soft = torch.rand(shape[:1] + (channels,) + shape[1:], generator=torch.Generator().manual_seed(seed))
    return (soft if channels == 1 else soft / soft.sum(1, keepdim=True)).double()


OPTION_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param({"power_of": "product"}, id="product"),
    pytest.param({"denominator": "jaccard"}, id="jaccard"),
    pytest.param({"batch": True}, id="batch"),
    pytest.param({"class_weights": [0.5, 2.0, 1.0, 3.0]}, id="weights"),
    pytest.param({"include_background": False, "denominator": "jaccard", "batch": True}, id="nobg-jaccard-batch"),
    pytest.param({"empty_classes": "include", "power_of": "product"}, id="include-empty"),
    pytest.param({"n": 0.5, "alpha": 3.0, "ignore_index": 255}, id="n0.5-ignore"),
    pytest.param({"n": 2.0, "ignore_index": 1, "denominator": "jaccard", "batch": True}, id="ignore-in-range"),
]


def _fit_weights(kwargs: dict, k: int) -> dict:
    kwargs = dict(kwargs)
    if "class_weights" in kwargs:
        kwargs["class_weights"] = kwargs["class_weights"][:k]
    return kwargs


def _with_ignored(target: Tensor, ignore_index: int | None, seed: int) -> Tensor:
    if ignore_index is None:
        return target
    hit = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed)) < 0.25
    return torch.where(hit, torch.full_like(target, ignore_index), target)


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize("options", OPTION_SETS)
def test_options_match_reference(shape: tuple[int, ...], channels: int, options: dict) -> None:
    logits, target = make_case(shape, channels, seed=30)
    target[0] = 0  # patch 0 lacks the other classes: exercises absent classes in every option set
    kwargs = _fit_weights(options, max(channels, 2))
    target = _with_ignored(target, kwargs.get("ignore_index"), seed=31)
    raw = pel_loss(logits, target, **kwargs)
    assert raw.dtype == torch.float32
    assert raw.item() == pytest.approx(reference_loss(logits, target, **kwargs), rel=1e-5, abs=1e-5)
    norm_kwargs = {k: v for k, v in kwargs.items() if k != "alpha"}
    norm = pel_normalised(logits, target, **norm_kwargs)
    assert norm.item() == pytest.approx(reference_loss(logits, target, normalised=True, **kwargs), abs=1e-5)
    # raw = (1 - alpha r_max) + alpha r_max L_norm under every option set
    alpha = kwargs.get("alpha", 20.0)
    r_max = 0.5 if kwargs.get("denominator", "sum") == "sum" else 1.0
    assert raw.item() == pytest.approx((1 - alpha * r_max) + alpha * r_max * norm.item(), abs=1e-4)


@pytest.mark.parametrize("channels", [3, 2, 1])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_options_match_reference_on_probabilities(channels: int, options: dict) -> None:
    # from_logits=False: the input holds probabilities (the foreground probability for one channel).
    logits, target = make_case((3, 5, 4), channels, seed=32)
    probs = torch.sigmoid(logits) if channels == 1 else torch.softmax(logits, 1)
    kwargs = _fit_weights(options, max(channels, 2))
    target = _with_ignored(target, kwargs.get("ignore_index"), seed=33)
    got = pel_loss(probs, target, from_logits=False, **kwargs)
    expected = reference_loss(probs, target, from_logits=False, **kwargs)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # Same numbers as passing the logits.
    assert got.item() == pytest.approx(pel_loss(logits, target, **kwargs).item(), abs=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("options", [o for o in OPTION_SETS if "ignore_index" not in o.values[0]])
def test_options_match_reference_on_soft_targets(channels: int, options: dict) -> None:
    logits, _ = make_case((3, 5, 4), channels, seed=34)
    soft = soft_target((3, 5, 4), channels, seed=35).float()
    kwargs = _fit_weights(options, max(channels, 2))
    for from_logits in (True, False):
        x = logits if from_logits else (torch.sigmoid(logits) if channels == 1 else torch.softmax(logits, 1))
        got = pel_loss(x, soft, from_logits=from_logits, **kwargs)
        expected = reference_loss(x, soft, from_logits=from_logits, **kwargs)
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_prediction_and_product_agree_on_hard_labels_and_differ_on_soft(channels: int) -> None:
    logits, target = make_case((2, 6, 5), channels, seed=36)
    k = max(channels, 2)
    onehot = F.one_hot(target, k).movedim(-1, 1).float()
    hard = onehot if channels > 1 else onehot[:, 1:]
    for t in (target, hard):
        a = pel_loss(logits, t, power_of="prediction")
        b = pel_loss(logits, t, power_of="product")
        assert a.item() == pytest.approx(b.item(), abs=1e-6)
    soft = soft_target((2, 6, 5), channels, seed=37).float()
    a, b = pel_loss(logits, soft, power_of="prediction"), pel_loss(logits, soft, power_of="product")
    # (p·g)ⁿ = pⁿgⁿ <= pⁿg for g in [0, 1]: the product form has the smaller numerator, so the larger loss.
    assert b.item() > a.item() + 1e-3


@pytest.mark.parametrize(("shape", "channels"), CASES)
@pytest.mark.parametrize("batch", [False, True])
def test_jaccard_cross_checks(shape: tuple[int, ...], channels: int, batch: bool) -> None:
    _, target = make_case(shape, channels, seed=38)
    good = perfect_logits(target, channels)
    wrong = perfect_logits((target + 1) % max(channels, 2), channels)
    for alpha in (20.0, 2.0):
        assert pel_loss(good, target, alpha=alpha, denominator="jaccard", batch=batch).item() == pytest.approx(
            1 - alpha, abs=1e-5
        )
        assert pel_loss(wrong, target, alpha=alpha, denominator="jaccard", batch=batch).item() == pytest.approx(
            1.0, abs=1e-6
        )
    # n = 1 and alpha = 1: one minus the plain soft Jaccard index Σpg / (Σp + Σg − Σpg)
    logits, _ = make_case(shape, channels, seed=39)
    expected = reference_loss(logits, target, alpha=1.0, n=1.0, denominator="jaccard", batch=batch)
    assert dice_loss(logits, target, denominator="jaccard", batch=batch).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("shape", "channels"), CASES)
def test_alpha2_n1_pooled_equals_soft_dice_of_the_batch(shape: tuple[int, ...], channels: int) -> None:
    logits, target = make_case(shape, channels, seed=40)
    expected = reference_loss(logits, target, alpha=2.0, n=1.0, batch=True)
    assert pel_loss(logits, target, alpha=2.0, n=1.0, batch=True).item() == pytest.approx(expected, abs=1e-6)
    assert dice_loss(logits, target, batch=True).item() == pytest.approx(expected, abs=1e-6)
    # Pooling is the per-patch loss of the patches laid side by side as one patch.
    side_by_side = logits.movedim(0, 1).reshape(1, logits.shape[1], -1, *logits.shape[3:])
    joined = target.reshape(1, -1, *target.shape[2:])
    assert pel_loss(logits, target, batch=True).item() == pytest.approx(pel_loss(side_by_side, joined).item(), abs=1e-5)


def test_class_weights_formula() -> None:
    # row = Σ_c w_c [c present] L_c / Σ_c w_c [c present], then the mean over rows
    logits, target = make_case((2, 6, 6), 3, seed=41)
    target[1][target[1] == 2] = 0  # class 2 absent from patch 1
    w = [0.5, 2.0, 3.0]
    per_class = [[pel_loss(logits[b : b + 1], target[b : b + 1], class_weights=[0.0] * c + [1.0] + [0.0] * (2 - c))
                  for c in range(3)] for b in range(2)]  # fmt: skip
    expected = (
        sum(w[c] * per_class[0][c].item() for c in range(3)) / sum(w)
        + sum(w[c] * per_class[1][c].item() for c in range(2)) / (w[0] + w[1])
    ) / 2
    assert pel_loss(logits, target, class_weights=w).item() == pytest.approx(expected, abs=1e-5)
    assert pel_loss(logits, target, class_weights=torch.tensor(w)).item() == pytest.approx(expected, abs=1e-5)
    # Equal weights are the unweighted mean; a zero weight is include_background=False for class 0.
    assert pel_loss(logits, target, class_weights=[4.0] * 3).item() == pytest.approx(pel_loss(logits, target).item())
    assert pel_loss(logits, target, class_weights=[0.0, 1.0, 1.0]).item() == pytest.approx(
        pel_loss(logits, target, include_background=False).item(), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------------------------
# The author's exact computation


def author_transcription(probs: Tensor, onehot: Tensor) -> Tensor:
    """The author's code as described in docs/pel-spec.md, transcribed literally: 2-channel probabilities,
    alpha = 20, n = 3, (p·g)ⁿ over Σp + Σg, the whole batch pooled, one score per channel, mean of the two."""
    alpha, n = 20.0, 3.0
    scores = []
    for channel in range(2):
        p, g = probs[:, channel], onehot[:, channel]
        scores.append(1 - alpha * torch.sum((p * g) ** n) / (torch.sum(p) + torch.sum(g)))
    return (scores[0] + scores[1]) / 2


AUTHOR_SETTING = {
    "alpha": 20.0,
    "n": 3.0,
    "from_logits": False,
    "power_of": "product",
    "denominator": "sum",
    "batch": True,
    "include_background": True,
    "empty_classes": "include",
}


@pytest.mark.parametrize("case", ["hard", "soft", "all-background"])
def test_author_setting_reproduces_the_authors_computation(case: str) -> None:
    logits, target = make_case((3, 7, 6), 2, seed=42)
    if case == "all-background":
        target = torch.zeros_like(target)  # the foreground channel is absent from the whole batch
    probs = torch.softmax(logits.double(), 1).requires_grad_()
    onehot = F.one_hot(target, 2).movedim(-1, 1).double()
    g = soft_target((3, 7, 6), 2, seed=43) if case == "soft" else onehot
    expected = author_transcription(probs, g)
    (expected_grad,) = torch.autograd.grad(expected, probs)
    targets = [g] if case == "soft" else [g, target]  # one-hot probabilities or integer labels
    for t in targets:
        got = pel_loss(probs, t, **AUTHOR_SETTING)
        (grad,) = torch.autograd.grad(got, probs)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    if case == "all-background":
        # The default leaves the absent foreground out instead of scoring it 1.
        default = pel_loss(probs, target, **{**AUTHOR_SETTING, "empty_classes": "skip"})
        assert default.item() == pytest.approx(2 * expected.item() - 1, abs=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Gradients of every variant


def test_fused_kernel_matches_plain_autograd_and_forced_block_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused path (custom backward) against the plain-autograd path of the same sums, with tiny blocks so that
    # patches are split across blocks and several patches share one block.
    from pel import losses

    monkeypatch.setattr(losses, "_BLOCK", 16)
    cases = [((2, 9, 7), 2), ((3, 3, 3), 1), ((2, 5, 9), 3), ((5, 2, 3), 4), ((1, 40), 2), ((1, 40), 3)]
    for (shape, channels), ignore_index in zip(cases, [None, 255, -1, 0, None, 2], strict=True):
        logits, target = make_case(shape, channels, seed=44)
        target = _with_ignored(target, ignore_index, seed=45)
        x = logits.double().requires_grad_()
        opts = losses._options(n=2.5, ignore_index=ignore_index, denominator="jaccard")
        fused = losses._stats(x, target, opts, need_ce=True, fused=True)
        plain = losses._stats(x, target, opts, need_ce=True, fused=False)
        for name in ("sum_p", "sum_g", "sum_num", "sum_pg", "ce_sum", "num_valid"):
            got, want = getattr(fused, name), getattr(plain, name)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            if want.requires_grad:
                weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(46), dtype=want.dtype)
                (g1,) = torch.autograd.grad((got * weights).sum(), x, retain_graph=True)
                (g2,) = torch.autograd.grad((want * weights).sum(), x, retain_graph=True)
                torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels", [3, 2, 1])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_gradcheck_every_variant(channels: int, options: dict) -> None:
    logits, target = make_case((2, 3, 4), channels, seed=47)
    target[0] = 0
    kwargs = _fit_weights(options, max(channels, 2))
    target = _with_ignored(target, kwargs.get("ignore_index"), seed=48)
    x = logits.double().requires_grad_()
    _gradcheck(lambda v: pel_loss(v, target, **kwargs), x)
    compound_kwargs = {k: v for k, v in kwargs.items() if k != "n"}
    _gradcheck(lambda v: CompoundLoss("pel", n=kwargs.get("n", 3.0), **compound_kwargs)(v, target), x)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("options", [o for o in OPTION_SETS if "ignore_index" not in o.values[0]])
def test_gradcheck_probability_inputs_and_soft_targets(channels: int, options: dict) -> None:
    logits, target = make_case((2, 3, 3), channels, seed=49)
    kwargs = _fit_weights(options, max(channels, 2))
    # Probabilities bounded away from 0 and 1 keep gradcheck's finite differences inside [0, 1].
    probs = (0.1 + 0.8 * (torch.sigmoid(logits) if channels == 1 else torch.softmax(logits, 1))).double()
    if channels > 1:
        probs = probs / probs.sum(1, keepdim=True)
    soft = soft_target((2, 3, 3), channels, seed=50)
    _gradcheck(lambda v: pel_loss(v, target, from_logits=False, **kwargs), probs.requires_grad_())
    _gradcheck(lambda v: pel_loss(v, soft, from_logits=False, **kwargs), probs)
    _gradcheck(lambda v: pel_loss(v, soft, **kwargs), logits.double().requires_grad_())


@pytest.mark.parametrize(("alpha", "n"), [(20.0, 3.0), (5.0, 0.5)])
def test_closed_form_gradient_jaccard_and_probability_input(alpha: float, n: float) -> None:
    # With D = Σp + Σg − Σpg: ∂L/∂p_k = α I (1 − g_k) / D² − α n p_kⁿ⁻¹ g_k / D, taken on probabilities directly.
    p, g = _binary_probability_leaf(seed=51)
    for denominator in ("sum", "jaccard"):
        loss = pel_loss(p, g, alpha=alpha, n=n, include_background=False, from_logits=False, denominator=denominator)
        (grad,) = torch.autograd.grad(loss, p)
        pd, gd = p.detach()[0, 0], g[0].double()
        big_i = (pd**n * gd).sum()
        d = pd.sum() + gd.sum() - ((pd * gd).sum() if denominator == "jaccard" else 0)
        d_slope = 1 - gd if denominator == "jaccard" else torch.ones_like(gd)
        expected = alpha * big_i * d_slope / d**2 - alpha * n * pd ** (n - 1) * gd / d
        torch.testing.assert_close(grad[0, 0], expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# ignore_index, empty classes and precision under the new options


@pytest.mark.parametrize("channels", [3, 2, 1])
@pytest.mark.parametrize(
    "options",
    [{"denominator": "jaccard"}, {"batch": True}, {"class_weights": [1.0, 3.0, 0.5]}, {"from_logits": False}],
    ids=["jaccard", "batch", "weights", "probabilities"],
)
def test_ignore_index_zero_gradient_and_value_under_options(channels: int, options: dict) -> None:
    logits, target = make_case((3, 6, 7), channels, seed=52)
    kwargs = _fit_weights(options, max(channels, 2))
    ignored = torch.rand(target.shape, generator=torch.Generator().manual_seed(53)) < 0.3
    target = torch.where(ignored, torch.full_like(target, 255), target)
    x = torch.where(ignored.unsqueeze(1), torch.full_like(logits, 50.0), logits)
    if kwargs.get("from_logits") is False:
        x = torch.sigmoid(x) if channels == 1 else torch.softmax(x, 1)
    x.requires_grad_()
    value = pel_loss(x, target, ignore_index=255, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.all(grad.movedim(1, -1)[ignored] == 0)
    assert torch.any(grad.movedim(1, -1)[~ignored] != 0)
    # The value of the loss on the kept pixels alone (each patch cut down to a 1 x N_valid strip).
    kept_x = [x[b][:, ~ignored[b]] for b in range(3)]
    kept_t = [target[b][~ignored[b]] for b in range(3)]
    if kwargs.get("batch"):
        expected = pel_loss(torch.cat(kept_x, 1)[None, :, None], torch.cat(kept_t)[None, None], **kwargs).item()
    else:
        pairs = zip(kept_x, kept_t, strict=True)
        expected = sum(pel_loss(kx[None, :, None], kt[None, None], **kwargs).item() for kx, kt in pairs) / 3
    assert value.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("channels", [3, 2, 1])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_empty_class_and_all_background_never_nan(channels: int, options: dict) -> None:
    kwargs = _fit_weights(options, max(channels, 2))
    logits, _ = make_case((3, 6, 6), channels, seed=54, scale=30.0)  # saturated: probabilities of exactly 0 or 1
    target = torch.zeros(3, 6, 6, dtype=torch.long)
    target[0, 2:4, 2:4] = 1  # patch 0 has background and class 1; patches 1 and 2 are all background
    for x in (logits, torch.zeros_like(logits)):
        for t in (target, torch.zeros_like(target)):
            for from_logits in (True, False):
                v = x if from_logits else (torch.sigmoid(x) if channels == 1 else torch.softmax(x, 1))
                v = v.clone().requires_grad_()
                value = pel_loss(v, t, from_logits=from_logits, **kwargs)
                (grad,) = torch.autograd.grad(value, v)
                assert math.isfinite(value.item()) and torch.isfinite(grad).all()
                expected = reference_loss(v, t, from_logits=from_logits, **kwargs)
                assert value.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 1])
def test_half_precision_patch_is_finite_for_every_kernel(dtype: torch.dtype, channels: int) -> None:
    gen = torch.Generator().manual_seed(55)
    logits32 = 8 * torch.randn(2, channels, 128, 128, generator=gen)
    target = torch.randint(0, max(channels, 2), (2, 128, 128), generator=gen)
    logits = logits32.to(dtype).requires_grad_()
    for kwargs in ({}, {"denominator": "jaccard", "batch": True}):
        value = pel_loss(logits, target, **kwargs)
        (grad,) = torch.autograd.grad(value, logits)
        assert value.dtype == torch.float32 and math.isfinite(value.item())
        assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0
        ref = logits.detach().float().requires_grad_()
        (ref_grad,) = torch.autograd.grad(pel_loss(ref, target, **kwargs), ref)
        assert value.item() == pytest.approx(pel_loss(ref.detach(), target, **kwargs).item(), abs=1e-4)
        torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool])
def test_integer_target_dtypes(dtype: torch.dtype) -> None:
    logits, target = make_case((2, 5, 5), 2, seed=56)
    expected = pel_loss(logits, target).item()
    assert pel_loss(logits, target.to(dtype)).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# CompoundLoss pass-through and option checking


@pytest.mark.parametrize("channels", [3, 2, 1])
@pytest.mark.parametrize(
    "options",
    [
        {"power_of": "product", "denominator": "jaccard"},
        {"batch": True, "include_background": False},
        {"class_weights": [2.0, 1.0, 0.5], "empty_classes": "include", "ignore_index": 255},
    ],
    ids=["product-jaccard", "batch-nobg", "weights-include-ignore"],
)
def test_compound_passes_pel_options_through(channels: int, options: dict) -> None:
    logits, target = make_case((3, 6, 5), channels, seed=57)
    kwargs = _fit_weights(options, max(channels, 2))
    target = _with_ignored(target, kwargs.get("ignore_index"), seed=58)
    terms = CompoundLoss("pel", alpha=10.0, n=2.0, **kwargs).terms(logits, target)
    assert terms["pel"].item() == pytest.approx(pel_loss(logits, target, alpha=10.0, n=2.0, **kwargs).item(), abs=1e-6)
    assert terms["pel_norm"].item() == pytest.approx(pel_normalised(logits, target, n=2.0, **kwargs).item(), abs=1e-6)
    dice = CompoundLoss("dice", **kwargs).terms(logits, target)["dice"]
    dice_kwargs = {k: v for k, v in kwargs.items() if k != "power_of"}
    assert dice.item() == pytest.approx(dice_loss(logits, target, **dice_kwargs).item(), abs=1e-6)
    # Cross entropy ignores the region options.
    assert terms["ce"].item() == pytest.approx(
        CompoundLoss("none", ignore_index=kwargs.get("ignore_index")).terms(logits, target)["ce"].item(), rel=1e-6
    )


def test_compound_defaults_are_unchanged() -> None:
    loss = CompoundLoss("pel")
    assert (loss.power_of, loss.denominator, loss.batch, loss.class_weights) == ("prediction", "sum", False, None)
    assert (loss.include_background, loss.empty_classes, loss.alpha, loss.n) == (True, "skip", 20.0, 3.0)
    module = PELLoss()
    assert (module.power_of, module.denominator, module.batch, module.from_logits) == ("prediction", "sum", False, True)
    module.n = 2.0  # the options stay plain, assignable attributes
    logits, target = make_case((2, 4, 4), 3, seed=59)
    assert module(logits, target).item() == pytest.approx(pel_loss(logits, target, n=2.0).item(), abs=0)
    assert "power_of='prediction'" in repr(module) and "denominator='sum'" in repr(loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"power_of": "square"}, "power_of"),
        ({"denominator": "dice"}, "denominator"),
        ({"empty_classes": "zero"}, "empty_classes"),
        ({"batch": "yes"}, "batch"),
        ({"from_logits": 1}, "from_logits"),
        ({"include_background": None}, "include_background"),
        ({"class_weights": [1.0, -1.0]}, "class_weights"),
        ({"class_weights": [0.0, 0.0]}, "class_weights"),
        ({"class_weights": [1.0, float("nan")]}, "class_weights"),
        ({"class_weights": "ab"}, "class_weights"),
        ({"ignore_index": 2.5}, "ignore_index"),
        ({"n": True}, "n"),
    ],
)
def test_new_options_rejected(kwargs: dict, match: str) -> None:
    logits, target = make_case((1, 3, 3), 2, seed=60)
    with pytest.raises(ValueError, match=match):
        pel_loss(logits, target, **kwargs)
    with pytest.raises(ValueError, match=match):
        PELLoss(**kwargs)
    if "from_logits" not in kwargs:
        with pytest.raises(ValueError, match=match):
            CompoundLoss("pel", **kwargs)


def test_incompatible_inputs_rejected() -> None:
    logits, target = make_case((2, 3, 3), 3, seed=61)
    with pytest.raises(ValueError, match="class_weights"):
        pel_loss(logits, target, class_weights=[1.0, 1.0])  # 3 classes
    with pytest.raises(ValueError, match="class_weights"):
        pel_loss(logits[:, :1], target.clamp(max=1), class_weights=[1.0])  # binary has 2 classes
    with pytest.raises(ValueError, match="ignore_index"):
        pel_loss(logits, soft_target((2, 3, 3), 3, seed=62).float(), ignore_index=255)
    with pytest.raises(ValueError, match="ignore_index"):
        CompoundLoss("pel", ignore_index=255)(logits, soft_target((2, 3, 3), 3, seed=62).float())


@pytest.mark.parametrize(
    ("channels", "bad_label", "ignore_index"),
    [(2, 2, None), (2, -1, None), (2, 3, 255), (1, 2, -100), (3, 3, None), (3, -1, 1), (4, 7, 255), (2, 2**40, None)],
)
def test_out_of_range_labels_rejected_by_every_kernel(channels: int, bad_label: int, ignore_index: int | None) -> None:
    logits, target = make_case((2, 4, 4), channels, seed=63)
    if ignore_index is not None:
        target[0, 0] = ignore_index  # ignored labels are fine anywhere
        assert math.isfinite(pel_loss(logits, target, ignore_index=ignore_index).item())
    target[1, 2, 3] = bad_label
    for fn in (
        lambda: pel_loss(logits, target, ignore_index=ignore_index),
        lambda: CompoundLoss("pel", ignore_index=ignore_index)(logits, target),
        lambda: pel_loss(torch.softmax(logits, 1), target, ignore_index=ignore_index, from_logits=False),
    ):
        with pytest.raises(ValueError, match="labels"):
            fn()


@pytest.mark.parametrize("channels", [3, 2, 1])
def test_no_grad_and_inference_mode_give_the_same_values(channels: int) -> None:
    # Without a gradient to compute the fused kernel keeps nothing for backward; the values must not change.
    logits, target = make_case((2, 5, 6), channels, seed=64)
    target[1, 0] = 255
    expected = CompoundLoss("pel", ignore_index=255).terms(logits.requires_grad_(), target)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = CompoundLoss("pel", ignore_index=255).terms(logits, target)
        for key, value in expected.items():
            assert got[key].item() == pytest.approx(value.item(), abs=1e-6), key
            assert not got[key].requires_grad
