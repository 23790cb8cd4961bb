"""PointWise Exponential Loss (PEL), soft Dice and the region + cross-entropy compound used for fine-tuning.

Shapes (S = one or more spatial dims, 2D and 3D in practice):

- ``logits``: ``(B, C, *S)`` network output, any float dtype. ``C >= 2`` means softmax over ``C`` classes;
  ``C == 1`` means a binary problem with a sigmoid: the single channel is the foreground logit and the two
  classes are background (0) and foreground (1). With ``from_logits=False`` the input holds probabilities
  instead (``C >= 2``: one per class, used as given; ``C == 1``: the foreground probability). Probabilities
  outside [0, 1], or class probabilities that do not sum to 1, are the caller's problem: they are not checked.
- ``target``: ``(B, *S)`` integer labels in ``[0, K)`` (K = C, or 2 for binary), or ``(B, C, *S)`` float class
  probabilities (soft labels; for binary ``(B, 1, *S)`` foreground probabilities). Labels equal to
  ``ignore_index`` may lie outside the class range; ``ignore_index`` is rejected for probability targets.

Per (patch b, class c), with ``p`` the predicted probability, ``g`` the ground truth, sums over the non-ignored
pixels of patch b (over the whole batch, and all ranks, with ``batch=True``):

- numerator    ``I = Σ pⁿ·g`` (``power_of="prediction"``, default) or ``Σ (p·g)ⁿ`` (``"product"``, the author's
  code); the two agree on hard labels and differ on soft ones
- denominator  ``D = Σp + Σg`` (``denominator="sum"``, default) or ``TP + FP + FN = Σp + Σg − Σp·g``
  (``"jaccard"``, the formula as written with sums)
- raw PEL      ``1 - alpha * I / D``. NOT bounded below by 0: for hard labels and n >= 1/2 it lies in
  ``[1 - alpha * r_max, 1]`` with ``r_max = 1/2`` ("sum") or ``1`` ("jaccard"): -9 at a perfect prediction for
  the defaults alpha = 20, "sum"
- L_norm       ``1 - (I / D) / r_max`` in ``[0, 1]``; raw = ``(1 - alpha * r_max) + alpha * r_max * L_norm``. This is
  the value to log and compare across alphas (``pel_normalised``, CompoundLoss term "pel_norm")
- soft Dice    L_norm with ``n = 1`` and "sum" (``dice_loss``); with "jaccard" it is the soft Jaccard (IoU) loss

Reduction. A class is *present* in a row (a patch, or the pooled batch) when its ground truth sum Σg > 0 after
removing ignored pixels. Each row's value is the weighted mean over its present, included classes::

    row = Σ_c w_c·[c present]·L_c / Σ_c w_c·[c present]

with ``w_c = class_weights[c]`` (1 for every class by default) and ``w_0 = 0`` when ``include_background`` is
False. Rows whose denominator is 0 are left out and the loss is the mean over the remaining rows. With
``empty_classes="include"`` absent classes are scored too (their value is exactly 1, with zero gradient), which
is what a plain per-channel transcription computes. If no row remains the loss is 0, still attached to the graph
(with a zero gradient) so ``backward()`` and DDP's gradient hooks work.

``batch=True`` pools the sums over the batch into one row (the author's code). When ``torch.distributed`` is
initialised with more than one rank the pooled sums are all-reduced *with gradient* (the backward all-reduces
their gradients too), so every rank computes the value of one process on the concatenated batch, and each
rank's input gradient is ``world_size`` times that process's gradient for its slice: after DDP averages the
parameter gradients over ranks they equal one process's. It is a collective: every rank must call it.

The author's exact computation (2-channel probabilities, α = 20, n = 3, (p·g)ⁿ, Σp+Σg, the whole batch pooled,
one score per channel averaged over both channels) is::

    pel_loss(probs, target, alpha=20, n=3, from_logits=False, power_of="product", denominator="sum",
             batch=True, include_background=True, empty_classes="include")

Gradient (single patch, single class, w.r.t. probabilities), with I = αΣpⁿg and U = Σp+Σg:
``∂L/∂p_k = I/U² − α n p_kⁿ⁻¹ g_k / U``. Every background pixel gets the same push I/U² however wrong it is,
and a foreground pixel's push grows like p² (it even flips sign below p* = √(I/(αnU))), so in practice PEL
sharpens confidence on nearly-correct foreground with an α/2 gain rather than attending to large errors. Its
gradient is 10–100x that of cross entropy at typical operating points; expect to need a lower learning rate.

Implementation. Internals run in float32 (float64 stays float64, for gradcheck); gradients come back in the
input's dtype. Integer targets with logits (the training path) go through ``_FusedSums``, a custom autograd
function that streams the batch in cache-sized blocks: forward computes every per-(patch, class) sum in one pass
and keeps only the target class's probability p_t (4 bytes per pixel); backward writes the closed-form gradient
w.r.t. the logits in a second pass, reading the labels again (and, for C >= 3, the logits, to recompute the
softmax). One- and two-channel inputs need a single sigmoid of a logit margin per pixel. No ``C x N`` one-hot is
built (for C >= 3 a float one-hot of one block at a time), and pⁿ⁻¹ is never formed, so the gradient stays
finite for any n > 0 even where probabilities underflow to 0. Everything after the sums (pooling, all-reduce,
ratios, weights, means) is ordinary autograd on ``(B, K)`` tensors. Probability targets and ``from_logits=False``
use plain autograd on gather/scatter sums (no one-hot for integer targets either). Speed and memory, measured
against a naive one-hot implementation and the memory-bandwidth floor: docs/performance.md.

``compile=True`` (every entry point; opt-in, ``TrainConfig.compile_loss`` in training) computes the same sums with
torch.compile'd kernels: for integer targets with logits ``_CompiledSums`` (one fused loop for forward, one for
the closed-form backward, nothing per pixel kept in between: about 2-3x the memory-bandwidth floor and 1.7-4x faster
than the eager kernel in the benchmark), otherwise the plain-autograd paths compiled whole. It compiles a graph
per input shape, option set and dtype (seconds each, cached on disk by Inductor); when nothing can be compiled (no
C++ compiler, or a compile error) a RuntimeWarning says why and the eager kernels compute the loss instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["CompoundLoss", "PELLoss", "dice_loss", "pel_loss", "pel_normalised"]

Region = Literal["pel", "dice", "none"]
PowerOf = Literal["prediction", "product"]
Denominator = Literal["sum", "jaccard"]
EmptyClasses = Literal["skip", "include"]
_REGIONS = ("pel", "dice", "none")
_POWER_OF = ("prediction", "product")
_DENOMINATORS = ("sum", "jaccard")
_EMPTY_CLASSES = ("skip", "include")

# Values per channel pair in one block of the fused kernel (2·_BLOCK / C pixels): the block's temporaries, a few
# hundred KiB each, stay in the L2/L3 caches between the dozen eager ops that work on them, while much smaller blocks
# pay PyTorch's per-op overhead (~5 us) too often. Measured best between 2^16 and 2^18 on the 2-core CI machines.
_BLOCK = 1 << 17


# ---------------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _Options:
    """The region-term options shared by every entry point, validated once."""

    n: float = 3.0
    power_of: PowerOf = "prediction"
    denominator: Denominator = "sum"
    batch: bool = False
    include_background: bool = True
    class_weights: tuple[float, ...] | None = None
    ignore_index: int | None = None
    from_logits: bool = True
    empty_classes: EmptyClasses = "skip"
    compile: bool = False

    def __post_init__(self) -> None:
        _check_positive("n", self.n)
        _check_choice("power_of", self.power_of, _POWER_OF)
        _check_choice("denominator", self.denominator, _DENOMINATORS)
        _check_choice("empty_classes", self.empty_classes, _EMPTY_CLASSES)
        for name in ("batch", "include_background", "from_logits", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.ignore_index is not None and (
            isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {self.ignore_index!r}")

    @property
    def r_max(self) -> float:
        """Largest value of I/D for hard labels: 1/2 with Σp+Σg, 1 with TP+FP+FN (both at a perfect prediction)."""
        return 0.5 if self.denominator == "sum" else 1.0


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_alpha_n(alpha: float, n: float) -> None:
    _check_positive("n", n)
    _check_positive("alpha", alpha)


def _class_weights(weights: Sequence[float] | Tensor | None) -> tuple[float, ...] | None:
    """Validate and freeze class weights: finite, >= 0, not all 0. The length is checked against K per call."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(f"class_weights must be one-dimensional, got shape {tuple(weights.shape)}")
        weights = weights.tolist()
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"class_weights must be a sequence of numbers, got {weights!r}") from None
    if not values or not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        raise ValueError(f"class_weights must be finite numbers >= 0, not all 0, got {values!r}")
    return values


