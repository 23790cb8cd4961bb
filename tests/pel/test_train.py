"""Training end to end on real BBBC039 images: single process, a fine-tune, 2 gloo ranks under torchrun; the
training-loop features (LR schedule, gradient clipping, best checkpoint by Dice, seeds, snapshot and resume)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pel.checkpoint import load_checkpoint
from pel.config import TrainConfig
from pel.data import load_split, open_dataset, read_mask
from pel.inference import sliding_window_predict
from pel.metrics import ObjectMetrics, SegmentationMetrics, label_instances
from pel.train import MIN_EVAL_PATCH, SNAPSHOT, train
from tests.conftest import REPO_ROOT
from tests.pel.factories import real_subset
from worker import train_entry

# The module itself: pel/__init__.py re-exports the train() function under the same name.
train_module = sys.modules[train.__module__]
TINY = {"patch_size": 64, "batch_size": 4, "model": {"width": 4, "depth": 2}}
# A high learning rate makes the tiny model predict some foreground within a handful of steps, so comparisons
# of test metrics involve both classes.
FAST_LR = 3e-2
SUMMARY_KEYS = {"test_before", "test_after", "best_step", "best_val_dice", "steps", "num_classes"}
METRIC_KEYS = {"dice", "iou", "mean_image_dice", "mean_image_iou", "num_images", "objects"}


@pytest.fixture(scope="module")
def real_dataset(bbbc039_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real BBBC039 pairs: 4 train, 2 val, 2 test."""
    root, _ = real_subset(bbbc039_root, tmp_path_factory.mktemp("bbbc039-small"), {"train": 4, "val": 2, "test": 2})
    return root


@pytest.fixture(scope="module")
def baseline_run(real_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("baseline")
    config = TrainConfig(mode="baseline", loss="dice_ce", steps=4, val_every=2, lr=FAST_LR, **TINY)
    summary = train(config, dataset_dir=real_dataset, out_dir=out)
    assert summary is not None
    return out, summary


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_metrics(actual: dict[str, Any], expected: dict[str, Any], tol: float = 1e-9) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tol), key


def _test_metrics(model_path: Path, dataset: Path, patch: int) -> dict[str, Any]:
    """Stitched whole-image metrics of a saved model on the test split, computed here independently."""
    model, _ = load_checkpoint(model_path)
    metrics, objects = SegmentationMetrics(2), ObjectMetrics()
    for sample in load_split(open_dataset(dataset), "test"):
        probs = sliding_window_predict(model, torch.from_numpy(sample.image), patch=max(patch, MIN_EVAL_PATCH))
        metrics.update(probs.argmax(0), sample.mask)
        true_nuclei = read_mask(dataset / "masks" / f"{sample.id}.png")  # the instance labels, straight from disk
        objects.update(label_instances(probs.argmax(0).numpy() == 1), true_nuclei)
    return {**metrics.compute(), "objects": objects.compute()}


# ------------------------------------------------------------------------------------------------------ config


