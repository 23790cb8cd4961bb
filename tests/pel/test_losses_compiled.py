"""The opt-in compiled path (``compile=True``) against the eager kernels: same values and gradients, and a clean
fallback when nothing can be compiled.

Compiling costs seconds per graph, and a graph is made per kernel, input shape, option set and dtype, so the cases
below share shapes (2D (2, C, 6, 10) and 3D (2, C, 3, 4, 5) flatten to the same 60 pixels per patch) and vary the
options that are not compiled into the kernels (alpha, denominator, batch, include_background, class_weights, the
ignore_index value, pooling) inside one test rather than across many.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pel import losses
from pel.config import TrainConfig
from pel.data import load_split, open_dataset
from pel.losses import CompoundLoss, PELLoss, dice_loss, pel_loss, pel_normalised

SHAPES = {"2d": (2, 6, 10), "3d": (2, 3, 4, 5)}  # (B, *S); both 60 pixels per patch


def _case(
    shape: tuple[int, ...], channels: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, *spatial = shape
    logits = 3 * torch.randn(b, channels, *spatial, generator=gen, dtype=torch.float64)
    target = torch.randint(0, max(channels, 2), (b, *spatial), generator=gen)
    target[0, 0] = 0  # keep both patches' class sets different, and patch 0 non-empty
    return logits.to(dtype), target


def _value_and_grad(fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    x = logits.detach().clone().requires_grad_()
    value = fn(x, target)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@contextmanager
def _no_fallback() -> Iterator[None]:
    """Fail if the compiled path fell back to the eager kernels (which would make the comparison vacuous)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "pel.losses: compile=True" in str(w.message)]
    assert not fallbacks and not losses._COMPILE_ERROR, fallbacks or losses._COMPILE_ERROR


def _assert_same(
    fn: Callable[..., Tensor],
    logits: Tensor,
    target: Tensor,
    rtol: float = 1e-12,
    atol: float = 1e-13,
    **kwargs: object,
) -> None:
    want = _value_and_grad(lambda x, t: fn(x, t, **kwargs), logits, target)
    with _no_fallback():
        got = _value_and_grad(lambda x, t: fn(x, t, compile=True, **kwargs), logits, target)
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg=lambda m: f"value, {kwargs}: {m}")
    # Gradient entries near 0 differ by rounding relative to the largest entry, not to themselves.
    scale = float(want[1].abs().max())
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * scale, msg=lambda m: f"gradient, {kwargs}: {m}")
    assert got[1].dtype == logits.dtype and bool(got[1].abs().sum() > 0)


# Options that only change what happens after the per-pixel sums (and the ignore_index value, passed to the
# kernels as a tensor): one compiled graph serves all of them.
PEL_OPTIONS = [
    {},
    {"alpha": 2.0, "denominator": "jaccard"},
    {"batch": True, "include_background": False},
    {"class_weights": "ramp", "power_of": "product"},
]


def _weights(options: dict, k: int) -> dict:
    if options.get("class_weights") == "ramp":
        return {**options, "class_weights": [0.5 + i for i in range(k)]}
    return options


@pytest.mark.parametrize("channels", [2, 3, 1])
def test_compiled_equals_eager_integer_targets_float64(channels: int) -> None:
    k = max(channels, 2)
    for dims, shape in SHAPES.items():
        logits, target = _case(shape, channels, seed=len(dims))
        for options in PEL_OPTIONS:
            _assert_same(pel_loss, logits, target, **_weights(options, k))
        _assert_same(pel_normalised, logits, target, batch=True)
        if channels > 1:
            # ignore_index inside and outside the class range, one graph for both; patch 1 entirely ignored.
            for ignore_index in (255, 0):
                ignored = target.clone()
                ignored[0, ..., :2] = ignore_index
                ignored[1] = ignore_index
                _assert_same(pel_loss, logits, ignored, ignore_index=ignore_index, denominator="jaccard")


def test_compiled_ignore_index_gives_zero_gradient_and_the_value_without_those_pixels() -> None:
    logits, target = _case(SHAPES["2d"], 3, seed=7)
    ignored = target.clone()
    ignored[:, :, 5:] = 255
    x = logits.clone().requires_grad_()
    with _no_fallback():
        value = pel_loss(x, ignored, ignore_index=255, compile=True)
        value.backward()
    assert x.grad is not None and bool((x.grad[..., 5:] == 0).all()) and bool((x.grad[..., :5] != 0).any())
    # The value of the loss on the kept pixels alone (a different shape: the eager kernel).
    kept = pel_loss(logits[..., :5].contiguous(), target[..., :5].contiguous())
    torch.testing.assert_close(value.detach(), kept, rtol=1e-12, atol=1e-12)


def test_compiled_compound_loss_with_cross_entropy_float64() -> None:
    logits, target = _case(SHAPES["3d"], 2, seed=11)
    for region in ("pel", "dice"):
        eager = CompoundLoss(region, ce_weight=0.5, denominator="jaccard")
        compiled = CompoundLoss(region, ce_weight=0.5, denominator="jaccard", compile=True)
        with _no_fallback():
            got = _value_and_grad(compiled, logits, target)
        want = _value_and_grad(eager, logits, target)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        terms_got = compiled.terms(logits, target)
        for name, value in eager.terms(logits, target).items():
            torch.testing.assert_close(terms_got[name], value, rtol=1e-12, atol=1e-14, msg=name)
    assert "compile=True" in repr(CompoundLoss(compile=True)) and "compile=False" in repr(PELLoss())