def _options(**kwargs: Any) -> _Options:
    kwargs["class_weights"] = _class_weights(kwargs.get("class_weights"))
    return _Options(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Per-(patch, class) sums


@dataclass
class _Stats:
    """Per-(patch, class) sums plus what cross entropy needs, all float32 (or float64).

    sum_p, sum_g, sum_num: (B, K) with K the number of classes (2 for a 1-channel binary input); sum_num is the
    numerator Σpⁿg or Σ(p·g)ⁿ. sum_pg: (B, K) Σp·g, only for the "jaccard" denominator. ce_sum: scalar,
    Σ over valid pixels of −Σ_c g_c log p_c, only when asked for. num_valid: scalar, number of valid pixels.
    """

    sum_p: Tensor
    sum_g: Tensor
    sum_num: Tensor
    sum_pg: Tensor | None
    ce_sum: Tensor | None
    num_valid: Tensor


def _internal_dtype(logits: Tensor) -> torch.dtype:
    # Half-precision sums over a 512x512 patch overflow/lose all precision; float64 is kept for gradcheck.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _stats(logits: Tensor, target: Tensor, opts: _Options, *, need_ce: bool = False, fused: bool = True) -> _Stats:
    """Class sums of logits (B, C, *S) against target (B, *S) integer or (B, C, *S) float.

    ``fused=False`` forces the plain-autograd path for integer targets (the tests compare the two). ``opts.compile``
    computes the same sums with compiled kernels (_CompiledSums, or the plain-autograd paths compiled); when
    compiling is impossible a RuntimeWarning says why and the eager kernels run instead.
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, *S) with at least one spatial dim, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    b, c = logits.shape[:2]
    k = 2 if c == 1 else c
    if opts.class_weights is not None and len(opts.class_weights) != k:
        raise ValueError(f"class_weights must have one weight per class ({k}), got {len(opts.class_weights)}")
    need_pg = opts.denominator == "jaccard"
    if opts.compile:
        problem = _compile_problem(logits.device)
        if problem is not None:
            _warn_eager(problem)
            opts = dataclasses.replace(opts, compile=False)

    if target.is_floating_point():
        if opts.ignore_index is not None:
            raise ValueError("ignore_index only applies to integer targets, not probability targets")
        if target.shape != logits.shape:
            raise ValueError(
                f"probability target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return _stats_soft(logits, target, opts, need_pg, need_ce)

    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"integer target must be (B, *S) = {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(target.shape)}"
        )
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    x = logits.reshape(b, c, -1)
    t = target.reshape(b, -1)
    if fused and opts.from_logits and opts.compile:
        sum_p, sum_num, sum_pg, ce, sum_g, n_valid = _CompiledSums.apply(
            x, t, float(opts.n), opts.ignore_index, need_ce
        )
        return _Stats(sum_p, sum_g, sum_num, sum_pg if need_pg else None, ce if need_ce else None, n_valid)
    if fused and opts.from_logits:
        # Without a gradient to compute (no_grad, evaluation) the kernel keeps nothing for backward.
        keep = torch.is_grad_enabled() and logits.requires_grad
        sum_p, sum_num, sum_pg, ce, sum_g, n_valid = _FusedSums.apply(
            x, t, float(opts.n), opts.ignore_index, need_pg, need_ce, keep
        )
        return _Stats(sum_p, sum_g, sum_num, sum_pg if need_pg else None, ce if need_ce else None, n_valid)
    return _stats_int_autograd(x, t, opts, need_pg, need_ce)


def _label_error(k: int, ignore_index: int | None) -> ValueError:
    return ValueError(f"target labels must lie in [0, {k}) (or equal ignore_index={ignore_index})")


def _stats_int_autograd(x: Tensor, t: Tensor, opts: _Options, need_pg: bool, need_ce: bool) -> _Stats:
    """Integer targets with plain autograd: gather the target-class probability, scatter-add it per class.

    x (B, C, N) logits or probabilities, t (B, N). No (B, C, N) one-hot is built. With opts.compile the sums are
    one compiled graph (the label check stays outside: a data-dependent branch).
    """
    k = 2 if x.shape[1] == 1 else x.shape[1]
    labels = t.long() if opts.ignore_index is None else t.long()[t != opts.ignore_index]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise _label_error(k, opts.ignore_index)
    args = (x, t, opts.n, opts.ignore_index, opts.from_logits, need_pg, need_ce)
    return _Stats(*(_run_compiled(_int_sums, *args) if opts.compile else _int_sums(*args)))


def _int_sums(
    x: Tensor, t: Tensor, n: float, ignore_index: int | None, from_logits: bool, need_pg: bool, need_ce: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The _Stats fields of _stats_int_autograd, labels already checked."""
    b, c = x.shape[:2]
    k = 2 if c == 1 else c
    f = _internal_dtype(x)
    x = x.to(f)
    t = t.long()
    if ignore_index is not None:
        valid_bool = t != ignore_index
        # Ignored pixels get a safe in-range label; their weight 0 removes them from every sum and the gradient.
        t = torch.where(valid_bool, t, torch.zeros_like(t))
        valid: Tensor | None = valid_bool.to(f)
    else:
        valid = None

    if from_logits:
        # Log-space target probability: exact for saturated logits, and exp(n * log p) has a finite slope at
        # underflowed probabilities where p ** n would not (n < 1).
        if c == 1:
            xs = x[:, 0]
            logp_t = F.logsigmoid(torch.where(t == 1, xs, -xs))
            p_fg = torch.sigmoid(xs)
        else:
            logp_t = torch.log_softmax(x, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)
            probs = torch.softmax(x, dim=1)
        p_t = logp_t.exp()
        p_t_pow = torch.exp(n * logp_t)
        nll = -logp_t
    else:
        if c == 1:
            p_fg = x[:, 0]
            p_t = torch.where(t == 1, p_fg, 1 - p_fg)
        else:
            probs = x
            p_t = probs.gather(1, t.unsqueeze(1)).squeeze(1)
        # A probability of exactly 0 would give p ** (n - 1) = inf for n < 1 (and 0 * inf = NaN in autograd).
        tiny = torch.finfo(f).tiny
        p_t_pow = p_t.clamp_min(tiny).pow(n) if n < 1 else p_t.pow(n)
        nll = -p_t.clamp_min(tiny).log()

    if c == 1:
        if valid is None:
            fg = p_fg.sum(-1)
            n_pix = torch.full_like(fg, float(x.shape[-1]))
        else:
            fg = (p_fg * valid).sum(-1)
            n_pix = valid.sum(-1)
        sum_p = torch.stack([n_pix - fg, fg], dim=1)
    else:
        # A batched mat-vec sums the valid pixels without a (B, C, N) masked temporary.
        sum_p = probs.sum(-1) if valid is None else torch.bmm(probs, valid.unsqueeze(-1)).squeeze(-1)

    ones = torch.ones_like(p_t) if valid is None else valid
    zeros = torch.zeros(b, k, dtype=f, device=x.device)
    sum_g = zeros.scatter_add(1, t, ones)
    sum_num = zeros.scatter_add(1, t, p_t_pow if valid is None else p_t_pow * valid)
    sum_pg = zeros.scatter_add(1, t, p_t if valid is None else p_t * valid) if need_pg else None
    ce = (nll if valid is None else nll * valid).sum() if need_ce else None
    return sum_p, sum_g, sum_num, sum_pg, ce, ones.sum()


def _stats_soft(logits: Tensor, target: Tensor, opts: _Options, need_pg: bool, need_ce: bool) -> _Stats:
    """Probability targets (B, C, *S): plain autograd on (B, K, N) tensors (the target is dense anyway); with
    opts.compile one compiled graph."""
    args = (logits, target, opts.n, opts.power_of == "product", opts.from_logits, need_pg, need_ce)
    return _Stats(*(_run_compiled(_soft_sums, *args) if opts.compile else _soft_sums(*args)))


def _soft_sums(
    logits: Tensor, target: Tensor, n: float, product: bool, from_logits: bool, need_pg: bool, need_ce: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The _Stats fields of _stats_soft."""
    b, c = logits.shape[:2]
    f = _internal_dtype(logits)
    x = logits.to(f).reshape(b, c, -1)
    g = target.to(f).reshape(b, c, -1)
    if c == 1:
        g = torch.cat([1 - g, g], dim=1)
    if from_logits:
        logp = torch.cat([F.logsigmoid(-x), F.logsigmoid(x)], dim=1) if c == 1 else torch.log_softmax(x, dim=1)
        probs = logp.exp()
        p_pow = torch.exp(n * logp)  # finite slope where p underflows, see _stats_int_autograd
    else:
        probs = torch.cat([1 - x, x], dim=1) if c == 1 else x
        tiny = torch.finfo(f).tiny
        p_pow = probs.clamp_min(tiny).pow(n) if n < 1 else probs.pow(n)
        logp = probs.clamp_min(tiny).log()
    # (p·g)ⁿ = pⁿ·gⁿ; g is a constant, and 0ⁿ = 0 for n > 0.
    g_num = g.pow(n) if product else g
    sum_num = (p_pow * g_num).sum(-1)
    sum_pg = (probs * g).sum(-1) if need_pg else None
    ce = -(g * logp).sum() if need_ce else None
    n_valid = torch.full((), float(g.shape[0] * g.shape[-1]), dtype=f, device=x.device)
    return probs.sum(-1), g.sum(-1), sum_num, sum_pg, ce, n_valid


# ---------------------------------------------------------------------------------------------------------------
# The fused kernel: integer targets, logits in. Forward and closed-form backward, each one pass over the batch.


def _blocks(b: int, n: int, c: int) -> Iterator[tuple[int, int, int, int]]:
    """(b0, b1, i0, i1) blocks of about 2·_BLOCK values: whole patches when they are small, slices of one patch
    when they are large (their sums are accumulated)."""
    size = max(1, _BLOCK * 2 // max(c, 2))
    if n >= size:
        for i in range(b):
            for j in range(0, n, size):
                yield i, i + 1, j, min(n, j + size)
    else:
        step = max(1, size // max(n, 1))
        for i in range(0, b, step):
            yield i, min(b, i + step), 0, n


def _valid_into(out: Tensor, labels_f: Tensor, tb: Tensor, ignore_index: int) -> Tensor:
    """Write the valid mask (label != ignore_index) of a block into the float tensor ``out``."""
    if abs(ignore_index) < 2**24:
        # Compared in float (labels already converted): exact, since a float label equals an integer below 2^24
        # only if the label is that integer.
        torch.ne(labels_f, float(ignore_index), out=out)
    else:
        out.copy_(tb.ne(ignore_index))
    return out


def _as_f(x: Tensor, f: torch.dtype) -> Tensor:
    return x if x.dtype == f else x.to(f)


class _FusedSums(torch.autograd.Function):
    """(x (B, C, N) logits, t (B, N) integer labels) -> per-(patch, class) sums, all (B, K) in float32/64:

    sum_p = Σ v·p, sum_num = Σ v·p_tⁿ by class, sum_pg = Σ v·p_t by class (if need_pg, else zeros),
    ce = Σ v·(−log p_t) (if need_ce, else 0), and the non-differentiable sum_g (label counts) and num_valid.

    Backward, per pixel with target class t and a_c, e_c, f_c, h the incoming gradients of sum_p, sum_num, sum_pg,
    ce: ∂L/∂p_c = a_c + [c = t]·(n e_t p_tⁿ⁻¹ + f_t), pushed through the softmax analytically,
    ∂L/∂x_c = p_c·(a_c + h − Σ_k p_k a_k − w) + [c = t]·(w − h) with w = n e_t p_tⁿ + f_t p_t: no pⁿ⁻¹.
    Forward keeps only p_t (4 bytes per pixel); backward reads the labels (and, for C >= 3, the logits) again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        t: Tensor,
        n: float,
        ignore_index: int | None,
        need_pg: bool,
        need_ce: bool,
        keep: bool,
    ) -> tuple[Tensor, ...]:
        ctx.n, ctx.ignore_index, ctx.need_pg, ctx.need_ce = n, ignore_index, need_pg, need_ce
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        run = _binary_forward if x.shape[1] <= 2 else _softmax_forward
        outs, saved = run(x, t, n, ignore_index, need_ce, keep)
        ctx.save_for_backward(*saved)
        f = _internal_dtype(x)
        # Separate tensors (never views of one accumulator), so autograd treats each output on its own.
        sum_p, sum_num, sum_pg, ce, sum_g, n_valid = (o.to(f, copy=True) for o in outs)
        ctx.mark_non_differentiable(sum_g, n_valid)
        return sum_p, sum_num, sum_pg, ce, sum_g, n_valid

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_p: Tensor, g_num: Tensor, g_pg: Tensor, g_ce: Tensor, _g_g: Tensor, _g_nv: Tensor
    ) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        f = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
        grads = (g_p.to(f), g_num.to(f) * ctx.n, g_pg.to(f), g_ce.to(f).reshape(1, 1))
        run = _binary_backward if ctx.x_shape[1] <= 2 else _softmax_backward
        dx = run(ctx, ctx.saved_tensors, *grads)
        return (dx,) + (None,) * 6


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(Bc, m, L) x (Bc, k, L) -> (Bc, m, k): all row-by-row dot products of two blocks in one bmm."""
    return torch.bmm(a, b.transpose(1, 2))


def _first_block(blocks: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """(rows, pixels) of the first block, the largest: work buffers are allocated once at this size."""
    b0, b1, i0, i1 = blocks[0]
    return b1 - b0, i1 - i0


def _labels_into(work: Tensor, tb: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    """Labels of a block as float into work[:, 0] (0 where ignored) and the valid mask into work[:, 1]."""
    labels = work[:, 0]
    labels.copy_(tb)
    if ignore_index is None:
        return labels, None
    v = _valid_into(work[:, 1], labels, tb, ignore_index)
    labels.mul_(v)  # labels are finite, so an ignored label times 0 is exactly 0
    return labels, v


def _binary_forward(
    x: Tensor, t: Tensor, n: float, ignore_index: int | None, need_ce: bool, keep: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """1-channel sigmoid or 2-channel softmax: both are σ of one logit difference d (x1 − x0, or x0).

    Per pixel z = s·d with s = +1 for class 1 and −1 for class 0 is the target class's logit margin, so
    p_t = σ(z) and the other class has 1 − p_t: one sigmoid serves both classes. Kept for backward: p_t, 4 bytes
    per pixel (half of a two-class float one-hot); the labels are read again.
    """
    b, c, npix = x.shape
    f = _internal_dtype(x)
    dev = x.device
    blocks = list(_blocks(b, npix, c))
    bc0, ln0 = _first_block(blocks)
    pt_all = torch.empty(b, npix, dtype=f, device=dev) if keep else torch.empty(bc0, ln0, dtype=f, device=dev)
    # Rows g (the label: 1 for class 1, else 0), v (valid, only with ignore_index), p_tⁿ.
    rows = 2 if ignore_index is None else 3
    work = torch.empty(bc0, rows, ln0, dtype=f, device=dev)
    # Columns: Σp_t, Σg·p_t, Σg, Σg², Σp_tⁿ, Σg·p_tⁿ, Σv, Σ(−log p_t), all over valid pixels. Block sums are added in
    # float64 so that large batches keep float32's digits across blocks.
    acc = torch.zeros(b, 8, dtype=torch.float64, device=dev)
    for b0, b1, i0, i1 in blocks:
        bc, ln = b1 - b0, i1 - i0
        w = work[:bc, :, :ln]
        g, v = _labels_into(w, t[b0:b1, i0:i1], ignore_index)
        x0 = _as_f(x[b0:b1, 0, i0:i1], f)
        neg_d = x0 - x[b0:b1, 1, i0:i1] if c == 2 else torch.neg(x0)
        z = torch.addcmul(neg_d, g, neg_d, value=-2)  # −d + 2g·d = s·d (−d where ignored)
        pt = pt_all[b0:b1, i0:i1] if keep else pt_all[:bc, :ln]
        torch.sigmoid(z, out=pt)
        torch.pow(pt, n, out=w[:, -1])
        cols = acc[b0:b1]
        if v is None:
            sums, gdots = w.sum(-1), _rowdot(w[:, :1], w)[:, 0]  # Σg Σp_tⁿ, Σg² Σg·p_tⁿ
            cols[:, 0:6] += torch.stack(
                [pt.sum(-1), _rowdot(g.unsqueeze(1), pt.unsqueeze(1)).view(-1), sums[:, 0], gdots[:, 0]]
                + [sums[:, 1], gdots[:, 1]],
                1,
            )
            cols[:, 6] += ln
        else:
            # Rows g, v against g, v, p_tⁿ and against p_t.
            m, mp = _rowdot(w[:, :2], w), _rowdot(w[:, :2], pt.unsqueeze(1))[:, :, 0]
            cols[:, 0:7] += torch.stack(
                [mp[:, 1], mp[:, 0], m[:, 1, 0], m[:, 0, 0], m[:, 1, 2], m[:, 0, 2], m[:, 1, 1]], 1
            )
        if need_ce:
            nll = F.softplus(z.neg_())  # −log σ(z), exact for saturated logits
            cols[:, 7] += nll.sum(-1) if v is None else _rowdot(nll.unsqueeze(1), v.unsqueeze(1)).view(-1)
    pt_sum, pg1, g1, g_sq, ptn_sum, num1, v_sum, ce = acc.unbind(1)
    # Σg² = Σg exactly when every valid label is 0 or 1: t² − t = t(t − 1) > 0 for any other integer.
    if bool((g_sq > g1 + 0.5).any()):
        raise _label_error(2, ignore_index)
    return _binary_outs(pt_sum, pg1, g1, ptn_sum, num1, v_sum, ce), [pt_all, t] if keep else []


def _binary_outs(
    pt_sum: Tensor, pg1: Tensor, g1: Tensor, ptn_sum: Tensor, num1: Tensor, v_sum: Tensor, ce: Tensor
) -> list[Tensor]:
    """The two-class sums from the per-patch (B,) sums over valid pixels of p_t, g·p_t, g, p_tⁿ, g·p_tⁿ, 1, −log p_t
    (g = [label is 1]): [sum_p, sum_num, sum_pg, ce, sum_g, num_valid] as _FusedSums returns them."""
    g0 = v_sum - g1
    pg0 = pt_sum - pg1  # p_t summed over class-0 pixels = their class-0 probability
    # Class-1 probability mass: p_t on class-1 pixels plus 1 − p_t on class-0 pixels.
    p1 = pg1 + (g0 - pg0)
    sum_p = torch.stack([v_sum - p1, p1], 1)
    outs = [sum_p, torch.stack([ptn_sum - num1, num1], 1), torch.stack([pg0, pg1], 1), ce.sum()]
    return outs + [torch.stack([g0, g1], 1), v_sum.sum()]


def _binary_backward(ctx: Any, saved: tuple[Tensor, ...], a: Tensor, e: Tensor, fpg: Tensor, h: Tensor) -> Tensor:
    """∂L/∂d = (1 − p_t)·[Δ p_t + s·(n e_t p_tⁿ + f_t p_t − h)] with Δ = a1 − a0; ∂x1 = ∂d, ∂x0 = −∂d.

    With s = 2g − 1 = ±1 the class selection is affine in g: s·q_t = −q_0 + g·(q_1 + q_0) for any per-class q.
    """
    pt_all, t = saved
    b, c, npix = ctx.x_shape
    f = pt_all.dtype
    dev = pt_all.device
    dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=dev)
    e_lo, e_span = -e[:, :1], e[:, :1] + e[:, 1:]
    delta = a[:, 1:] - a[:, :1]
    f_lo, f_span = delta - fpg[:, :1], fpg[:, :1] + fpg[:, 1:]
    blocks = list(_blocks(b, npix, c))
    bc0, ln0 = _first_block(blocks)
    work = torch.empty(bc0, 2, ln0, dtype=f, device=dev)
    for b0, b1, i0, i1 in blocks:
        g, v = _labels_into(work[: b1 - b0, :, : i1 - i0], t[b0:b1, i0:i1], ctx.ignore_index)
        pt = pt_all[b0:b1, i0:i1]
        grad = torch.addcmul(e_lo[b0:b1], g, e_span[b0:b1]).mul_(pt.pow(ctx.n))
        if ctx.need_pg:
            grad.addcmul_(pt, torch.addcmul(f_lo[b0:b1], g, f_span[b0:b1]))
        else:
            grad.addcmul_(pt, delta[b0:b1])
        if ctx.need_ce:
            grad.add_(h).addcmul_(g, h, value=-2)  # −s·h
        if v is not None:
            grad.mul_(v)
        out = dx[b0:b1, c - 1, i0:i1]
        if out.dtype == f:
            torch.mul(grad, torch.rsub(pt, 1), out=out)
        else:
            out.copy_(grad.mul_(torch.rsub(pt, 1)))
        if c == 2:
            torch.neg(out, out=dx[b0:b1, 0, i0:i1])
    return dx


def _softmax_block(
    xb: Tensor, tb: Tensor, work: Tensor, p: Tensor, onehot: Tensor, classes: Tensor, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Softmax of a (Bc, C, L) block into p (0 at ignored pixels) and its one-hot into onehot (float, 0 at ignored
    pixels): the one-hot of one block only, never of the whole batch. Returns (p, onehot, valid mask or None)."""
    labels, v = _labels_into(work, tb, ignore_index)
    torch.eq(labels.unsqueeze(1), classes, out=onehot)
    torch.softmax(_as_f(xb, p.dtype), dim=1, out=p)
    if v is not None:
        p.mul_(v.unsqueeze(1))
        onehot.mul_(v.unsqueeze(1))  # an ignored pixel's label was set to 0, a class
    return p, onehot, v