def test_config_round_trip_and_defaults() -> None:
    config = TrainConfig(mode="baseline", loss="ce", val_images=3, model={"width": 8})
    data = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(data) == config
    assert data["model"] == {"in_channels": 1, "out_channels": 2, "width": 8, "depth": 3, "norm": "batch"}
    defaults = TrainConfig()
    assert (defaults.mode, defaults.loss, defaults.alpha, defaults.n, defaults.lr) == (
        "finetune",
        "pel_ce",
        20.0,
        3.0,
        1e-4,
    )
    assert (defaults.patch_size, defaults.batch_size, defaults.steps, defaults.val_every) == (128, 8, 200, 50)
    # Warm-up 0 and a constant schedule keep the learning rate of earlier versions.
    assert (defaults.amp, defaults.grad_clip, defaults.warmup_steps, defaults.lr_schedule) == (
        True,
        None,
        0,
        "constant",
    )
    assert defaults.snapshot_every == 50
    assert TrainConfig.from_dict({"grad_clip": None}).grad_clip is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stpes": 10, "learning_rate": 1}, "unknown TrainConfig keys: learning_rate, stpes"),
        ({"loss": "pel"}, "loss must be one of pel_ce, dice_ce, ce"),
        ({"mode": "resume"}, "mode must be one of baseline, finetune"),
        ({"target": "instances"}, "target must be one of binary, boundary"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"batch_size": 2.5}, r"batch_size must be an integer >= 1"),
        ({"lr": 0}, r"lr must be a number in \(0"),
        ({"fg_fraction": 1.5}, r"fg_fraction must be a number in \[0.0, 1.0\]"),
        ({"eval_overlap": 1.0}, r"eval_overlap must be a number in \[0.0, 1.0\)"),
        ({"val_images": 0}, r"val_images must be an integer >= 1"),
        ({"model": {"width": 8, "layers": 3}}, "TrainConfig.model: unknown UNetConfig keys: layers"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of constant, cosine"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0"),
        ({"warmup_steps": 11, "steps": 10}, r"warmup_steps must be <= steps \(10\), got 11"),
        ({"grad_clip": 0}, r"grad_clip must be a number in \(0"),
        ({"grad_clip": "1"}, r"grad_clip must be a number"),
        ({"snapshot_every": 0}, r"snapshot_every must be an integer >= 1"),
        ({"amp": "yes"}, "amp must be true or false"),
    ],
)
def test_config_rejects_bad_values(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


# ------------------------------------------------------------------------------------------- single process


def test_baseline_writes_documented_outputs(real_dataset: Path, baseline_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = baseline_run
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.pt", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) >= SUMMARY_KEYS
    assert summary["test_before"] is None
    assert set(summary["test_after"]) == METRIC_KEYS and summary["test_after"]["num_images"] == 2
    assert (summary["steps"], summary["num_classes"]) == (4, 2)

    lines = _lines(out / "metrics.jsonl")
    assert [p["step"] for p in lines] == [1, 2, 4]
    for point in lines:
        assert {"step", "total_steps", "loss", "ce", "lr", "dice"} <= set(point)
        assert "pel" not in point and point["total_steps"] == 4 and point["lr"] == FAST_LR
    val = {p["step"]: p["val_dice"] for p in lines if "val_dice" in p}
    assert list(val) == [2, 4]
    assert summary["best_step"] in val and summary["best_val_dice"] == max(val.values())

    model, meta = load_checkpoint(out / "model.pt")
    assert model.config.width == 4 and model.config.out_channels == 2
    assert meta["best_step"] == summary["best_step"] and meta["mode"] == "baseline"
    # model.pt holds the weights the summary was computed with.
    _assert_same_metrics(_test_metrics(out / "model.pt", real_dataset, 64), summary["test_after"])


def test_finetune_from_baseline(real_dataset: Path, baseline_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    base_out, base_summary = baseline_run
    config = TrainConfig(mode="finetune", loss="pel_ce", steps=3, val_every=5, lr=1e-4, patch_size=64, batch_size=4)
    summary = train(config, dataset_dir=real_dataset, out_dir=tmp_path, init_checkpoint=base_out / "model.pt")
    assert summary is not None
    # The initial model is the baseline's best model, so its test scores are the baseline's.
    _assert_same_metrics(summary["test_before"], base_summary["test_after"])
    assert set(summary["test_after"]) == METRIC_KEYS
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [p["step"] for p in lines] == [1, 3]
    for point in lines:
        assert {"loss", "ce", "pel", "pel_norm"} <= set(point) and "dice" not in point
        # Raw PEL lies in [1 - alpha/2, 1] and L_norm in [0, 1]; the loss may be negative.
        assert -9.0 <= point["pel"] <= 1.0 and 0.0 <= point["pel_norm"] <= 1.0
        assert point["pel"] == pytest.approx(-9.0 + 10.0 * point["pel_norm"], abs=1e-4)
    assert summary["best_step"] == 3  # val_every > steps: the final step is validated
    model, _ = load_checkpoint(tmp_path / "model.pt")
    assert model.config == load_checkpoint(base_out / "model.pt")[0].config  # architecture from the checkpoint


def test_ce_only_logs_no_region_term(real_dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig(mode="baseline", loss="ce", steps=1, val_images=1, **TINY)
    train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    (point,) = _lines(tmp_path / "metrics.jsonl")
    assert set(point) == {"step", "total_steps", "loss", "ce", "lr", "val_dice"}
    assert point["loss"] == pytest.approx(point["ce"])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"config": TrainConfig(mode="finetune", steps=1)}, "ValueError: a fine-tune needs an init checkpoint"),
        (
            {"config": TrainConfig(mode="baseline", steps=1), "dataset_dir": Path("/nonexistent/dataset")},
            "DatasetError: dataset folder not found: /nonexistent/dataset",
        ),
    ],
)
def test_failure_writes_error_file_and_raises(
    real_dataset: Path, tmp_path: Path, kwargs: dict[str, Any], expected: str
) -> None:
    kwargs = {"dataset_dir": real_dataset, **kwargs}
    with pytest.raises(ValueError):
        train(kwargs.pop("config"), out_dir=tmp_path, **kwargs)
    assert (tmp_path / "error-rank0.txt").read_text().strip() == expected
    assert not (tmp_path / "summary.json").exists()


