"""Helpers for the training-reliability tests: a tiny run root, stage contexts, planted pickles, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest

from sdpo import fs

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# three steps, a checkpoint after each: the smallest run with a checkpoint to resume, one to keep and one to write
# From the images (train.cache=false): checkpoints, resume and locks do not depend on where the latents come from;
# tests/test_cache_stage.py runs the same stages from the latent cache.
TINY_SETS = ["train.cache=false", "train.steps=3", "train.batch_size=4", "train.heldout_every=0",
             "train.checkpoint_every=1", "train.log_every=1", "train.beta=500"]
ACCELERATE_NAMES = ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "scaler.pt",
                    "sampler.bin", "dl_state_dict.bin", "pytorch_model.bin", "model.safetensors")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from sdpo.models.tiny import build_tiny_pipeline

    return Path(build_tiny_pipeline("sd15", str(tmp_path_factory.mktemp("tiny-sd15") / "sd15"), resolution=32))


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for these tests (its schema is created once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-trainrel') / 'mlflow.db'}"


@pytest.fixture
def tracking(monkeypatch, tracking_uri) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tracking_uri


@pytest.fixture(scope="module")
def moto_s3():
    """A local S3 server (moto) with a bucket, and every client pointed at it for the module."""
    import s3fs

    from sdpo.devstack import local_s3

    with local_s3("sdpo-trainrel") as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # clients read the endpoint when they are made
        yield server
        s3fs.S3FileSystem.clear_instance_cache()


def make_root(root: Path, shards: Path, base: Path) -> Path:
    """A run root with the train shards and a recorded base, as `sdpo ingest` and `sdpo base` leave it."""
    shutil.copytree(shards, root / "shards" / "train")
    fs.write_json(root / "models" / "base" / "base.json", {"uri": str(base)})
    return root


def context(root: Path, *sets: str):
    from sdpo.stages import StageContext

    return StageContext.load(PARAMS, [f"data.root={root}", *TINY_SETS, *sets])


def cli_args(root: Path, *sets: str, variant: str = "dpo") -> list[str]:
    args = ["train", "--config", str(PARAMS), "--variant", variant, "--set", f"data.root={root}"]
    for item in (*TINY_SETS, *sets):
        args += ["--set", item]
    return args


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``: equal snapshots mean the folder is intact."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Planted:
    """A pickle whose unpickling creates ``marker`` (standing in for any code an attacker wants run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))