def test_compiled_probability_targets_and_probability_inputs() -> None:
    # Plain-autograd paths compiled whole (forward and the backward autograd derives).
    logits, target = _case(SHAPES["2d"], 3, seed=13)
    soft = torch.softmax(torch.randn(logits.shape, generator=torch.Generator().manual_seed(14), dtype=logits.dtype), 1)
    _assert_same(pel_loss, logits, soft, power_of="product", batch=True)
    _assert_same(dice_loss, logits, soft, denominator="jaccard")
    probs = torch.softmax(logits, 1)
    ignored = torch.where(target == 2, torch.full_like(target, -1), target)
    _assert_same(pel_loss, probs, ignored, from_logits=False, ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_compiled_half_precision_input_has_float32_internals(dtype: torch.dtype) -> None:
    logits, target = _case(SHAPES["2d"], 2, seed=17, dtype=dtype)
    eager = _value_and_grad(lambda x, t: pel_loss(x, t), logits, target)
    with _no_fallback():
        got = _value_and_grad(lambda x, t: pel_loss(x, t, compile=True), logits, target)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype  # sums in float32, gradient in the input's dtype
    torch.testing.assert_close(got[0], eager[0], rtol=1e-6, atol=1e-6)
    # Both kernels compute in float32 and round the gradient to bf16 once: at most one bf16 step apart.
    torch.testing.assert_close(got[1].float(), eager[1].float(), rtol=2**-7, atol=1e-6 * float(eager[1].abs().max()))


def test_compiled_equals_eager_on_real_bbbc039_float32(bbbc039_root: Path) -> None:
    """Training-like float32 input: logits from real BBBC039 images against their real nucleus masks."""
    index = open_dataset(bbbc039_root)
    samples = load_split(dataclasses.replace(index, splits={"train": index.splits["train"][:2]}), "train")
    images = torch.from_numpy(np.stack([s.image[:, 100:228, 200:328] for s in samples]))  # (2, 1, 128, 128)
    target = torch.from_numpy(np.stack([s.mask[100:228, 200:328] for s in samples]))
    assert 0 < float(target.float().mean()) < 1
    logits = torch.cat([4 - 8 * images, 8 * images - 4], 1)  # a plausible (imperfect) two-class prediction
    eager, compiled = CompoundLoss("pel"), CompoundLoss("pel", compile=True)
    exact = _value_and_grad(eager, logits.double(), target)
    want = _value_and_grad(eager, logits, target)
    with _no_fallback():
        got = _value_and_grad(compiled, logits, target)
    # Both are float32 computations of the same sums (in a different order, with different exp/sigmoid roundings):
    # each within float32 rounding of the float64 result (α = 20 amplifies the ratios' errors), and of each other.
    for (value, grad), name in ((want, "eager"), (got, "compiled")):
        assert value.dtype == torch.float32 and grad.dtype == torch.float32
        torch.testing.assert_close(value.double(), exact[0], rtol=3e-6, atol=0, msg=name)
        torch.testing.assert_close(grad.double(), exact[1], rtol=1e-4, atol=1e-5 * float(exact[1].abs().max()))
    torch.testing.assert_close(got[0], want[0], rtol=3e-6, atol=0)


def test_bad_labels_are_rejected_by_the_compiled_kernels() -> None:
    logits, target = _case(SHAPES["2d"], 2, seed=19)
    bad = target.clone()
    bad[1, 2, 3] = 2
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\)"):
        pel_loss(logits, bad, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        pel_loss(logits, target, compile="yes")  # type: ignore[arg-type]
    # C >= 3: a label counted by no class (above the range, negative, or valid but not a class under ignore_index).
    logits, target = _case(SHAPES["2d"], 3, seed=20)
    for label, ignore_index in ((3, None), (-1, None), (7, 255)):
        bad = target.clone()
        bad[0, 4, 5] = label
        with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\)"):
            pel_loss(logits, bad, ignore_index=ignore_index, compile=True)
    ignored = target.clone()
    ignored[0, 4, 5] = 255  # the same pixel ignored instead: accepted
    assert torch.isfinite(pel_loss(logits, ignored, ignore_index=255, compile=True))


def test_no_compiler_falls_back_to_eager_with_a_warning() -> None:
    # As on a machine without a C++ compiler: Inductor's compiler search finds nothing.
    logits, target = _case(SHAPES["3d"], 3, seed=23, dtype=torch.float32)
    want = _value_and_grad(lambda x, t: pel_loss(x, t, ignore_index=255), logits, target)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/bin/c++")})
    with no_compiler, pytest.warns(RuntimeWarning, match=r"torch.compile cannot be used \(no working C\+\+ compiler"):
        got = _value_and_grad(lambda x, t: pel_loss(x, t, ignore_index=255, compile=True), logits, target)
    # The fallback is the eager kernel itself: identical numbers, not merely close ones.
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not losses._COMPILE_ERROR  # a missing compiler is checked up front, not recorded as a failure


def test_train_config_compile_loss_is_a_boolean() -> None:
    assert TrainConfig().compile_loss is False
    assert TrainConfig(compile_loss=True).to_dict()["compile_loss"] is True
    with pytest.raises(ValueError, match="TrainConfig.compile_loss must be true or false"):
        TrainConfig(compile_loss="yes")  # type: ignore[arg-type]
