"""The toy base is cached by what the data holds, not where it lies."""

from sdpo.data.pickapic import ingest
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.train.pretrain import data_content_digest


def test_toy_base_cache_key_ignores_where_the_data_was_made(tmp_path):
    table = make_pairs(6, 0)
    for name in ("run-a", "run-b"):
        parquet = write_parquet(table, tmp_path / name / "train.parquet")
        ingest(str(parquet), tmp_path / name / "shards")
    assert data_content_digest(tmp_path / "run-a" / "shards") == data_content_digest(tmp_path / "run-b" / "shards")
    other = write_parquet(make_pairs(6, 1), tmp_path / "run-c" / "train.parquet")
    ingest(str(other), tmp_path / "run-c" / "shards")
    assert data_content_digest(tmp_path / "run-c" / "shards") != data_content_digest(tmp_path / "run-a" / "shards")
