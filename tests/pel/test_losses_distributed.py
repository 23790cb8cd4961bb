"""batch=True under DDP: 2 real gloo ranks must compute what one process computes on the concatenated batch.

The pooled sums are all-reduced with gradient, so the value is identical on every rank, and each rank's gradient
w.r.t. its own logits is world_size times the single process's gradient for that slice: every rank's loss is the
same function of the pooled sums, so the all-reduce's backward adds world_size equal contributions. DDP then
averages parameter gradients over the ranks, which divides that factor out again: the model part of the test does
DDP's averaging (an all-reduce of the parameter gradients divided by world_size) by hand, because constructing
DistributedDataParallel imports torch._dynamo, which costs seconds per rank on these machines.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from pel.losses import CompoundLoss, pel_loss, pel_normalised

WORLD = 2
PER_RANK = 2  # patches per rank


def _case() -> tuple[Tensor, Tensor, Tensor]:
    """Global batch: features (4, 2, 6, 5) for a 1x1-conv model, logits (4, 3, 6, 5) float64, labels (4, 6, 5)."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(WORLD * PER_RANK, 2, 6, 5, generator=gen)
    logits = 2 * torch.randn(WORLD * PER_RANK, 3, 6, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (WORLD * PER_RANK, 6, 5), generator=gen)
    target[0] = 0  # the first rank's first patch has background only
    target[3, :2] = 255  # ignored pixels, on the second rank only
    return feats, logits, target


# Each loss on (logits (B, C, ...) float64, labels); C = 3 runs the softmax kernel, C = 2 and 1 the binary one.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "pel-3class": lambda x, t: pel_loss(x, t.clamp(max=2), batch=True),
    "pel-2class-options": lambda x, t: pel_loss(
        x[:, :2],
        t.clamp(max=1) + 254 * (t == 255),
        batch=True,
        denominator="jaccard",
        class_weights=[0.5, 2.0],
        ignore_index=255,
    ),
    "pel-binary-sigmoid": lambda x, t: pel_loss(x[:, :1], (t == 1).long(), batch=True, power_of="product", n=2.0),
    "pel-ignore-softmax": lambda x, t: pel_loss(x, t, batch=True, ignore_index=255, include_background=False),
    "pel_norm": lambda x, t: pel_normalised(x, t, batch=True, ignore_index=255),
    "compound-pel-term": lambda x, t: CompoundLoss("pel", batch=True, ignore_index=255).terms(x, t)["pel"],
    "probabilities": lambda x, t: pel_loss(torch.softmax(x, 1), t.clamp(max=2), batch=True, from_logits=False),
    # The compiled kernels (compile=True) compute each rank's sums; pooling and the all-reduce are the same code.
    "compiled-softmax": lambda x, t: pel_loss(x, t, batch=True, ignore_index=255, denominator="jaccard", compile=True),
}


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Conv2d(2, 3, kernel_size=1)


def _ddp_loss(logits: Tensor, target: Tensor) -> Tensor:
    # No ignored pixels here: CE is a per-rank pixel mean, equal to the global mean only for equal pixel counts.
    return CompoundLoss("pel", batch=True, denominator="jaccard")(logits, target.clamp(max=2))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 shared cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        feats, logits, target = _case()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results: dict[str, object] = {}
        for name, fn in LOSSES.items():
            x = logits[mine].clone().requires_grad_()
            value = fn(x, target[mine])
            (grad,) = torch.autograd.grad(value, x)
            results[name] = (value.detach(), grad)
        # Per-patch mode does not communicate: each rank has the loss of its own patches.
        results["per-patch"] = pel_loss(logits[mine], target[mine].clamp(max=2))
        model = _model()
        _ddp_loss(model(feats[mine]), target[mine]).backward()
        for param in model.parameters():  # DistributedDataParallel's gradient averaging
            assert param.grad is not None
            dist.all_reduce(param.grad)
            param.grad /= WORLD
        results["ddp"] = [p.grad for p in model.parameters()]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_pooling_on_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    feats, logits, target = _case()

    for name, fn in LOSSES.items():
        x = logits.clone().requires_grad_()
        value = fn(x, target)
        (grad,) = torch.autograd.grad(value, x)
        for rank, results in enumerate(ranks):
            rank_value, rank_grad = results[name]
            assert abs(rank_value.item() - value.item()) < 1e-12, name
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            torch.testing.assert_close(rank_grad / WORLD, grad[mine], rtol=1e-10, atol=1e-14, msg=name)
        # Not vacuous: pooling over one rank's half alone gives another value.
        assert abs(fn(logits[:PER_RANK], target[:PER_RANK]).item() - value.item()) > 1e-3, name

    for rank, results in enumerate(ranks):
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        own = pel_loss(logits[mine], target[mine].clamp(max=2))
        assert abs(results["per-patch"].item() - own.item()) < 1e-12

    model = _model()
    _ddp_loss(model(feats), target).backward()
    for results in ranks:
        for rank_grad, param in zip(results["ddp"], model.parameters(), strict=True):
            assert param.grad is not None
            torch.testing.assert_close(rank_grad, param.grad, rtol=1e-4, atol=1e-6)
