"""Datasets ingested in parallel merge into one dataset with unique keys and summed counts."""

import tarfile

import pytest

from sdpo.data.loader import PairDataset
from sdpo.data.merge import merge_datasets
from sdpo.data.pickapic import ingest
from sdpo.data.shards import read_manifest, verify_shards
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.errors import DataError


def part(tmp_path, name, n, seed, resolution=16, ties=0.0):
    parquet = write_parquet(make_pairs(n, seed, resolution=resolution, tie_fraction=ties), tmp_path / f"{name}.parquet")
    ingest(str(parquet), tmp_path / name, resolution=resolution, shard_max_pairs=4)
    return tmp_path / name


def test_merge_concatenates_parts_with_unique_keys(tmp_path):
    a, b = part(tmp_path, "a", 10, 0, ties=0.3), part(tmp_path, "b", 7, 1)
    ma, mb = read_manifest(a), read_manifest(b)
    merged = merge_datasets([a, b], tmp_path / "merged", shard_max_pairs=5)
    assert merged["pairs_written"] == ma["pairs_written"] + mb["pairs_written"]
    assert merged["rows_read"] == 17
    assert merged["skipped"]["tie"] == ma["skipped"]["tie"] + mb["skipped"]["tie"]
    assert len(merged["inputs"]) == 2 and merged["config"]["merged_parts"] == 2
    verify_shards(tmp_path / "merged")  # sha256 of every shard matches the manifest
    dataset = PairDataset(tmp_path / "merged")
    assert len(dataset) == merged["pairs_written"]
    keys = [dataset[i]["key"] for i in range(len(dataset))]
    assert len(set(keys)) == len(keys) and all(k.startswith(("p0000_", "p0001_")) for k in keys)
    assert dataset[0]["caption"] == PairDataset(a)[0]["caption"]
    for shard in merged["shards"]:
        with tarfile.open(tmp_path / "merged" / shard["name"]) as tar:
            assert len(tar.getnames()) == 4 * shard["pairs"]


def test_merge_is_deterministic_and_refuses_mixed_resolutions(tmp_path):
    a, b = part(tmp_path, "a", 6, 0), part(tmp_path, "b", 6, 1)
    merge_datasets([a, b], tmp_path / "m1")
    merge_datasets([a, b], tmp_path / "m2")
    assert (tmp_path / "m1" / "manifest.json").read_bytes() == (tmp_path / "m2" / "manifest.json").read_bytes()
    c = part(tmp_path, "c", 6, 2, resolution=32)
    with pytest.raises(DataError, match="different resolutions"):
        merge_datasets([a, c], tmp_path / "m3")
    with pytest.raises(DataError, match="no parts"):
        merge_datasets([], tmp_path / "m4")

