"""Session fixtures shared by the training, flow and DVC tests: synthetic shards and the toy base model.

The toy base is built once per test session with the repository's params.yaml (the embedded default), so the
pathology test runs on exactly the model `make run` builds.
"""

import os
from pathlib import Path

import pytest

from sdpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def make_shards(out: Path, *, pairs: int, seed: int, split: str, resolution: int) -> Path:
    from sdpo.data.pickapic import ingest
    from sdpo.data.synthetic import make_pairs, write_parquet

    parquet = write_parquet(make_pairs(pairs, seed, split=split, resolution=resolution), out / f"{split}.parquet")
    ingest(str(parquet), out / split, resolution=resolution)
    return out / split


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> dict[str, Path]:
    """Train and held-out shards of the synthetic world with the default params."""
    cfg = load_config(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("toy-shards")
    syn = cfg.data.synthetic
    return {
        "train": make_shards(out, pairs=syn.train_pairs, seed=syn.seed, split="train", resolution=cfg.data.resolution),
        "heldout": make_shards(out, pairs=syn.heldout_pairs, seed=syn.seed, split="heldout",
                               resolution=cfg.data.resolution),
    }


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    """One toy-base cache for the whole test run: under pytest-xdist its workers share it (the base's cache key is
    the content of what determines it, so every worker asks for the same folder)."""
    base = tmp_path_factory.getbasetemp()
    run_dir = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
    shared = run_dir / "toy-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def toy_base(toy_shards, toy_cache) -> Path:
    """The toy base model, pretrained with the default params (a few minutes, once per test run)."""
    from filelock import FileLock

    from sdpo.train.pretrain import ensure_toy_base

    with FileLock(str(toy_cache / ".build.lock")):  # one worker builds it, the others wait and reuse it
        return ensure_toy_base(load_config(ROOT / "params.yaml"), toy_shards["train"], cache_dir=toy_cache)


@pytest.fixture(scope="session")
def toy_latents(toy_base, toy_shards, tmp_path_factory) -> dict[str, Path]:
    """The latent caches `make run` trains from (``train.cache``, params.yaml's dtype and flips): the train and
    held-out shards encoded once by the toy base (a few seconds per worker)."""
    from sdpo.models import load_model
    from sdpo.train.encode import encode_dataset

    cfg = load_config(ROOT / "params.yaml")
    assert cfg.train.cache, "params.yaml trains from the latent cache; so does the pathology test"
    model = load_model(str(toy_base))
    model.freeze_all_but_denoiser()
    out = tmp_path_factory.mktemp("toy-latents")
    for split in ("train", "heldout"):
        (out / split).mkdir()
        encode_dataset(model, toy_shards[split], out / split, cfg.train, model_uri=str(toy_base),
                       shard_max_pairs=cfg.data.shard_max_pairs, source_uri=str(toy_shards[split]), progress=False)
    return {split: out / split for split in ("train", "heldout")}


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A few 32 px pairs for the tiny model families."""
    return make_shards(tmp_path_factory.mktemp("small-shards"), pairs=12, seed=3, split="train", resolution=32)