def test_checkpoint_that_does_not_fit_the_target(
    baseline_run: tuple[Path, dict[str, Any]], real_dataset: Path, tmp_path: Path
) -> None:
    config = TrainConfig(mode="finetune", target="boundary", steps=1)
    with pytest.raises(ValueError, match="predicts 2 classes but target 'boundary' needs 3"):
        train(config, dataset_dir=real_dataset, out_dir=tmp_path, init_checkpoint=baseline_run[0] / "model.pt")


def test_baseline_learns_better_than_chance(real_dataset: Path, tmp_path: Path) -> None:
    model = {"width": 8, "depth": 2}
    config = TrainConfig(mode="baseline", loss="dice_ce", steps=30, lr=3e-3, patch_size=64, batch_size=8, model=model)
    summary = train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    assert summary is not None
    # Predicting foreground everywhere scores 2f / (1 + f) for a foreground fraction f (about 0.3 here).
    val = load_split(open_dataset(real_dataset), "val")
    f = np.mean([s.mask.mean() for s in val])
    trivial = 2 * f / (1 + f)
    assert summary["best_val_dice"] > trivial + 0.4
    assert summary["test_after"]["dice"][1] > trivial + 0.4
    # Object metrics count the real nuclei of the test masks, and a model this good finds some of them.
    objects = summary["test_after"]["objects"]
    test_ids = open_dataset(real_dataset).splits["test"]
    nuclei = sum(len(np.unique(read_mask(real_dataset / "masks" / f"{i}.png"))) - 1 for i in test_ids)
    assert objects["num_true"] == nuclei and objects["num_images"] == len(test_ids)
    assert objects["tp"] > 0 and 0 < objects["f1"] <= 1 and 0 < objects["aji"] <= 1


# ----------------------------------------------------------------------------------------------------- torchrun