def _softmax_forward(
    x: Tensor, t: Tensor, n: float, ignore_index: int | None, need_ce: bool, keep: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """C >= 3: softmax per block, the block's one-hot in float, bmm class sums. Kept for backward: p_t, 4 bytes
    per pixel; backward reads the logits and labels again and recomputes the softmax."""
    b, c, npix = x.shape
    f = _internal_dtype(x)
    dev = x.device
    blocks = list(_blocks(b, npix, c))
    bc0, ln0 = _first_block(blocks)
    pt_all = torch.empty(b, npix, dtype=f, device=dev) if keep else torch.empty(bc0, ln0, dtype=f, device=dev)
    work = torch.empty(bc0, 2, ln0, dtype=f, device=dev)
    p_buf = torch.empty(bc0, c, ln0, dtype=f, device=dev)
    oh_buf = torch.empty(bc0, c, ln0, dtype=f, device=dev)
    classes = torch.arange(c, dtype=f, device=dev).view(1, c, 1)
    # Columns per class: Σp, Σ_{t=c} p_t, Σ_{t=c} p_tⁿ, Σ_{t=c} 1; block sums added in float64.
    acc = torch.zeros(b, c, 4, dtype=torch.float64, device=dev)
    ce = torch.zeros((), dtype=torch.float64, device=dev)
    n_valid = torch.zeros((), dtype=torch.float64, device=dev)
    for b0, b1, i0, i1 in blocks:
        bc, ln = b1 - b0, i1 - i0
        xb = x[b0:b1, :, i0:i1]
        p, oh, v = _softmax_block(
            xb, t[b0:b1, i0:i1], work[:bc, :, :ln], p_buf[:bc, :, :ln], oh_buf[:bc, :, :ln], classes, ignore_index
        )
        pt = _pick(p, oh, out=pt_all[b0:b1, i0:i1] if keep else pt_all[:bc, :ln])
        cols = acc[b0:b1]
        cols[:, :, 0] += p.sum(-1)
        cols[:, :, 1:3] += _rowdot(oh, torch.stack([pt, pt.pow(n)], 1))
        cols[:, :, 3] += oh.sum(-1)
        n_valid += v.sum() if v is not None else bc * ln
        if need_ce:
            # −log p_t = logsumexp − x_t = (x_max − log p_max) − x_t: exact, as p_max >= 1/C never underflows.
            xf = _as_f(xb, f)
            p_max = p.amax(1) if v is None else p.amax(1).add_(1 - v)  # ignored pixels: p = 0, use 1 (log 0 = −inf)
            nll = xf.amax(1).sub_(p_max.log_()).sub_(_pick(xf, oh))
            ce += nll.sum() if v is None else torch.dot(nll.reshape(-1), v.reshape(-1))
    sum_g = acc[:, :, 3]
    # A valid label outside [0, C) matches no class, so the class counts miss it.
    if abs(float(sum_g.sum()) - float(n_valid)) > 0.5:
        raise _label_error(c, ignore_index)
    outs = [acc[:, :, 0], acc[:, :, 2], acc[:, :, 1], ce, sum_g, n_valid]
    return outs, [x, pt_all, t] if keep else []


def _pick(p: Tensor, onehot: Tensor, out: Tensor | None = None) -> Tensor:
    """Σ_c p[:, c]·onehot[:, c] -> (Bc, L): the target class's value, as C cheap per-channel ops."""
    res = torch.mul(p[:, 0], onehot[:, 0], out=out) if out is not None else p[:, 0] * onehot[:, 0]
    for k in range(1, p.shape[1]):
        res.addcmul_(p[:, k], onehot[:, k])
    return res


def _softmax_backward(ctx: Any, saved: tuple[Tensor, ...], a: Tensor, e: Tensor, fpg: Tensor, h: Tensor) -> Tensor:
    """∂L/∂x_c = p_c·(a_c + h − Σ_k p_k a_k − w) + [c = t]·(w − h), w = n e_t p_tⁿ + f_t p_t (p = 0 where ignored)."""
    x, pt_all, t = saved
    b, c, npix = ctx.x_shape
    f = pt_all.dtype
    dev = pt_all.device
    dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=dev)
    classes = torch.arange(c, dtype=f, device=dev).view(1, c, 1)
    a_row = a.unsqueeze(1)  # (B, 1, C)
    a_h = (a + h).unsqueeze(2)  # (B, C, 1); CE adds h·p_c here and −h·[c = t] below
    coef = torch.stack([e, fpg], 1) if ctx.need_pg else e.unsqueeze(1)  # (B, 1 or 2, C)
    blocks = list(_blocks(b, npix, c))
    bc0, ln0 = _first_block(blocks)
    work = torch.empty(bc0, 2, ln0, dtype=f, device=dev)
    p_buf = torch.empty(bc0, c, ln0, dtype=f, device=dev)
    oh_buf = torch.empty(bc0, c, ln0, dtype=f, device=dev)
    for b0, b1, i0, i1 in blocks:
        bc, ln = b1 - b0, i1 - i0
        p, oh, _ = _softmax_block(
            x[b0:b1, :, i0:i1],
            t[b0:b1, i0:i1],
            work[:bc, :, :ln],
            p_buf[:bc, :, :ln],
            oh_buf[:bc, :, :ln],
            classes,
            ctx.ignore_index,
        )
        pt = pt_all[b0:b1, i0:i1]
        per_pixel = torch.bmm(coef[b0:b1], oh)  # (Bc, 1 or 2, L): n e_t [, f_t]
        w = per_pixel[:, 0].mul_(pt.pow(ctx.n))
        if ctx.need_pg:
            w.addcmul_(per_pixel[:, 1], pt)
        zsum = torch.bmm(a_row[b0:b1], p).squeeze(1).add_(w)  # Σ_k p_k a_k + w
        grad = torch.sub(a_h[b0:b1], zsum.unsqueeze(1)).mul_(p)
        out = dx[b0:b1, :, i0:i1]
        if out.dtype == f:
            torch.addcmul(grad, oh, (w - h).unsqueeze(1), out=out)
        else:
            out.copy_(grad.addcmul_(oh, (w - h).unsqueeze(1)))
    return dx


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernel (opt-in, ``compile=True``): the same sums and closed-form gradient as _FusedSums, each written
# as one whole-tensor function that torch.compile (Inductor) turns into a single loop over the pixels. Forward
# reads logits and labels once; backward reads them again (recomputing p rather than keeping it) and writes the
# gradient: the 12·C + 2·label bytes per pixel of the physical floor. Everything after the (B, K) sums is the same
# eager code as without compile, so pooling, the DDP all-reduce and the reduction are shared.

