"""Loaders over ingested shards: random access, the resumable DDP-safe PairLoader, streaming, arrays."""

import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from sdpo.data.loader import PairDataset, PairLoader, load_pairs_arrays, webdataset_pipeline
from sdpo.data.pickapic import ingest
from sdpo.data.synthetic import judge_scores, make_pairs, write_parquet
from sdpo.errors import DataError

PAIRS = 150


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    source = write_parquet(make_pairs(PAIRS, seed=9), root / "pairs.parquet")
    ingest(str(source), root / "shards", shard_max_pairs=40)
    return root / "shards"


@pytest.fixture(scope="module")
def dataset(dataset_dir) -> PairDataset:
    return PairDataset(dataset_dir)


def _keys(loader: PairLoader, batches: int) -> list[list[str]]:
    return [batch["key"] for batch in itertools.islice(iter(loader), batches)]


def test_dataset_random_access_matches_the_source(dataset, dataset_dir):
    source = pq.read_table(dataset_dir.parent / "pairs.parquet").to_pylist()
    assert len(dataset) == PAIRS and dataset.manifest["pairs_written"] == PAIRS
    for i in (0, 41, PAIRS - 1, -1):
        item = dataset[i]
        assert item["win"].dtype == np.uint8 and item["win"].shape == item["lose"].shape == (16, 16, 3)
        row = source[item["meta"]["row"]]
        winner = item["meta"]["winner"]
        expected = np.asarray(Image.open(io.BytesIO(row[winner])).convert("RGB"))
        assert np.array_equal(item["win"], expected)
        assert item["caption"] == row["caption"] and item["key"] == f"0000_{item['meta']['row']:09d}"
        scores = judge_scores(np.stack([item["win"], item["lose"]]), [item["caption"]] * 2)
        assert scores[0] > scores[1]
    with pytest.raises(IndexError):
        dataset[PAIRS]


def test_dataset_requires_a_manifest(tmp_path):
    with pytest.raises(DataError, match="not a dataset"):
        PairDataset(tmp_path)