def _torchrun(config: dict[str, Any], dataset: Path, out: Path) -> subprocess.CompletedProcess[str]:
    cfg = out.parent / f"{out.name}-cfg.json"
    cfg.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "worker.train_entry", "--config", str(cfg), "--dataset", str(dataset), "--out", str(out)]
    env = {**os.environ, "PELTUNE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_under_torchrun(real_dataset: Path, tmp_path: Path) -> None:
    # A snapshot at step 3 gathers both ranks' RNG states (a collective) and is removed at the end.
    config = TrainConfig(
        mode="baseline", loss="dice_ce", steps=6, val_every=3, snapshot_every=3, lr=FAST_LR, **TINY
    ).to_dict()
    out = tmp_path / "out"
    result = _torchrun(config, real_dataset, out)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.pt", "summary.json"]

    lines = _lines(out / "metrics.jsonl")
    assert [p["step"] for p in lines] == [1, 3, 6]  # rank 0 alone writes: each step once
    assert [p["step"] for p in lines if "val_dice" in p] == [3, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_after"]["num_images"] == 2
    assert 0 < summary["test_after"]["dice"][1] < 1  # both classes predicted, so the comparison below has teeth
    # Rank 1 evaluated one of the two test images with its own copy of the weights. The summary matches this
    # process's evaluation of rank 0's model.pt only if the two ranks' DDP weights are identical.
    _assert_same_metrics(_test_metrics(out / "model.pt", real_dataset, 64), summary["test_after"])


def test_entry_failure_writes_error_file_and_exits_non_zero(
    real_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("PELTUNE_THREADS", str(torch.get_num_threads()))  # leave the test process's threads as set
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"mode": "baseline", "steps": 2, "colour": "blue"}))
    out = tmp_path / "out"
    assert train_entry.main(["--config", str(cfg), "--dataset", str(real_dataset), "--out", str(out)]) == 1
    assert (out / "error-rank1.txt").read_text().strip() == "ValueError: unknown TrainConfig keys: colour"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"PELTUNE_THREADS": "3"}, 3), ({"LOCAL_WORLD_SIZE": "1"}, None), ({"LOCAL_WORLD_SIZE": "1000"}, 1)],
)
def test_entry_thread_count(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: int | None) -> None:
    monkeypatch.delenv("PELTUNE_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cpus = len(os.sched_getaffinity(0))
    assert train_entry.thread_count() == (cpus if expected is None else expected)


# ------------------------------------------------------------------------------------------------ training loop

# Logged at steps 1, 2, 4, 6 (val_every 2); snapshots at step 3 only (the last step needs none). Step 3 is not a
# logged step, so a resume must also restore the loss sums that the step-4 line averages.
LOOP = {
    "mode": "baseline",
    "loss": "pel_ce",
    "steps": 6,
    "val_every": 2,
    "val_images": 1,
    "snapshot_every": 3,
    "warmup_steps": 2,
    "lr_schedule": "cosine",
    "lr": FAST_LR,
    **TINY,
}


@contextmanager
def _recording(crash_at: int | None = None) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Records the (unwrapped) weights after each training step, numbered by call; optionally raises at a call."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    original = train_module._Trainer._train_step
    calls = itertools.count(1)

    def step(self: Any, *args: Any) -> Any:
        call = next(calls)
        if call == crash_at:
            raise RuntimeError(f"simulated interruption at step call {call}")
        result = original(self, *args)
        states[call] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module._Trainer, "_train_step", step)
        yield states


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key  # bitwise: CPU kernels are deterministic


@pytest.fixture(scope="module")
def loop_run(real_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    """An uninterrupted run of LOOP, with the weights after every step."""
    out = tmp_path_factory.mktemp("loop")
    with _recording() as states:
        train(TrainConfig.from_dict(LOOP), dataset_dir=real_dataset, out_dir=out)
    return out, states


def test_lr_warm_up_and_decay() -> None:
    cosine = TrainConfig(steps=10, warmup_steps=4, lr_schedule="cosine")
    assert [cosine.lr_factor(s) for s in range(1, 6)] == [0.25, 0.5, 0.75, 1.0, 1.0]  # peak right after warm-up
    assert cosine.lr_factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 6)))
    decay = [cosine.lr_factor(s) for s in range(5, 11)]
    assert all(a > b for a, b in itertools.pairwise(decay)) and 0 < decay[-1] < 0.1  # the last step still trains
    constant = TrainConfig(steps=10, warmup_steps=2)
    assert [constant.lr_factor(s) for s in range(1, 11)] == [0.5] + [1.0] * 9
    assert [TrainConfig(steps=3).lr_factor(s) for s in (1, 2, 3)] == [1.0, 1.0, 1.0]  # no warm-up: today's lr
    all_warm = TrainConfig(steps=2, warmup_steps=2, lr_schedule="cosine")
    assert [all_warm.lr_factor(s) for s in (1, 2, 3)] == [0.5, 1.0, 1.0]  # step 3: the scheduler's look-ahead


def test_metrics_log_the_scheduled_lr(loop_run: tuple[Path, dict[int, Any]]) -> None:
    config = TrainConfig.from_dict(LOOP)
    lines = _lines(loop_run[0] / "metrics.jsonl")
    assert [p["step"] for p in lines] == [1, 2, 4, 6]
    for point in lines:
        assert point["lr"] == pytest.approx(FAST_LR * config.lr_factor(point["step"]), rel=1e-12)
    assert lines[0]["lr"] == FAST_LR / 2 and lines[1]["lr"] == FAST_LR