# Pixels per reduction row. A patch is viewed as R rows of L pixels (a view, no copy), the kernels sum each row in
# float32 and the (B, R) partial sums are added in float64, like _FusedSums's blocks. Inductor keeps the sums of a
# row of at most 4096 values in registers; longer rows go through its cascade-sum helper, which measured no faster
# here, and a row of a whole 3D patch (millions of pixels) 2-3x slower.
_ROW = 1 << 12
# The kernels take exp(y) as exp2(y·log2 e). Inductor writes any reused per-pixel value computed with exp (its list
# of "heavy" ops, which exp2 is not on) to memory and reads it back in a loop of its own: 8 bytes per pixel of
# traffic and a second pass over the inputs, where exp2 leaves everything in one loop. The product's rounding costs
# about |y|·2^-24 relative in float32 (1e-6 at |y| = 10), below the float32 sums' own rounding.
_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=64)
def _row_length(npix: int) -> int:
    """The largest divisor of npix in [_ROW / 16, _ROW], or npix itself (small patches, or no such divisor: then
    correct, only slower)."""
    if npix > _ROW:
        for length in range(_ROW, _ROW // 16 - 1, -1):
            if npix % length == 0:
                return length
    return npix


def _with_logits(col: Tensor, d: Tensor) -> Tensor:
    """col itself, made to read d: Inductor gives sums of the labels alone a loop of their own (their index space
    merges the batch and row dims, which the logits' cannot), and that loop reads the labels a second time."""
    return torch.where(d > 0, col, col)


def _binary_sums_kernel(x: Tensor, t: Tensor, n: float, ignore_index: Tensor | None, need_ce: bool) -> Tensor:
    """x (B, C<=2, R, L), t (B, R, L) -> (B, R, 8 to 10) row sums over valid pixels of p_0, p_1 (class
    probabilities), [t = 0]·p_t, [t = 1]·p_t, [t = 0]·p_tⁿ, [t = 1]·p_tⁿ, [t = 1], [t not in {0, 1}], then 1 (only
    with ignore_index; else the count is known) and −log p_t (only with need_ce). See _binary_forward for the
    margin z. Each class gets its own sums: a class's mass recovered as a difference (count − the other's) loses
    float32's digits when the class is rare, as nuclei often are."""
    f = _internal_dtype(x)
    x0 = x[:, 0].to(f)
    d = x[:, 1].to(f) - x0 if x.shape[1] == 2 else x0
    # 0/1 tests on the labels converted to float: exact (only the integers 0 and 1 convert to 0.0 and 1.0) and
    # cheaper per pixel than int64 compares, whose masks must be converted for every float select.
    label = t.to(f)
    one = label == 1
    zero = label == 0
    z = torch.where(one, d, -d)
    # p_t = σ(z) and q = 1 − p_t = σ(−z) from one exp that cannot overflow: q is accurate where p_t is near 1
    # (a well-predicted pixel), which 1 − p_t is not.
    e = torch.exp2(z.abs() * -_LOG2E)  # exp2, not exp: see _LOG2E
    big = 1 / (1 + e)
    small = e * big
    pt, q = torch.where(z >= 0, big, small), torch.where(z >= 0, small, big)
    ptn = pt.pow(n)
    bad = ~(zero | one)
    if ignore_index is not None:
        valid = t.long() != ignore_index
        zero, one, bad = zero & valid, one & valid, bad & valid
    # p_1 = p_t on class-1 pixels and 1 − p_t on the others (a bad label raises after the sums, so what it adds
    # does not matter; ignored pixels add nothing).
    p0, p1 = torch.where(one, q, pt), torch.where(one, pt, q)
    if ignore_index is not None:
        p0, p1 = torch.where(valid, p0, 0), torch.where(valid, p1, 0)
    cols = [p0, p1, torch.where(zero, pt, 0), torch.where(one, pt, 0), torch.where(zero, ptn, 0)]
    counts = [one.to(f), bad.to(f)] + ([valid.to(f)] if ignore_index is not None else [])
    cols += [torch.where(one, ptn, 0)] + [_with_logits(col, d) for col in counts]
    if need_ce:
        nll = F.softplus(-z)  # −log σ(z), exact for saturated logits
        cols.append(nll if ignore_index is None else nll * valid.to(f))
    return torch.stack([col.sum(-1) for col in cols], -1)


def _binary_grad_kernel(x: Tensor, t: Tensor, coef: Tensor, n: float, ignore_index: Tensor | None) -> Tensor:
    """The gradient of _binary_backward for x (B, C<=2, R, L), t (B, R, L); coef (B, 5): −e_0, e_0 + e_1,
    Δ − f_0, f_0 + f_1, h, all per patch. The terms of sum_pg and ce are always computed (their coefficients are 0
    when unused): one graph fewer to compile for a few multiply-adds per pixel."""
    f = _internal_dtype(x)
    x0 = x[:, 0].to(f)
    d = x[:, 1].to(f) - x0 if x.shape[1] == 2 else x0
    one = t.to(f) == 1  # exact, see _binary_sums_kernel
    if ignore_index is not None:
        one = one & (t.long() != ignore_index)
    pt = torch.sigmoid(torch.where(one, d, -d))
    g = one.to(f)
    e_lo, e_span, f_lo, f_span, h = (col.view(-1, 1, 1) for col in coef.unbind(1))
    grad = (e_lo + g * e_span) * pt.pow(n) + pt * (f_lo + g * f_span) + h * (1 - 2 * g)  # the last: −s·h
    if ignore_index is not None:
        grad = torch.where(t.long() != ignore_index, grad, 0)
    d1 = (grad * (1 - pt)).to(x.dtype)
    return torch.stack([-d1, d1], 1) if x.shape[1] == 2 else d1.unsqueeze(1)


def _softmax_parts(
    x: Tensor, t: Tensor, ignore_index: Tensor | None
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Per channel: softmax p_c (a max, C exps and one reciprocal per pixel) and the hit masks [t = c] of valid
    pixels; plus the logsumexp and the valid mask (all in the internal dtype)."""
    f = _internal_dtype(x)
    xs = [x[:, k].to(f) for k in range(x.shape[1])]
    m = functools.reduce(torch.maximum, xs)
    es = [torch.exp2((xk - m) * _LOG2E) for xk in xs]  # exp2, not exp: see _LOG2E
    total = functools.reduce(torch.add, es)
    inv = 1 / total
    valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t.long() != ignore_index
    label = t.to(f)  # class tests in float: exact for integers, as only k converts to k.0 (k < 2^24)
    hits = [(label == k) & valid for k in range(len(xs))]
    return [e * inv for e in es], hits, m + torch.log(total), valid


def _pick_where(values: list[Tensor], hits: list[Tensor]) -> Tensor:
    """Σ_c [t = c]·values[c] as a chain of selects (0 where no class is hit)."""
    out = torch.where(hits[0], values[0], 0)
    for val, hit in zip(values[1:], hits[1:], strict=True):
        out = torch.where(hit, val, out)
    return out


def _softmax_sums_kernel(
    x: Tensor, t: Tensor, n: float, ignore_index: Tensor | None, need_ce: bool
) -> tuple[Tensor, Tensor]:
    """x (B, C>=3, R, L), t (B, R, L) -> row sums (B, R, C, 4) per class over valid pixels of p_c, [t = c]·p_t,
    [t = c]·p_tⁿ, [t = c]; and (B, R, 2) of 1 (only with ignore_index; else 0 and the count is known) and −log p_t
    (only with need_ce; else 0). The valid labels outside [0, C) are the valid count minus the class counts.

    [t = c]·p_t is taken as [t = c]·p_c: a p_t picked out of the C probabilities would be a tensor used by several
    sums, which Inductor writes to memory and reads back (4 bytes per pixel each way) rather than recompute."""
    p, hits, lse, valid = _softmax_parts(x, t, ignore_index)
    f = p[0].dtype
    d = x[:, 0]
    v = valid.to(f)
    per_class = []
    for pk, hit in zip(p, hits, strict=True):
        hit_p = torch.where(hit, pk, 0)
        hk = _with_logits(hit.to(f), d)
        per_class.append(torch.stack([(pk * v).sum(-1), hit_p.sum(-1), hit_p.pow(n).sum(-1), hk.sum(-1)], -1))
    zeros = v.new_zeros(v.shape[:-1])
    v_sum = _with_logits(v, d).sum(-1) if ignore_index is not None else zeros
    if need_ce:
        xt = _pick_where([x[:, k].to(f) for k in range(x.shape[1])], hits)
        nll = ((lse - xt) * v).sum(-1)
    return torch.stack(per_class, 2), torch.stack([v_sum, nll if need_ce else zeros], -1)


def _softmax_grad_kernel(
    x: Tensor, t: Tensor, coef: Tensor, h: Tensor, n: float, ignore_index: Tensor | None
) -> Tensor:
    """The gradient of _softmax_backward for x (B, C>=3, R, L), t (B, R, L); coef (B, 3, C): a, n·e, f per class
    (f = 0 when sum_pg is unused); h the (1, 1) gradient of the cross-entropy sum."""
    p, hits, _, valid = _softmax_parts(x, t, ignore_index)
    a, e, fpg = (row.view(row.shape[0], -1, 1, 1) for row in coef.unbind(1))  # (B, C, 1, 1) each
    c = len(p)
    pt = _pick_where(p, hits)
    w = _pick_where([e[:, k] for k in range(c)], hits) * pt.pow(n)
    w = w + _pick_where([fpg[:, k] for k in range(c)], hits) * pt
    h = h.view(1, 1, 1)
    zsum = functools.reduce(torch.add, [p[k] * a[:, k] for k in range(c)]) + w  # Σ_k p_k a_k + w
    grads = [
        torch.where(valid, p[k] * (a[:, k] + h - zsum) + torch.where(hits[k], w - h, 0), 0).to(x.dtype)
        for k in range(c)
    ]
    return torch.stack(grads, 1)


# Compiled wrappers, one per kernel, made on first use. dynamic=False: a graph per input shape (and option set and
# dtype), since Inductor's shape-generic kernels for these reductions measured 2-3x slower than static ones;
# training uses one patch shape and batch size, so it compiles once or twice. fullgraph=True: a graph break would
# be a bug here, better an error than a slow kernel.
_COMPILED: dict[str, Callable[..., Any]] = {}
# Inductor writes a per-pixel value that several sums use to memory and reads it back in another loop when the value
# reads many inputs or takes many ops to compute, as the softmax over C channels does: 8 bytes per pixel of traffic
# and a second pass, where recomputing it costs nothing (CSE keeps one copy per loop). Raising the thresholds made
# _softmax_sums_kernel one loop and 2x faster (2.5 against 5.4 ms at 16x4x256x256), left the binary kernels as they
# were and made _softmax_grad_kernel slower (3.8 against 2.9 ms), so only the former gets them.
_INDUCTOR_OPTIONS = {
    "_softmax_sums_kernel": {"realize_reads_threshold": 1 << 10, "realize_cpu_opcount_threshold": 1 << 10}
}
# Set on the first failure to compile; the process then stays on the eager kernel (see _compile_problem).
_COMPILE_ERROR: list[str] = []


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    if fn.__name__ not in _COMPILED:
        # Each shape, option set and dtype is a graph of its own, and past Dynamo's default of 8 graphs per function
        # it would quietly run the function uncompiled (slow). Raised once, process-wide (a per-call config.patch
        # costs ~40 us); never lowered.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[fn.__name__] = torch.compile(
            fn, dynamic=False, fullgraph=True, options=_INDUCTOR_OPTIONS.get(fn.__name__)
        )
    return _COMPILED[fn.__name__]


@functools.lru_cache(maxsize=8)
def _cxx_problem(cxx: tuple[str | None, ...]) -> str | None:
    """Why Inductor's C++ backend cannot build kernels with these compiler candidates, or None."""
    try:
        from torch._inductor.cpp_builder import cpp_compiler_search

        cpp_compiler_search(cxx)
    except Exception as exc:  # InvalidCxxCompiler, or a torch without this internal helper
        return f"no working C++ compiler among {[c for c in cxx if c]} ({type(exc).__name__})"
    return None


def _compile_problem(device: torch.device) -> str | None:
    """Why compile=True cannot be honoured for tensors on this device, or None."""
    if _COMPILE_ERROR:
        return _COMPILE_ERROR[0]
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx
        return _cxx_problem(tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,))
    return None


def _warn_eager(problem: str) -> None:
    warnings.warn(
        f"pel.losses: compile=True, but torch.compile cannot be used ({problem}); computing with the eager "
        "kernel instead (the same values, slower)",
        RuntimeWarning,
        stacklevel=4,
    )


def _run_compiled(fn: Callable[..., Any], *args: Any) -> Any:
    """fn compiled; if compiling fails, the failure is recorded, a warning is given, and fn runs uncompiled (the
    same code, so the same numbers)."""
    if not _COMPILE_ERROR:
        try:
            return _compiled(fn)(*args)
        except Exception as exc:  # Inductor's compile errors have no common public base class
            _COMPILE_ERROR.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    _warn_eager(_COMPILE_ERROR[0])
    return fn(*args)


class _CompiledSums(torch.autograd.Function):
    """_FusedSums (same arguments, outputs and gradient) with the per-pixel work done by compiled kernels.

    Nothing per pixel is kept for backward but the inputs themselves (saved, not copied).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, t: Tensor, n: float, ignore_index: int | None, need_ce: bool
    ) -> tuple[Tensor, ...]:
        b, c, npix = x.shape
        length = _row_length(npix)
        xr, tr = x.reshape(b, c, npix // length, length), t.reshape(b, npix // length, length)
        ctx.n, ctx.x_shape = n, x.shape
        # A tensor, not an int: Dynamo would compile a graph per value (it specialises ints 0 and 1).
        ii = None if ignore_index is None else torch.tensor(ignore_index, dtype=torch.int64, device=x.device)
        ctx.save_for_backward(xr, tr, ii)
        f = _internal_dtype(x)
        if c <= 2:
            acc = _run_compiled(_binary_sums_kernel, xr, tr, n, ii, need_ce).to(torch.float64).sum(1)
            if bool((acc[:, 7] > 0.5).any()):
                raise _label_error(2, ignore_index)
            v_sum = acc[:, 8] if ii is not None else torch.full_like(acc[:, 0], float(npix))
            ce = acc[:, -1].sum() if need_ce else torch.zeros((), dtype=acc.dtype, device=acc.device)
            g = torch.stack([v_sum - acc[:, 6], acc[:, 6]], 1)
            outs = [acc[:, 0:2], acc[:, 4:6], acc[:, 2:4], ce, g, v_sum.sum()]
        else:
            per_class, per_row = _run_compiled(_softmax_sums_kernel, xr, tr, n, ii, need_ce)
            acc, rows = per_class.to(torch.float64).sum(1), per_row.to(torch.float64).sum((0, 1))
            n_valid = rows[0] if ii is not None else torch.full_like(rows[0], float(b * npix))
            # Every valid pixel with a label in [0, C) is counted by exactly one class: these counts are exact.
            if float(n_valid - acc[:, :, 3].sum()) > 0.5:
                raise _label_error(c, ignore_index)
            outs = [acc[:, :, 0], acc[:, :, 2], acc[:, :, 1], rows[1], acc[:, :, 3], n_valid]
        sum_p, sum_num, sum_pg, ce, sum_g, n_valid = (o.to(f, copy=True) for o in outs)
        ctx.mark_non_differentiable(sum_g, n_valid)
        return sum_p, sum_num, sum_pg, ce, sum_g, n_valid

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_p: Tensor, g_num: Tensor, g_pg: Tensor, g_ce: Tensor, _g_g: Tensor, _g_nv: Tensor
    ) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        xr, tr, ii = ctx.saved_tensors
        f = _internal_dtype(xr)
        a, e, fpg, h = g_p.to(f), g_num.to(f) * ctx.n, g_pg.to(f), g_ce.to(f).reshape(1, 1)
        if ctx.x_shape[1] <= 2:
            delta = a[:, 1] - a[:, 0]
            coef = torch.stack(
                [-e[:, 0], e[:, 0] + e[:, 1], delta - fpg[:, 0], fpg[:, 0] + fpg[:, 1], h.view(1).expand_as(delta)], 1
            )
            dx = _run_compiled(_binary_grad_kernel, xr, tr, coef, ctx.n, ii)
        else:
            coef = torch.stack([a, e, fpg], 1)
            dx = _run_compiled(_softmax_grad_kernel, xr, tr, coef, h, ctx.n, ii)
        return (dx.reshape(ctx.x_shape),) + (None,) * 4


# ---------------------------------------------------------------------------------------------------------------
# Pooling, ratios, reduction


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (every rank's loss uses the total)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _pool(stats: _Stats, batch: bool) -> _Stats:
    """batch=True: one row with the sums over the batch, and over all ranks under an initialised process group."""
    if not batch:
        return stats
    parts = [stats.sum_p, stats.sum_g, stats.sum_num] + ([stats.sum_pg] if stats.sum_pg is not None else [])
    pooled = torch.stack([p.sum(0) for p in parts])  # (3 or 4, K): one collective for all of them
    if _distributed():
        pooled = _AllReduceSum.apply(pooled)
    rows = [r.unsqueeze(0) for r in pooled.unbind(0)]
    return _Stats(rows[0], rows[1], rows[2], rows[3] if len(rows) > 3 else None, stats.ce_sum, stats.num_valid)


def _ratio_present(stats: _Stats, opts: _Options) -> tuple[Tensor, Tensor]:
    """(I / D, present) per row and class, (R, K) each; absent classes get a safe denominator."""
    present = stats.sum_g > 0
    denom = stats.sum_p + stats.sum_g
    if opts.denominator == "jaccard":
        assert stats.sum_pg is not None
        denom = denom - stats.sum_pg  # TP + FP + FN = Σpg + (Σp − Σpg) + (Σg − Σpg)
    # An absent class has numerator 0 (g = 0); where its denominator is 0 too, 0/1 scores it exactly 1.
    denom = torch.where(present | (denom > 0), denom, torch.ones_like(denom))
    return stats.sum_num / denom, present


def _reduce(per_class: Tensor, present: Tensor, opts: _Options) -> Tensor:
    """Weighted mean over the scored classes of each row, then mean over rows with any scored class.

    per_class, present: (R, K). With nothing scored anywhere the result is a 0 that is still attached to the graph
    (through per_class), so backward() and DDP's hooks work. No host synchronisation, no data-dependent shapes.
    """
    w = present.to(per_class.dtype) if opts.empty_classes == "skip" else torch.ones_like(per_class)
    if opts.class_weights is not None or not opts.include_background:
        k = per_class.shape[1]
        weights = torch.tensor(opts.class_weights or (1.0,) * k, dtype=per_class.dtype, device=per_class.device)
        if not opts.include_background:
            weights[0] = 0.0
        w = w * weights
    w_sum = w.sum(1)
    # where() rather than multiply: an unscored class's value is finite here, but masking keeps it out of the graph.
    per_row = (torch.where(w > 0, per_class, 0) * w).sum(1) / w_sum.clamp_min(torch.finfo(w.dtype).tiny)
    has_any = (w_sum > 0).to(per_class.dtype)
    return (per_row * has_any).sum() / has_any.sum().clamp_min(1)


def _region(stats: _Stats, opts: _Options, scale: float) -> Tensor:
    """Reduced ``1 - scale * I / D`` (scale = alpha for raw PEL, 1 / r_max for L_norm); stats already pooled."""
    ratio, present = _ratio_present(stats, opts)
    return _reduce(1 - scale * ratio, present, opts)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def pel_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 20.0,
    n: float = 3.0,
    power_of: PowerOf = "prediction",
    denominator: Denominator = "sum",
    batch: bool = False,
    include_background: bool = True,
    class_weights: Sequence[float] | Tensor | None = None,
    ignore_index: int | None = None,
    from_logits: bool = True,
    empty_classes: EmptyClasses = "skip",
    compile: bool = False,
) -> Tensor:
    """Raw PEL ``1 - alpha * I / D``, reduced per patch or pooled (see the module docstring). Scalar tensor.

    logits (B, C, *S) float (probabilities with ``from_logits=False``); target (B, *S) integer labels or
    (B, C, *S) probabilities. With hard labels and the default "sum" denominator the value lies in
    [1 - alpha/2, 1] (n >= 1/2): -9 at a perfect prediction for alpha = 20. ``compile=True``: the same value from
    compiled kernels (module docstring).
    """
    _check_positive("alpha", alpha)
    opts = _options(
        n=n,
        power_of=power_of,
        denominator=denominator,
        batch=batch,
        include_background=include_background,
        class_weights=class_weights,
        ignore_index=ignore_index,
        from_logits=from_logits,
        empty_classes=empty_classes,
        compile=compile,
    )
    stats = _pool(_stats(logits, target, opts), opts.batch)
    return _region(stats, opts, float(alpha))


def pel_normalised(
    logits: Tensor,
    target: Tensor,
    *,
    n: float = 3.0,
    power_of: PowerOf = "prediction",
    denominator: Denominator = "sum",
    batch: bool = False,
    include_background: bool = True,
    class_weights: Sequence[float] | Tensor | None = None,
    ignore_index: int | None = None,
    from_logits: bool = True,
    empty_classes: EmptyClasses = "skip",
    compile: bool = False,
) -> Tensor:
    """L_norm ``1 - (I / D) / r_max`` in [0, 1] (hard labels), reduced as pel_loss. Scalar tensor.

    r_max = 1/2 for the "sum" denominator (L_norm = 1 - 2I/(Σp+Σg)), 1 for "jaccard". Raw PEL =
    (1 - alpha r_max) + alpha r_max L_norm with the same options, so this is the value to log and compare
    across alphas.
    """
    opts = _options(
        n=n,
        power_of=power_of,
        denominator=denominator,
        batch=batch,
        include_background=include_background,
        class_weights=class_weights,
        ignore_index=ignore_index,
        from_logits=from_logits,
        empty_classes=empty_classes,
        compile=compile,
    )
    stats = _pool(_stats(logits, target, opts), opts.batch)
    return _region(stats, opts, 1 / opts.r_max)


def dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    denominator: Denominator = "sum",
    batch: bool = False,
    include_background: bool = True,
    class_weights: Sequence[float] | Tensor | None = None,
    ignore_index: int | None = None,
    from_logits: bool = True,
    empty_classes: EmptyClasses = "skip",
    compile: bool = False,
) -> Tensor:
    """Soft Dice loss ``1 - 2Σpg/(Σp+Σg)`` (L_norm with n = 1), reduced as pel_loss. Scalar tensor.

    ``denominator="jaccard"`` gives the soft Jaccard (IoU) loss ``1 - Σpg/(Σp+Σg−Σpg)`` instead.
    """
    return pel_normalised(
        logits,
        target,
        n=1.0,
        denominator=denominator,
        batch=batch,
        include_background=include_background,
        class_weights=class_weights,
        ignore_index=ignore_index,
        from_logits=from_logits,
        empty_classes=empty_classes,
        compile=compile,
    )


class PELLoss(nn.Module):
    """Module twin of :func:`pel_loss`: ``forward(logits (B, C, *S), target) -> scalar`` raw PEL, same options."""

    def __init__(
        self,
        *,
        alpha: float = 20.0,
        n: float = 3.0,
        power_of: PowerOf = "prediction",
        denominator: Denominator = "sum",
        batch: bool = False,
        include_background: bool = True,
        class_weights: Sequence[float] | Tensor | None = None,
        ignore_index: int | None = None,
        from_logits: bool = True,
        empty_classes: EmptyClasses = "skip",
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_alpha_n(alpha, n)
        self.alpha = float(alpha)
        self.n = float(n)
        self.power_of = power_of
        self.denominator = denominator
        self.batch = batch
        self.include_background = include_background
        self.class_weights = _class_weights(class_weights)
        self.ignore_index = ignore_index
        self.from_logits = from_logits
        self.empty_classes = empty_classes
        self.compile_kernel = compile  # not "compile": that would hide nn.Module.compile
        self._opts()  # fail at construction, not at the first batch

    def _opts(self) -> _Options:
        # Built per call (a few microseconds) so the public attributes stay plain and assignable.
        return _options(
            n=self.n,
            power_of=self.power_of,
            denominator=self.denominator,
            batch=self.batch,
            include_background=self.include_background,
            class_weights=self.class_weights,
            ignore_index=self.ignore_index,
            from_logits=self.from_logits,
            empty_classes=self.empty_classes,
            compile=self.compile_kernel,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_positive("alpha", self.alpha)
        opts = self._opts()
        stats = _pool(_stats(logits, target, opts), opts.batch)
        return _region(stats, opts, self.alpha)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, n={self.n}, power_of={self.power_of!r}, denominator={self.denominator!r}, "
            f"batch={self.batch}, include_background={self.include_background}, "
            f"class_weights={self.class_weights}, ignore_index={self.ignore_index}, from_logits={self.from_logits}, "
            f"empty_classes={self.empty_classes!r}, compile={self.compile_kernel}"
        )


class CompoundLoss(nn.Module):
    """``region_weight * region + ce_weight * cross_entropy`` on logits (B, C, *S) and target (B, *S).

    region "pel" is raw PEL (alpha, n and the PEL options), "dice" the soft Dice loss (n = 1, the same options;
    with denominator "jaccard" the soft Jaccard loss), "none" leaves cross entropy alone. Cross entropy is the
    unweighted mean over non-ignored pixels of the local batch (as ``F.cross_entropy``; binary cross entropy for
    a 1-channel input) and is 0 attached to the graph when every pixel is ignored; class_weights and batch apply
    to the region term only. Both terms come from one pass over the logits. The total may be negative with
    region "pel".
    """

    def __init__(
        self,
        region: Region = "pel",
        *,
        region_weight: float = 1.0,
        ce_weight: float = 1.0,
        alpha: float = 20.0,
        n: float = 3.0,
        ignore_index: int | None = None,
        power_of: PowerOf = "prediction",
        denominator: Denominator = "sum",
        batch: bool = False,
        class_weights: Sequence[float] | Tensor | None = None,
        include_background: bool = True,
        empty_classes: EmptyClasses = "skip",
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("region", region, _REGIONS)
        _check_alpha_n(alpha, n)
        for name, w in (("region_weight", region_weight), ("ce_weight", ce_weight)):
            if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        self.region = region
        self.region_weight = float(region_weight)
        self.ce_weight = float(ce_weight)
        self.alpha = float(alpha)
        self.n = float(n)
        self.ignore_index = ignore_index
        self.power_of = power_of
        self.denominator = denominator
        self.batch = batch
        self.class_weights = _class_weights(class_weights)
        self.include_background = include_background
        self.empty_classes = empty_classes
        self.compile_kernel = compile  # not "compile": that would hide nn.Module.compile
        self._opts()  # fail at construction, not at the first batch

    def _opts(self) -> _Options:
        return _options(
            n=1.0 if self.region == "dice" else self.n,
            power_of=self.power_of,
            denominator=self.denominator,
            batch=self.batch,
            include_background=self.include_background,
            class_weights=self.class_weights,
            ignore_index=self.ignore_index,
            empty_classes=self.empty_classes,
            compile=self.compile_kernel,
        )

    def terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Scalar tensors: always "loss" (weighted total) and "ce"; "pel" and "pel_norm" (L_norm, the value to
        log) for region "pel", "dice" for region "dice". All stay attached to the graph."""
        opts = self._opts()
        stats = _stats(logits, target, opts, need_ce=True)
        assert stats.ce_sum is not None
        # All pixels ignored: ce_sum is an attached 0, so clamping the count gives 0 instead of 0/0.
        ce = stats.ce_sum / stats.num_valid.clamp_min(1)
        out: dict[str, Tensor] = {"ce": ce}
        total = self.ce_weight * ce
        if self.region != "none":
            pooled = _pool(stats, opts.batch)
            norm = _region(pooled, opts, 1 / opts.r_max)
            if self.region == "pel":
                region = _region(pooled, opts, self.alpha)
                out["pel"], out["pel_norm"] = region, norm
            else:
                region = norm
                out["dice"] = region
            total = total + self.region_weight * region
        out["loss"] = total
        return out

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.terms(logits, target)["loss"]

    def extra_repr(self) -> str:
        return (
            f"region={self.region!r}, region_weight={self.region_weight}, ce_weight={self.ce_weight}, "
            f"alpha={self.alpha}, n={self.n}, power_of={self.power_of!r}, denominator={self.denominator!r}, "
            f"batch={self.batch}, include_background={self.include_background}, "
            f"class_weights={self.class_weights}, ignore_index={self.ignore_index}, "
            f"empty_classes={self.empty_classes!r}, compile={self.compile_kernel}"
        )