def test_loader_batches_epochs_and_determinism(dataset):
    loader = PairLoader(dataset, batch_size=16, seed=3)
    assert loader.batches_per_epoch == PAIRS // 16
    batches = list(itertools.islice(iter(loader), 2 * loader.batches_per_epoch + 1))
    first = batches[0]
    assert first["win"].dtype == torch.float32 and first["win"].shape == (16, 3, 16, 16)
    assert first["lose"].shape == (16, 3, 16, 16) and len(first["caption"]) == 16
    assert first["win"].min() >= -1 and first["win"].max() <= 1
    epoch0 = [k for b in batches[: loader.batches_per_epoch] for k in b["key"]]
    epoch1 = [k for b in batches[loader.batches_per_epoch : 2 * loader.batches_per_epoch] for k in b["key"]]
    assert len(set(epoch0)) == len(epoch0) == loader.batches_per_epoch * 16  # truncated, no pair twice
    assert epoch0 != epoch1  # a new permutation every epoch
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch"] == 1
    again = PairLoader(dataset, batch_size=16, seed=3)
    assert _keys(again, 3) == [b["key"] for b in batches[:3]]
    other = PairLoader(dataset, batch_size=16, seed=4)
    assert _keys(other, 1) != [batches[0]["key"]]
    # the batch tensors are the pairs of the dataset, scaled to [-1, 1]
    index = dataset.keys.index(first["key"][0])
    expected = torch.from_numpy(dataset[index]["win"]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(first["win"][0], expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_iteration(dataset, num_workers):
    reference = _keys(PairLoader(dataset, batch_size=8, seed=1, random_flip=True), 25)
    loader = PairLoader(dataset, batch_size=8, seed=1, random_flip=True, num_workers=num_workers, prefetch_factor=2)
    taken = _keys(loader, 20)  # the workers have prefetched more than this; the cursor counts only these
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == divmod(20, loader.batches_per_epoch)
    resumed = PairLoader(dataset, batch_size=8, seed=1, random_flip=True, num_workers=num_workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert taken + _keys(resumed, 5) == reference


def test_random_flip_is_shared_by_winner_and_loser_and_reproducible(dataset):
    plain = next(iter(PairLoader(dataset, batch_size=32, seed=2)))
    loader = PairLoader(dataset, batch_size=32, seed=2, random_flip=True)
    flipped = next(iter(loader))
    assert plain["key"] == flipped["key"]
    indices, flips = loader.epoch_plan(0)
    decisions = [bool(flips[i]) for i in indices[0]]
    assert 4 < sum(decisions) < 28
    for i, flip in enumerate(decisions):
        for side in ("win", "lose"):  # the same decision for both images of a pair
            expected = plain[side][i].flip(-1) if flip else plain[side][i]
            assert torch.equal(flipped[side][i], expected)
    assert any(not torch.equal(plain["lose"][i], plain["lose"][i].flip(-1)) for i in range(32) if decisions[i])
    again = next(iter(PairLoader(dataset, batch_size=32, seed=2, random_flip=True)))
    assert torch.equal(again["win"], flipped["win"]) and torch.equal(again["lose"], flipped["lose"])


def test_state_from_another_setup_is_refused(dataset):
    state = PairLoader(dataset, batch_size=8, seed=1).state_dict()
    with pytest.raises(DataError, match="batch_size"):
        PairLoader(dataset, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        PairLoader(dataset, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="out of range"):
        PairLoader(dataset, batch_size=8, seed=1).load_state_dict({**state, "batch": 10_000})


def test_dataset_smaller_than_a_global_batch_is_an_error(dataset):
    with pytest.raises(DataError, match="fewer than one global batch"):
        PairLoader(dataset, batch_size=100, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PairLoader(dataset, batch_size=4, seed=0, rank=2, world_size=2)


def _rank_worker(rank: int, world_size: int, dataset_dir: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        loader = PairLoader(PairDataset(dataset_dir), batch_size=8, seed=5, rank=rank, world_size=world_size)
        keys = [key for batch in itertools.islice(iter(loader), loader.batches_per_epoch) for key in batch["key"]]
        batches = torch.tensor([loader.batches_per_epoch])
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            result = {"keys": gathered, "max_batches": int(batches), "per_rank": loader.batches_per_epoch}
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_gloo_split_an_epoch_without_overlap(dataset_dir, tmp_path):
    out = tmp_path / "result.json"
    mp.start_processes(
        _rank_worker,
        args=(2, str(dataset_dir), str(tmp_path / "store"), str(out)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    result = json.loads(out.read_text())
    rank0, rank1 = result["keys"]
    assert len(rank0) == len(rank1) == result["per_rank"] * 8 and result["max_batches"] == result["per_rank"]
    assert result["per_rank"] == PAIRS // 16
    assert not set(rank0) & set(rank1) and len(set(rank0)) == len(rank0)
    # the two ranks together see the same pairs as one rank with the global batch
    single = PairLoader(PairDataset(dataset_dir), batch_size=16, seed=5)
    assert sorted(rank0 + rank1) == sorted(k for keys in _keys(single, single.batches_per_epoch) for k in keys)


def test_webdataset_pipeline_yields_the_same_pairs(dataset, dataset_dir):
    batches = list(webdataset_pipeline(dataset_dir, batch_size=10, seed=0, shuffle=False))
    assert len(batches) == PAIRS // 10
    keys = [k for b in batches for k in b["key"]]
    assert keys == dataset.keys[: len(keys)]
    for b in (0, 7):
        for j in (0, 9):
            item = dataset[dataset.keys.index(batches[b]["key"][j])]
            expected = torch.from_numpy(item["win"]).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(batches[b]["win"][j], expected) and batches[b]["caption"][j] == item["caption"]
    shuffled = webdataset_pipeline(dataset_dir, batch_size=10, seed=0, shuffle=True, shuffle_buffer=50)
    shuffled_keys = [k for b in shuffled for k in b["key"]]
    assert sorted(shuffled_keys) == sorted(keys) and shuffled_keys != keys
    fixed = webdataset_pipeline(dataset_dir, batch_size=10, seed=0, shuffle=False, batches_per_epoch=20)
    assert len(list(fixed)) == 20  # repeats the stream to give every rank the same number of batches


def test_load_pairs_arrays(dataset_dir, dataset):
    arrays = load_pairs_arrays(dataset_dir, n=12)
    assert arrays["win"].shape == arrays["lose"].shape == (12, 16, 16, 3) and arrays["win"].dtype == np.uint8
    assert arrays["key"] == dataset.keys[:12] and len(arrays["caption"]) == 12
    assert np.array_equal(arrays["lose"][3], dataset[3]["lose"])
    assert load_pairs_arrays(dataset_dir)["win"].shape[0] == PAIRS


def test_dataset_survives_pickling_for_spawned_workers(dataset):
    import pickle

    dataset[0]  # opens a descriptor in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._fds == {} and clone[5]["key"] == dataset[5]["key"]
    assert os.getpid() == clone._fd_pid
