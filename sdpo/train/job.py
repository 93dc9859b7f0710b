"""One training job on local paths: run in process, or on every rank under ``accelerate launch``.

The train stage (:func:`sdpo.stages.train`) stages its inputs to local paths and describes the work as a
:class:`TrainJob`. With several GPUs on the machine it writes the job to a JSON file and runs
``accelerate launch [--config_file train.accelerate_config] -m sdpo.train.job JOB.json``; every rank then runs
:func:`run_job`, and the main rank logs metrics into the stage's MLflow run and mirrors checkpoints to the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdpo import fs
from sdpo.config import TrainConfig, validate_config
from sdpo.errors import TrainingError

JOB_FILE = "train_job.json"


@dataclass
class TrainJob:
    """Everything a rank needs to train one arm from local inputs."""

    config: dict[str, Any]  # the resolved config (config_to_dict)
    arm: str
    shards: str
    heldout: str | None
    base: str
    work_dir: str
    resume: bool = False
    checkpoint_uri: str | None = None  # mirror complete checkpoints here (an object-store root)
    mlflow_run_id: str | None = None  # log metrics into this run
    fault: bool = False  # fail after the first mirrored checkpoint (retry tests, see sdpo.stages.FAULT_ENV)
    cache: str | None = None  # local latent cache of the train shards (train.cache)
    heldout_cache: str | None = None  # local latent cache of the held-out shards


def mirror_checkpoint(local: Path, uri: str, *, keep: int) -> None:
    """Bring the checkpoints under ``uri`` up to date with those of ``local.parent``.

    New complete local checkpoints are published (``COMPLETE`` last). The store keeps the rest of what it holds,
    so a resumed run that fetched only its newest checkpoint does not erase the older ones, and removes only: what
    the guard set aside here (``rejected-step-N``), what ``keep`` (``train.keep_checkpoints``; 0 keeps all) expires
    over the store's and this folder's checkpoints together, and incomplete uploads. ``local`` need not exist.
    """
    from sdpo.train.checkpoint import COMPLETE, REJECTED_PREFIX, STATE, beyond_newest, complete_checkpoints, step_of

    root = local.parent
    here = complete_checkpoints(root)
    there = set(complete_checkpoints(uri))
    for name in here:
        source = root / name
        if name in there and fs.read_bytes(fs.join(uri, name, STATE)) == (source / STATE).read_bytes():
            continue  # already there (state.json names the checkpoint uniquely)
        fs.publish_dir(source, fs.join(uri, name), marker=COMPLETE)
    # Set aside here and not written again since: the guard's verdict on the store's copy too.
    rejected = {name for name in there - set(here) if (root / (REJECTED_PREFIX + name)).is_dir()}
    expired = set(beyond_newest((there | set(here)) - rejected, keep=keep))  # the trainer's keep rule, over both
    for name in fs.list_dirs(uri):
        if step_of(name) is None:
            continue
        if name in rejected or name in expired or (name not in there and name not in here):
            fs.remove(fs.join(uri, name))


def _metrics_logger(run_id: str | None):
    if run_id is None:
        return None
    from mlflow import MlflowClient

    from sdpo.tracking.runs import log_metrics_at, tracking_uri

    store = MlflowClient(tracking_uri=tracking_uri())  # one client for the whole run, as before

    def log(row: dict[str, float], step: int) -> None:
        log_metrics_at(run_id, row, step, store=store)

    return log


def run_job(job: TrainJob) -> dict[str, Any]:
    """Train as described by ``job`` (on this rank); returns the training summary."""
    from sdpo.train.trainer import train

    cfg = validate_config(job.config, f"training job {job.arm}")
    keep = cfg.train.for_variant(job.arm).keep_checkpoints

    def on_checkpoint(path: Path) -> None:
        if job.checkpoint_uri is not None:
            mirror_checkpoint(path, job.checkpoint_uri, keep=keep)
        if job.fault:
            raise TrainingError(f"injected fault after checkpoint {path.name} (first attempt only); a retry resumes")

    train(cfg, shards_dir=job.shards, base_model=job.base, output_dir=job.work_dir, variant=job.arm,
          heldout_shards=job.heldout, resume=job.resume, on_metrics=_metrics_logger(job.mlflow_run_id),
          on_checkpoint=on_checkpoint, cache_dir=job.cache, heldout_cache=job.heldout_cache,
          checkpoint_store=job.checkpoint_uri)
    return json.loads((Path(job.work_dir) / "training_summary.json").read_text())


def should_launch(tcfg: TrainConfig) -> bool:
    """Whether to run under ``accelerate launch``: several GPUs here, or a launcher config, and not yet launched."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return False
    if tcfg.accelerate_config:
        return True
    import torch

    return torch.cuda.device_count() > 1


def launch_command(job_file: Path, tcfg: TrainConfig) -> list[str]:
    """``accelerate launch`` of :mod:`sdpo.train.job` with the configured launcher file, or DDP on every GPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if tcfg.accelerate_config:
        cmd += ["--config_file", tcfg.accelerate_config]
    else:
        import torch

        cmd += ["--multi_gpu", "--num_processes", str(torch.cuda.device_count())]
    return [*cmd, "-m", "sdpo.train.job", str(job_file)]


def launch(job: TrainJob, tcfg: TrainConfig) -> dict[str, Any]:
    """Run ``job`` on every rank under ``accelerate launch``; returns the summary the main rank wrote."""
    job_file = Path(job.work_dir) / JOB_FILE
    job_file.write_text(json.dumps(asdict(job), indent=2))
    proc = subprocess.run(launch_command(job_file, tcfg), check=False)
    if proc.returncode != 0:
        raise TrainingError(f"training {job.arm} under accelerate launch failed with exit code {proc.returncode}")
    return json.loads((Path(job.work_dir) / "training_summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank: ``python -m sdpo.train.job JOB.json``."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m sdpo.train.job JOB.json", file=sys.stderr)
        return 2
    run_job(TrainJob(**json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
