"""Request and response bodies.

``TrainSettings`` (the ``config`` of a job) is generated from ``pel.config.TrainConfig`` so the API accepts exactly
the trainer's fields and types, never drifting from them; ``CONSTRAINTS`` adds the bounds, checked here so a bad
value is a 422 naming the field instead of a job that fails minutes later in the worker.
"""

from __future__ import annotations

import dataclasses
import typing
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from api.db.models import ID_PATTERN, JobKind, JobStatus
from pel.config import TrainConfig

MAX_NPROCS = 64
# Upper bound of list offsets and step filters: far past any real listing, and inside int64 for every database.
MAX_OFFSET = 10**12

# Bounds per TrainConfig field (pydantic Field keywords). Fields not listed are checked for their type only.
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "alpha": {"gt": 0},
    "n": {"gt": 0},
    "region_weight": {"ge": 0},
    "ce_weight": {"ge": 0},
    # Upper bounds keep a typo from allocating terabytes or holding a worker for years; generous for real use.
    "patch_size": {"ge": 16, "le": 2048},
    "batch_size": {"ge": 1, "le": 1024},
    "fg_fraction": {"ge": 0, "le": 1},
    "steps": {"ge": 1, "le": 10_000_000},
    "lr": {"gt": 0, "le": 10},
    "weight_decay": {"ge": 0},
    "val_every": {"ge": 1},
    "val_images": {"ge": 1},
    "eval_overlap": {"ge": 0, "lt": 1},
    "seed": {"ge": 0, "lt": 2**32},  # numpy seeds are 32-bit
    "grad_clip": {"gt": 0},
    "warmup_steps": {"ge": 0},
    "snapshot_every": {"ge": 1},
}
# Set by the job's kind, never by the client.
SERVER_FIELDS = frozenset({"mode"})


class _TrainSettingsBase(BaseModel):
    # strict: `"steps": true` or `"nprocs": "2"` is a mistake to report, not a value to coerce; no NaN/Infinity.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" in data:
            raise ValueError('"mode" is not a config field here: it is the job\'s "kind" (baseline or finetune)')
        return data


def _train_settings_model() -> type[BaseModel]:
    hints = typing.get_type_hints(TrainConfig)
    definitions: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in SERVER_FIELDS:
            continue
        bounds = CONSTRAINTS.get(field.name, {})
        if field.default_factory is not dataclasses.MISSING:
            spec = Field(default_factory=field.default_factory, **bounds)
        else:
            spec = Field(default=field.default, **bounds)
        definitions[field.name] = (hints[field.name], spec)
    return create_model(
        "TrainSettings",
        __base__=_TrainSettingsBase,
        __doc__="pel.config.TrainConfig fields except `mode` (set by the job kind); see docs/design.md.",
        **definitions,
    )


TrainSettings = _train_settings_model()


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    uri: str
    size_bytes: int
    sha256: str
    format: str = Field(description='model file format: "pel-tune", "torchscript", "state_dict" or "safetensors"')
    architecture: dict[str, Any] | None = Field(
        description='the architecture the weights fit, e.g. {"name": "unet", ...} or {"name": "smp", ...}; '
        "null for TorchScript (the file carries its own)"
    )
    source_job_id: str | None
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    uri: str
    num_images: int
    splits: dict[str, int] = Field(description="number of images per split")
    min_height: int | None = Field(None, description="height of the smallest image (None: not recorded)")
    min_width: int | None = Field(None, description="width of the smallest image")
    num_classes: int | None = Field(None, description="classes declared at registration (None: not declared)")
    created_at: datetime


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "finetune",
                    "dataset_id": "5f0c…",
                    "checkpoint_id": "9a1e…",
                    "nprocs": 2,
                    "config": {"loss": "pel_ce", "steps": 200, "lr": 1e-4, "patch_size": 128},
                }
            ]
        },
    )

    kind: JobKind
    dataset_id: str = Field(pattern=ID_PATTERN.pattern)
    checkpoint_id: str | None = Field(
        None, pattern=ID_PATTERN.pattern, description="init checkpoint; required for finetune, absent for baseline"
    )
    nprocs: int = Field(
        1, ge=1, le=MAX_NPROCS, strict=True, description="training processes (DDP ranks) on one worker host"
    )
    config: TrainSettings = Field(default_factory=TrainSettings)  # type: ignore[valid-type]


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: JobKind
    status: JobStatus
    dataset_id: str
    checkpoint_id: str | None
    nprocs: int
    config: dict[str, Any]
    progress: float
    step: int
    total_steps: int | None
    error: str | None
    output_checkpoint_id: str | None
    summary: dict[str, Any] | None
    attempt: int = Field(description="attempts started so far (retries are capped by the server's max_attempts)")
    resume_step: int = Field(description="the step of the last snapshot kept for this job; a retry resumes there")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    from_status: JobStatus | None = Field(description="null for the submission")
    to_status: JobStatus
    reason: str


class MetricsOut(BaseModel):
    job_id: str
    points: list[dict[str, Any]] = Field(
        description='metrics.jsonl lines in step order: {"step", "total_steps", "loss", "ce", "lr", ...}'
    )
