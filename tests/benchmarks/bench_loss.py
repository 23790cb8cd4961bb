"""Forward+backward speed and peak memory of pel.pel_loss (eager, and compiled with ``compile=True``) against a
naive one-hot implementation, MONAI's and segmentation_models_pytorch's DiceLoss (when installed) and the
memory-bandwidth floor, all in one run.

    .venv/bin/python tests/benchmarks/bench_loss.py              # 1 thread, all cases, with peak memory
    .venv/bin/python tests/benchmarks/bench_loss.py --threads 2  # both cores
    .venv/bin/python tests/benchmarks/bench_loss.py --quick      # small shapes, no memory subprocesses
    .venv/bin/python tests/benchmarks/bench_loss.py --warm-cache # reuse Inductor's on-disk cache (default: a fresh one)

Not part of the default test run (pyproject's addopts ignore tests/benchmarks); naming the file runs its smoke test:
``.venv/bin/pytest tests/benchmarks/bench_loss.py``.

What is measured, and why:

- time: the median (and minimum) of ``--repeats`` forward+backward calls after warm-up, the implementations
  interleaved round-robin so that a neighbour taking a core slows all of them alike (these machines are shared).
- the floor: a fused forward+backward must read the logits twice, the labels twice and write the gradient once,
  ``(12·C + 2·label bytes)`` bytes per pixel (docs/pel-spec.md, "performance facts"); divided by the machine's
  memory-copy bandwidth, measured right before and after the timed loop as the fastest ``dst.copy_(src)`` over
  256 MiB buffers (read + write bytes per second; preallocated so that page faults of a fresh allocation are not
  counted).
- compile time (pel-compiled only): the first forward+backward on a case's shape, minus the steady-state median, in a
  fresh Inductor cache directory unless ``--warm-cache`` (then compiled kernels saved by earlier runs are reused, as
  a second training run would). It is printed apart and left out of the per-call times, which are all taken after
  warm-up.
- peak memory: in a fresh subprocess per (case, implementation), the rise of the resident set's high-water mark
  (VmHWM, reset through /proc/self/clear_refs) over one forward+backward, inputs already allocated; run at the
  case's batch size and at twice it, the difference per added pixel is the memory that grows with the input.
  Every implementation must allocate the gradient, 4·C bytes per pixel; a float one-hot of the target adds 4·K.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pel.losses import _options, _pool, _region, _stats, pel_loss  # noqa: E402

ALPHA, N = 20.0, 3.0
COPY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # logits (B, C, *S)

    @property
    def classes(self) -> int:
        return max(self.shape[1], 2)

    @property
    def pixels(self) -> int:
        return self.shape[0] * int(torch.Size(self.shape[2:]).numel())


CASES = [
    Case("2d-binary", (16, 2, 256, 256)),
    Case("3d-binary", (2, 2, 64, 128, 128)),
    Case("2d-4class", (16, 4, 256, 256)),
    Case("3d-3class", (2, 3, 64, 96, 96)),
]
QUICK_CASES = [Case("2d-binary", (4, 2, 64, 64)), Case("3d-3class", (2, 3, 8, 16, 16))]


def make_inputs(case: Case, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(case.shape, generator=gen)
    target = torch.randint(0, case.classes, case.shape[:1] + case.shape[2:], generator=gen)
    return logits, target


# ---------------------------------------------------------------------------------------------------------------
# Implementations: (logits leaf, labels) -> scalar loss


def naive_pel(logits: Tensor, target: Tensor) -> Tensor:
    """(a) Straight from the formula: softmax, a float one-hot, pⁿ·g, per-patch mean over present classes."""
    probs = torch.softmax(logits, 1) if logits.shape[1] > 1 else torch.cat([1 - logits.sigmoid(), logits.sigmoid()], 1)
    g = F.one_hot(target, probs.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, probs.dim()))
    inter = (probs**N * g).sum(dims)
    union = probs.sum(dims) + g.sum(dims)
    present = (g.sum(dims) > 0).float()
    per_class = 1 - ALPHA * inter / union
    return ((per_class * present).sum(1) / present.sum(1)).mean()


def pel_autograd(logits: Tensor, target: Tensor) -> Tensor:
    """pel's own plain-autograd path (gather/scatter, no one-hot), to show what the fused kernel adds."""
    opts = _options(n=N)
    return _region(_pool(_stats(logits, target, opts, fused=False), False), opts, ALPHA)


