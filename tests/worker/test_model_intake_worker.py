"""The worker with models users bring: the row's format and architecture reach the trainer, the output row records
the same ones, and a model that does not fit the job fails it with the reason before any training step."""

from __future__ import annotations

from pathlib import Path

import torch

from api.db import crud
from api.db.models import JobKind, JobStatus
from api.db.session import session_scope
from api.settings import Settings
from api.storage import file_digest, file_uri_path
from pel.models import UNet, UNetConfig
from tests.factories import make_dataset
from tests.worker.test_tasks import TINY, database_url, job_row, settings  # noqa: F401 - shared fixtures
from worker.tasks import execute_job


def add_finetune(settings: Settings, dataset: Path, init: Path, fmt: str, architecture: dict | None) -> str:  # noqa: F811
    with session_scope(settings.database_url) as session:
        ds = crud.create_dataset(session, name="synthetic", uri=dataset.as_uri(), num_images=6, splits={})
        size, sha256 = file_digest(init)
        checkpoint = crud.create_checkpoint(
            session,
            name="init",
            uri=init.as_uri(),
            size_bytes=size,
            sha256=sha256,
            format=fmt,
            architecture=architecture,
        )
        job = crud.create_job(
            session, kind=JobKind.finetune, dataset_id=ds.id, checkpoint_id=checkpoint.id, nprocs=1, config=TINY
        )
        return job.id


def test_a_state_dict_comes_back_as_a_state_dict(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    config = UNetConfig(width=4, depth=1)
    architecture = {"name": "unet", **config.to_dict()}
    torch.manual_seed(0)
    init = tmp_path / "weights.pt"
    torch.save(UNet(config).state_dict(), init)
    job_id = add_finetune(settings, make_dataset(tmp_path / "ds", n=6), init, "state_dict", architecture)

    assert execute_job(job_id, settings=settings) is JobStatus.succeeded, job_row(settings, job_id).error
    job = job_row(settings, job_id)
    with session_scope(settings.database_url) as session:
        out = crud.get_checkpoint(session, checkpoint_id=job.output_checkpoint_id)
        assert (out.format, out.architecture) == ("state_dict", architecture)
        uri = out.uri
    state = torch.load(file_uri_path(uri), weights_only=True)
    UNet(config).load_state_dict(state)  # strict: exactly the declared architecture


def test_a_torchscript_model_with_the_wrong_classes_fails_the_job(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    init = tmp_path / "three-classes.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 3, 1)), init)
    job_id = add_finetune(settings, make_dataset(tmp_path / "ds", n=6), init, "torchscript", None)

    assert execute_job(job_id, settings=settings) is JobStatus.failed
    job = job_row(settings, job_id)
    assert "the init model maps a (1, 1, 32, 32) input to (1, 3, 32, 32)" in job.error
    assert "target 'binary' needs logits (1, 2, 32, 32)" in job.error
    assert job.output_checkpoint_id is None