def test_resume_after_interruption_matches_an_uninterrupted_run(
    real_dataset: Path, loop_run: tuple[Path, dict[int, Any]], tmp_path: Path
) -> None:
    ref_out, ref_states = loop_run
    config = TrainConfig.from_dict(LOOP)
    with _recording(crash_at=6), pytest.raises(RuntimeError, match="simulated interruption"):
        train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    # Steps 1-5 ran: the snapshot is step 3's and metrics.jsonl holds a line (step 4) written after it.
    assert torch.load(tmp_path / SNAPSHOT, weights_only=True)["step"] == 3
    assert [p["step"] for p in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 4]
    assert (tmp_path / "error-rank0.txt").exists()

    # A snapshot continues only the run that wrote it.
    with pytest.raises(ValueError, match=r"different config \(differs in: lr, seed\)"):
        train(TrainConfig.from_dict({**LOOP, "lr": 1e-3, "seed": 1}), dataset_dir=real_dataset, out_dir=tmp_path)

    with _recording() as states:
        summary = train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    assert sorted(states) == [1, 2, 3]  # steps 4, 5, 6: only the steps after the snapshot ran again
    _assert_same_state(states[3], ref_states[6])  # final weights
    for name in ("model.pt", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).exists()
    _assert_same_state(
        load_checkpoint(tmp_path / "model.pt")[0].state_dict(), load_checkpoint(ref_out / "model.pt")[0].state_dict()
    )
    # Each step logged once, with the same values (the step-4 average includes step 3's loss from the snapshot).
    assert _lines(tmp_path / "metrics.jsonl") == _lines(ref_out / "metrics.jsonl")
    expected = json.loads((ref_out / "summary.json").read_text())
    assert summary is not None
    assert {k: v for k, v in summary.items() if k != "wall_seconds"} == {
        k: v for k, v in expected.items() if k != "wall_seconds"
    }
    # Finished: the snapshot and the interrupted attempt's error file are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "model.pt", "summary.json"]


def test_seeded_runs_are_reproducible_and_amp_is_a_no_op_on_cpu(
    real_dataset: Path, loop_run: tuple[Path, dict[int, Any]], tmp_path: Path
) -> None:
    ref_states = loop_run[1]
    # Two warm-up steps only: their learning rates do not depend on the schedule or the step count, so this
    # shorter run repeats the reference's first two steps exactly, with autocast off instead of on.
    short = {**LOOP, "steps": 2, "val_every": 2, "amp": False}
    with _recording() as states:
        train(TrainConfig.from_dict(short), dataset_dir=real_dataset, out_dir=tmp_path / "same-seed")
    _assert_same_state(states[2], ref_states[2])
    with _recording() as other:
        train(TrainConfig.from_dict({**short, "seed": 1}), dataset_dir=real_dataset, out_dir=tmp_path / "seed-1")
    assert not all(torch.equal(other[2][k], ref_states[2][k]) for k in ref_states[2])


def test_gradient_clipping_bounds_the_norm(real_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before: list[float] = []
    after: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_
    adam_step = torch.optim.AdamW.step

    def clip_and_record(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = clip(params, max_norm, *args, **kwargs)
        before.append(float(total))  # the norm before clipping
        return total

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        after.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = TrainConfig.from_dict({**LOOP, "steps": 3, "val_every": 3, "grad_clip": 0.01})
    train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    assert len(before) == len(after) == 3
    assert min(before) > 0.01  # the clip had something to do
    assert max(after) <= 0.01 * (1 + 1e-5)


def test_best_checkpoint_is_the_best_val_dice_not_the_lowest_loss(real_dataset: Path, tmp_path: Path) -> None:
    # A large learning rate makes validation Dice move up and down between steps; a large alpha makes the raw
    # PEL, and so the logged loss, negative: "lower is better" would be the wrong rule.
    config = TrainConfig.from_dict({**LOOP, "steps": 6, "val_every": 1, "alpha": 200.0, "lr": 0.05})
    with _recording() as states:
        summary = train(config, dataset_dir=real_dataset, out_dir=tmp_path)
    assert summary is not None
    lines = _lines(tmp_path / "metrics.jsonl")
    dices = [p["val_dice"] for p in lines]
    assert len(dices) == 6 and all(p["pel"] < 0 for p in lines)
    best = max(range(6), key=lambda i: (dices[i], -i)) + 1  # the first step with the highest val Dice
    assert (summary["best_step"], summary["best_val_dice"]) == (best, dices[best - 1])
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["best_step"] == best
    _assert_same_state(model.state_dict(), states[best])