def _monai() -> Callable[[Tensor, Tensor], Tensor] | None:
    try:
        from monai.losses import DiceLoss
    except Exception:  # an absent or broken optional install must not stop the benchmark
        return None
    loss = DiceLoss(softmax=True, to_onehot_y=True)
    return lambda x, t: loss(x, t.unsqueeze(1))


def _smp_losses() -> tuple[types.ModuleType | None, str]:
    """segmentation_models_pytorch.losses, and how it was loaded (or why not).

    smp 0.6's package __init__ imports its encoders, hence timm, hence torchvision, and the only torchvision for
    torch 2.13 is a CUDA build that fails against the CPU torch. Its losses subpackage needs only torch and numpy
    (relative imports within smp/losses), so when the package does not import, that subpackage is loaded alone under
    an empty parent module: smp's own loss code, without running the package's __init__.
    """
    try:
        version = importlib.metadata.version("segmentation_models_pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None, "not installed"
    try:
        return importlib.import_module("segmentation_models_pytorch.losses"), f"smp {version}, imported normally"
    except Exception as exc:  # the broken optional dependency chain; anything else is reported below too
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    for name in [m for m in sys.modules if m == "segmentation_models_pytorch" or m.startswith("segmentation_models_")]:
        del sys.modules[name]  # the half-imported package
    spec = importlib.util.find_spec("segmentation_models_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None, f"smp {version} does not import ({reason})"
    parent = types.ModuleType("segmentation_models_pytorch")
    parent.__path__ = list(spec.submodule_search_locations)
    sys.modules["segmentation_models_pytorch"] = parent
    try:
        losses = importlib.import_module("segmentation_models_pytorch.losses")
    except Exception as exc:
        del sys.modules["segmentation_models_pytorch"]
        return None, f"smp {version} does not import ({reason}), nor its losses alone ({type(exc).__name__}: {exc})"
    return losses, f"smp {version}: the package does not import ({reason}); its losses subpackage loaded alone"


def _smp() -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str]:
    losses, how = _smp_losses()
    if losses is None:
        return None, how
    loss = losses.DiceLoss(mode="multiclass", from_logits=True)
    return (lambda x, t: loss(x, t)), how


def _pel_compiled(x: Tensor, t: Tensor) -> Tensor:
    return pel_loss(x, t, alpha=ALPHA, n=N, compile=True)


def implementations() -> tuple[dict[str, Callable[[Tensor, Tensor], Tensor]], list[str]]:
    impls: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "pel": lambda x, t: pel_loss(x, t, alpha=ALPHA, n=N),
        "pel-compiled": _pel_compiled,
        "naive": naive_pel,
        "pel-autograd": pel_autograd,
    }
    notes = []
    monai = _monai()
    if monai is None:
        notes.append("monai-dice: not installed (or fails to import), skipped")
    else:
        impls["monai-dice"] = monai
    smp, how = _smp()
    if smp is None:
        notes.append(f"smp-dice: {how}, skipped")
    else:
        impls["smp-dice"] = smp
        notes.append(f"smp-dice: {how}")
    return impls, notes


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def fwd_bwd(fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor) -> Tensor:
    x = logits.detach().requires_grad_()
    fn(x, target).backward()
    assert x.grad is not None
    return x.grad


