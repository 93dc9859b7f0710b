"""Ingestion throughput on 512 px JPEG pairs, against a decode-only baseline measured in the same run.

Ratios, not absolute timings, are the point (the machine may be shared):

- ``ingest_vs_decode_512_jpg``: ingestion at the real-scale setting (512 px, jpg shards) per worker, divided by
  just PIL-decoding the same images. Re-encoding costs about as much as decoding, so ~0.4-0.5 is expected.
- ``ingest_vs_decode_16_png``: the toy setting (16 px, png shards); JPEG draft decoding makes it faster than a
  full decode (ratio > 1).
- ``workers_2_vs_1``: pairs/s with 2 worker threads over 1 (at most 2 on a 2-core machine; less when it is shared).

Run ``python bench/bench_ingest.py [--quick]``; ``run(out, quick)`` is the entry point for a benchmark runner.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sdpo.data.pickapic import PICKAPIC_V2_SCHEMA, ingest
from sdpo.data.synthetic import make_pairs


def _photo_like_jpeg(rng: np.random.Generator, size: int = 512) -> bytes:
    """A JPEG with smooth structure plus fine texture, so it compresses and decodes like a photograph."""
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    texture = rng.normal(0, 12, (size, size, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_jpeg_parquet(path: Path, pairs: int, distinct_images: int = 24, seed: int = 0) -> list[bytes]:
    """A Pick-a-Pic v2 parquet of ``pairs`` rows with 512 px JPEGs; returns every image, in row order."""
    rng = np.random.default_rng(seed)
    images = [_photo_like_jpeg(rng) for _ in range(distinct_images)]
    rows = make_pairs(pairs, seed=seed).to_pydict()
    picks = rng.integers(0, distinct_images, size=(pairs, 2))
    rows["jpg_0"] = [images[a] for a, _ in picks]
    rows["jpg_1"] = [images[b] for _, b in picks]
    pq.write_table(pa.Table.from_pydict(rows, schema=PICKAPIC_V2_SCHEMA), path)
    return rows["jpg_0"] + rows["jpg_1"]


def _decode_only(images: list[bytes]) -> float:
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    return time.perf_counter() - start


def _timed_ingest(source: Path, out: Path, **options) -> float:
    start = time.perf_counter()
    ingest(str(source), out, **options)
    return time.perf_counter() - start


def run(out: dict, quick: bool) -> None:
    """Measure and store pairs/s and ratios in ``out`` (keys prefixed ``ingest_``), and print them."""
    pairs = 64 if quick else 200
    importlib.import_module("webdataset")  # the shard writer imports it (and torch): not part of the timings
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        source = tmp_path / "jpeg512.parquet"
        images = make_jpeg_parquet(source, pairs)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        decode_s = _decode_only(images)
        real_1 = _timed_ingest(source, tmp_path / "real1", resolution=512, image_format="jpg", workers=1)
        real_2 = _timed_ingest(source, tmp_path / "real2", resolution=512, image_format="jpg", workers=2)
        toy_1 = _timed_ingest(source, tmp_path / "toy1", resolution=16, image_format="png", workers=1)
    results = {
        "ingest_pairs": pairs,
        "ingest_jpeg_kib": round(mean_kb, 1),
        "ingest_decode_only_pairs_per_s": pairs / decode_s,
        "ingest_512_jpg_pairs_per_s_1_worker": pairs / real_1,
        "ingest_512_jpg_pairs_per_s_2_workers": pairs / real_2,
        "ingest_16_png_pairs_per_s_1_worker": pairs / toy_1,
        "ingest_vs_decode_512_jpg": decode_s / real_1,
        "ingest_vs_decode_16_png": decode_s / toy_1,
        "ingest_workers_2_vs_1": real_1 / real_2,
        "ingest_cpu_count": os.cpu_count(),
    }
    out.update(results)
    for name, value in results.items():
        print(f"{name:40s} {value:.3f}" if isinstance(value, float) else f"{name:40s} {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 pairs instead of 200")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args()
    results: dict = {}
    run(results, args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
