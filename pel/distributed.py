"""Process-group set-up from torchrun's environment: one code path for 1 process, N CPU ranks or N GPUs.

Without torchrun's variables (``WORLD_SIZE`` unset or 1) nothing is initialised and every helper is a no-op, so
tests and single-process runs need no rendezvous. NCCL is used when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "cleanup", "setup"]

# Long enough for rank 0's slowest single step (a whole evaluation pass) on a small CPU machine.
_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (idempotent) and pick this rank's device.

    ``device`` forces ``"cpu"`` or ``"cuda"``; by default a GPU is used when one is visible. Each rank takes the
    GPU of its ``LOCAL_RANK``.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", timeout=_TIMEOUT, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=_TIMEOUT)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
