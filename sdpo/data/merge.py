"""Merge datasets ingested in parallel (one per group of input files) into one dataset.

Keys are only unique within a part (they count input files from zero), so samples are re-keyed with their part
number (``p0003_...``) and re-written through the deterministic shard writer. Rejects and counts are concatenated.
Every part is verified against its manifest (:func:`~sdpo.data.integrity.verify_dataset`) before anything is written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sdpo.data.integrity import verify_dataset
from sdpo.data.shards import (
    REJECTS_NAME,
    SCHEMA_VERSION,
    ShardWriter,
    index_shard,
    staged_dataset_dir,
    write_manifest,
)
from sdpo.errors import DataError


def merge_datasets(parts: list[str | Path], out_dir: str | Path, *, shard_max_pairs: int = 1000) -> dict[str, Any]:
    """Concatenate the datasets in ``parts`` (in the given order) into ``out_dir``; returns the new manifest."""
    if not parts:
        raise DataError("merge_datasets: no parts to merge")
    manifests = [verify_dataset(p) for p in parts]  # every shard of every part, before anything is written
    resolutions = {m["resolution"] for m in manifests}
    if len(resolutions) != 1:
        names = [str(p) for p in parts]
        raise DataError(f"cannot merge datasets of different resolutions {sorted(resolutions)}: {names}")
    skipped: Counter = Counter()
    for m in manifests:
        skipped.update(m["skipped"])
    with staged_dataset_dir(out_dir) as staging:
        with ShardWriter(staging, shard_max_pairs) as writer, open(staging / REJECTS_NAME, "wb") as rejects:
            for index, part in enumerate(parts):
                for entry in manifests[index]["shards"]:
                    shard = Path(part) / entry["name"]
                    with open(shard, "rb") as f:
                        for key, fields in index_shard(shard, expected_pairs=entry["pairs"]):
                            data = {}
                            for name, ref in sorted(fields.items()):
                                f.seek(ref.offset)
                                data[name] = f.read(ref.size)
                            writer.write(f"p{index:04d}_{key}", data)
                part_rejects = Path(part) / REJECTS_NAME
                if part_rejects.exists():
                    rejects.write(part_rejects.read_bytes())
            shards = writer.close()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "inputs": [record for m in manifests for record in m["inputs"]],
            "rows_read": sum(m["rows_read"] for m in manifests),
            "pairs_written": sum(s["pairs"] for s in shards),
            "skipped": dict(sorted(skipped.items())),
            "shards": shards,
            "config": {**manifests[0]["config"], "shard_max_pairs": shard_max_pairs, "merged_parts": len(parts)},
            "resolution": manifests[0]["resolution"],
        }
        write_manifest(staging, manifest)
    return manifest