def time_case(case: Case, impls: dict[str, Callable[[Tensor, Tensor], Tensor]], repeats: int) -> dict[str, list[float]]:
    """Seconds per forward+backward for each implementation, interleaved round-robin, and per 256 MiB copy.

    The copies run in their own loop before and after: interleaved, they would flush the caches right before
    whichever implementation comes next.
    """
    logits, target = make_inputs(case)
    runs: dict[str, Callable[[], object]] = {
        name: (lambda fn=fn: fwd_bwd(fn, logits, target)) for name, fn in impls.items()
    }
    for run in runs.values():  # warm-up: allocator, lazy initialisation, caches
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    copies = _copy_times(repeats // 2 + 1)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    times["copy"] = copies + _copy_times(repeats // 2 + 1)
    return times


def _copy_times(repeats: int) -> list[float]:
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not part of the copy
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return times


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _vm_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its initial 128 KiB.

    glibc raises the threshold (up to 32 MiB) whenever a large mmapped block is freed; blocks below it then come
    from the heap and stay resident after they are freed, so a warm-up at the measured size would hide the measured
    call's own allocations. Setting the threshold explicitly turns that adjustment off, for every implementation.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator is left as it is
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def measure_peak(case_name: str, impl: str, threads: int, batch_scale: int) -> int:
    """In this (fresh) process: bytes by which one forward+backward raises the resident high-water mark."""
    _fix_mmap_threshold()
    torch.set_num_threads(threads)
    case = next(c for c in CASES + QUICK_CASES if c.name == case_name)
    case = Case(case.name, (case.shape[0] * batch_scale,) + case.shape[1:])
    fn = implementations()[0][impl]
    logits, target = make_inputs(case)
    # Warm-up on a tiny input loads the kernels' code without touching the measured sizes; the compiled kernels are
    # made per input shape, so theirs is a call at the measured size (compiling is not part of one call's memory).
    small = Case("small", (2, case.shape[1]) + (4,) * (len(case.shape) - 2))
    fwd_bwd(fn, *(make_inputs(case) if impl == "pel-compiled" else make_inputs(small)))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _vm_rss()
    fwd_bwd(fn, logits, target)
    return _vm_hwm() - before


def peak_in_subprocess(case: Case, impl: str, threads: int, batch_scale: int = 1) -> int | None:
    cmd = [sys.executable, __file__, "--_peak", case.name, impl, str(batch_scale), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(
            f"  peak memory of {impl} on {case.name} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr
        )
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak"])


@dataclass
class Row:
    case: Case
    impl: str
    median_s: float
    min_s: float
    peak: int | None  # extra peak bytes of one forward+backward at the case's batch size
    per_pixel: float | None  # marginal extra peak bytes per pixel, from the case at 1x and 2x its batch


def run(cases: list[Case], repeats: int, threads: int, memory: bool) -> tuple[list[Row], dict[str, float], list[str]]:
    torch.set_num_threads(threads)
    impls, notes = implementations()
    rows: list[Row] = []
    floors: dict[str, float] = {}
    for case in cases:
        # Check that every implementation computes the same loss gradient before timing it (MONAI's and smp's are
        # Dice losses, another function: only their speed is comparable). pel-compiled's first call compiles.
        logits, target = make_inputs(case)
        ref = fwd_bwd(naive_pel, logits, target)
        for name in ("pel-compiled", "pel", "pel-autograd"):
            start = time.perf_counter()
            grad = fwd_bwd(impls[name], logits, target)
            if name == "pel-compiled":
                floors[case.name + ":first-call"] = time.perf_counter() - start
            err = float((grad - ref).abs().max())
            scale = float(ref.abs().max())
            if err > 1e-4 * scale:
                raise AssertionError(f"{name} gradient differs from the naive one on {case.name}: {err} vs {scale}")
        times = time_case(case, impls, repeats)
        copy_s = min(times.pop("copy"))  # the machine's best: the floor is what the memory system can do
        bandwidth = 2 * COPY_BYTES / copy_s
        label_bytes = target.element_size()
        floors[case.name] = (12 * case.shape[1] + 2 * label_bytes) * case.pixels / bandwidth
        floors[case.name + ":bandwidth"] = bandwidth
        for name, ts in times.items():
            peak = per_pixel = None
            if memory:
                peak, double = peak_in_subprocess(case, name, threads), peak_in_subprocess(case, name, threads, 2)
                if peak is not None and double is not None:
                    per_pixel = (double - peak) / case.pixels
            rows.append(Row(case, name, statistics.median(ts), min(ts), peak, per_pixel))
        compiled = statistics.median(times["pel-compiled"])
        floors[case.name + ":compile"] = floors[case.name + ":first-call"] - compiled
    return rows, floors, notes


def report(rows: list[Row], floors: dict[str, float], notes: list[str], threads: int) -> str:
    lines = [f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs; medians over interleaved runs"]
    lines.append("")
    header = (
        "| case | logits shape | implementation | median ms | min ms | naive / impl | impl / floor | "
        "extra peak MiB | extra bytes / pixel |"
    )
    lines += [header, "|" + "---|" * 9]
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault(row.case.name, {})[row.impl] = row
    goals, compiles = [], []
    for name, impls in by_case.items():
        case = next(iter(impls.values())).case
        floor = floors[name]
        naive = impls["naive"].median_s
        for impl, row in impls.items():
            peak = "" if row.peak is None else f"{row.peak / 2**20:.1f}"
            per_px = "" if row.per_pixel is None else f"{row.per_pixel:.1f}"
            lines.append(
                f"| {name} | {'x'.join(map(str, case.shape))} | {impl} | {1e3 * row.median_s:.2f} | "
                f"{1e3 * row.min_s:.2f} | {naive / row.median_s:.2f} | {row.median_s / floor:.2f} | {peak} | {per_px} |"
            )
        bandwidth = floors[name + ":bandwidth"] / 1e9
        lines.append(f"| {name} | | floor ({bandwidth:.1f} GB/s copy) | {1e3 * floor:.2f} | | | 1.00 | | |")
        for impl in ("pel", "pel-compiled"):
            pel = impls[impl]
            speedup, to_floor = naive / pel.median_s, pel.median_s / floor
            goal = (
                f"{name}, {impl}: {speedup:.2f}x faster than naive ({'met' if speedup >= 2 else 'NOT met'}: >= 2x); "
                f"{to_floor:.2f}x the floor ({'met' if to_floor <= 2 else 'NOT met'}: <= 2x)"
            )
            if pel.per_pixel is not None:
                # Every implementation must allocate the gradient (4·C bytes per pixel); a float one-hot adds 4·K.
                grad, onehot = 4 * case.shape[1], 4 * case.classes
                extra = pel.per_pixel - grad
                goal += (
                    f"; memory beyond the gradient {extra:.1f} B/pixel vs a float one-hot's {onehot} B/pixel "
                    f"({'met' if extra < onehot else 'NOT met'})"
                )
            goals.append(goal)
        compiles.append(
            f"{name}: {floors[name + ':compile']:.1f} s (first forward+backward "
            f"{floors[name + ':first-call']:.1f} s, then {1e3 * impls['pel-compiled'].median_s:.2f} ms per call)"
        )
    lines += ["", "Goals:"] + [f"- {g}" for g in goals]
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "Inductor's default cache directory")
    lines += ["", f"Compile time of pel-compiled, excluded from the times above (Inductor cache: {cache}):"]
    lines += [f"- {c}" for c in compiles]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed forward+backward calls per implementation")
    parser.add_argument("--cases", nargs="*", help=f"subset of {[c.name for c in CASES]}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats, no memory (a smoke run)")
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse Inductor's on-disk cache (default: time a cold compile)"
    )
    parser.add_argument("--_peak", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.warm_cache and not args._peak:
        # A fresh cache, so the printed compile time is a first compile's; the memory subprocesses inherit it.
        cache = tempfile.mkdtemp(prefix="bench_loss_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    if args._peak:
        print(json.dumps({"peak": measure_peak(args._peak[0], args._peak[1], args.threads, int(args._peak[2]))}))
        return
    cases = QUICK_CASES if args.quick else [c for c in CASES if not args.cases or c.name in args.cases]
    repeats = 3 if args.quick else args.repeats
    rows, floors, notes = run(cases, repeats, args.threads, memory=not (args.no_memory or args.quick))
    print(report(rows, floors, notes, args.threads))


def test_benchmark_smoke() -> None:
    """The benchmark runs end to end on small shapes; its gradient check compares pel with the naive loss."""
    rows, floors, _ = run(QUICK_CASES, repeats=2, threads=1, memory=False)
    assert {r.impl for r in rows} >= {"pel", "pel-compiled", "naive", "pel-autograd"}
    assert all(r.median_s > 0 for r in rows) and all(floors[c.name] > 0 for c in QUICK_CASES)
    text = report(rows, floors, [], 1)
    assert "Goals:" in text and "Compile time of pel-compiled" in text


if __name__ == "__main__":
    main()
