"""Pick-a-Pic v2 parquet -> validated WebDataset shards (``sdpo ingest``).

Parquet is streamed with ``pyarrow.dataset`` (column projection; the tie filter is pushed down), every row is
validated, the winner is put first, images are normalised (:mod:`sdpo.data.normalize`: EXIF orientation applied,
16-bit scaled to 8 bit, transparency composited onto white), resized (shorter side) and centre-cropped to the
resolution, and pairs are written into deterministic shards inside a temporary sibling folder that replaces the output
folder at the end. Inputs are resolved by :mod:`sdpo.data.sources`; an input that cannot be reached or read stops
ingestion with one line naming it.
Bad input (no files, not parquet, a missing column, zero rows) stops before anything is written; a bad row is only
counted in ``skipped`` and recorded in ``rejects.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from sdpo.data.messages import one_line
from sdpo.data.normalize import describe_code_points, has_visible_text, to_rgb8
from sdpo.data.shards import (
    REJECTS_NAME,
    SCHEMA_VERSION,
    ShardWriter,
    staged_dataset_dir,
    write_manifest,
)
from sdpo.data.sources import InputFile, reading, resolve_inputs  # resolve_inputs: also imported from here
from sdpo.errors import DataError

PICKAPIC_V2_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
OPTIONAL_COLUMNS = ("label_1", "ranking_id", "model_0", "model_1")
# Every reason a row can be skipped for; the manifest lists them all (zeros included) so its shape is stable.
SKIP_REASONS = (
    "tie",
    "invalid_label",
    "empty_caption",
    "invisible_caption",
    "duplicate_ranking_id",
    "missing_image",
    "undecodable_image",
    "image_too_small",
)
ImageFormat = Literal["png", "jpg"]
_ROWS_PER_TASK = 16


# --- input checks -------------------------------------------------------------------------------------------


def _check_type(path: str, schema: pa.Schema, column: str, ok: Callable[[pa.DataType], bool], expected: str) -> None:
    dtype = schema.field(column).type
    if not ok(dtype):
        raise DataError(f"{path}: column {column!r} has type {dtype}, expected {expected}")


def inspect_input(f: InputFile) -> tuple[pa.Schema, int]:
    """Schema and row count of one input; :class:`DataError` if it cannot be read, is not parquet or lacks a column."""
    with reading(f.path, "opening"):  # network, credentials, permissions: before any parsing
        handle = f.filesystem.open_input_file(f.fs_path)
    with handle:
        try:
            meta = pq.ParquetFile(handle)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{f.path}: not a parquet file ({one_line(err)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{f.path}: missing required column(s) {missing}; found {schema.names}")
    _check_type(f.path, schema, "caption", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string")
    for column in ("jpg_0", "jpg_1"):
        _check_type(f.path, schema, column, lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary")
    for column in ("label_0", "label_1"):
        if column in schema.names:
            _check_type(f.path, schema, column, lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "number")
    return schema, rows


def _input_sha256(f: InputFile, chunk: int = 1 << 22) -> tuple[int, str]:
    # Not hashlib.file_digest: it cannot count the bytes it hashes, and an s3 stream has no size() or tell().
    digest, size = hashlib.sha256(), 0
    with reading(f.path, "reading"), f.filesystem.open_input_stream(f.fs_path) as stream:
        while block := stream.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# --- row validation (runs in worker threads) -----------------------------------------------------------------


@dataclass(frozen=True)
class RowOptions:
    """What validation and image preparation need."""

    resolution: int
    min_size: int
    keep_ties: bool
    image_format: ImageFormat


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class Accepted:
    win: bytes
    lose: bytes
    caption: str
    winner: int  # 0 if jpg_0 won (or a kept tie), 1 if jpg_1 won


class _RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _check_label(label_0: float | None, label_1: float | None, keep_ties: bool) -> int:
    """Index of the winning image (0 for a kept tie)."""
    if label_0 is None:
        raise _RowRejected("invalid_label", "label_0 is missing")
    if math.isnan(label_0):
        raise _RowRejected("invalid_label", "label_0 is NaN")
    if label_0 == 0.5:
        if not keep_ties:
            raise _RowRejected("tie", "label_0 is 0.5 (a tie)")
    elif label_0 not in (0.0, 1.0):
        raise _RowRejected("invalid_label", f"label_0 is {label_0}, expected 0 or 1 (or 0.5 with --keep-ties)")
    if label_1 is not None and not abs(label_1 - (1.0 - label_0)) <= 1e-6:
        raise _RowRejected("invalid_label", f"label_1 is {label_1}, expected 1 - label_0 = {1.0 - label_0}")
    return 1 if label_0 == 0.0 else 0


def _prepare_image(data: bytes | None, column: str, options: RowOptions) -> bytes:
    """Decode, check the size, normalise (:func:`~sdpo.data.normalize.to_rgb8`), resize, centre-crop, re-encode."""
    if not data:
        raise _RowRejected("missing_image", f"{column} is empty")
    try:
        image = Image.open(BytesIO(data))
        width, height = image.size
        if min(width, height) < options.min_size:
            raise _RowRejected("image_too_small", f"{column} is {width}x{height}, smaller than {options.min_size} px")
        image.draft("RGB", (options.resolution, options.resolution))  # JPEG: decode at a reduced scale, much faster
        image.load()
        image = to_rgb8(image)  # EXIF orientation, 16-bit scaling, transparency on ALPHA_BACKGROUND
    except _RowRejected:
        raise
    except Exception as err:  # any decoder failure is a bad row, never a crash
        message = one_line(err)  # no "<_io.BytesIO object at 0x7f..>": that would break reproducibility
        raise _RowRejected("undecodable_image", f"{column}: {type(err).__name__}: {message}") from None
    size = (options.resolution, options.resolution)
    image = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    buffer = BytesIO()
    if options.image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def validate_row(
    caption: str | None,
    jpg_0: bytes | None,
    jpg_1: bytes | None,
    label_0: float | None,
    label_1: float | None,
    options: RowOptions,
) -> Accepted | Rejected:
    """Check labels, caption and both images of one row (in that order); the winner comes first."""
    try:
        winner = _check_label(label_0, label_1, options.keep_ties)
        if caption is None:
            raise _RowRejected("empty_caption", "caption is missing")
        caption = caption.strip()
        if not caption:
            raise _RowRejected("empty_caption", "caption is empty")
        if not has_visible_text(caption):
            detail = f"caption has no visible character ({describe_code_points(caption)})"
            raise _RowRejected("invisible_caption", detail)
        images = [_prepare_image(jpg_0, "jpg_0", options), _prepare_image(jpg_1, "jpg_1", options)]
    except _RowRejected as rejected:
        return Rejected(rejected.reason, str(rejected))
    return Accepted(images[winner], images[1 - winner], caption, winner)


def _validate_rows(rows: list[tuple], options: RowOptions) -> list[Accepted | Rejected]:
    return [validate_row(*row, options) for row in rows]


# --- scanning and the ordered worker pool -------------------------------------------------------------------


@dataclass
class _RowMeta:
    file_index: int
    source: str
    row: int
    ranking_id: int | None
    model_0: str | None
    model_1: str | None
    label_0: float | None
    label_1: float | None
    early: Rejected | None  # decided while scanning, in order (duplicates), not sent to a worker


def _tie_filter(keep_ties: bool) -> ds.Expression | None:
    if keep_ties:
        return None
    label = pc.field("label_0")
    return (label != 0.5) | label.is_null()  # nulls and NaN pass, to be rejected (and counted) by validation


def _kept_rows(f: InputFile, keep_ties: bool) -> np.ndarray:
    """Original row numbers that pass the tie filter (the scanner drops the others, and with them the row numbers)."""
    with reading(f.path, "reading labels"), f.filesystem.open_input_file(f.fs_path) as handle:
        labels = pq.ParquetFile(handle).read(columns=["label_0"]).column(0)
    values = labels.cast(pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    keep = np.ones(len(values), bool) if keep_ties else ~(values == 0.5)
    return np.flatnonzero(keep)


def _batches(f: InputFile, columns: list[str], keep_ties: bool) -> Iterator[pa.RecordBatch]:
    """Record batches of one input (projected, tie filter pushed down); read failures name the input."""
    with reading(f.path, "scanning"):
        dataset = ds.dataset(f.fs_path, filesystem=f.filesystem, format="parquet")
        scanner = dataset.scanner(
            columns=columns,
            filter=_tie_filter(keep_ties),
            batch_size=_ROWS_PER_TASK,
            batch_readahead=2,
            fragment_readahead=1,
        )
        yield from scanner.to_batches()


def _scan(
    files: list[InputFile], inspected: list[tuple[pa.Schema, int]], options: RowOptions, skipped: Counter
) -> Iterator[tuple[list[_RowMeta], list[tuple]]]:
    """Yield tasks ``(metadata of each row, payload rows for a worker)`` in input order."""
    seen_ids: set[int] = set()
    for file_index, (f, (schema, num_rows)) in enumerate(zip(files, inspected, strict=True)):
        columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in schema.names]
        kept = _kept_rows(f, options.keep_ties)
        skipped["tie"] += num_rows - len(kept)
        position = 0
        for batch in _batches(f, columns, options.keep_ties):
            if batch.num_rows == 0:
                continue
            data = batch.to_pydict()
            absent = [None] * batch.num_rows  # for optional columns this file lacks
            ranking_ids, labels_1 = data.get("ranking_id", absent), data.get("label_1", absent)
            models_0, models_1 = data.get("model_0", absent), data.get("model_1", absent)
            metas: list[_RowMeta] = []
            payload: list[tuple] = []
            for j in range(batch.num_rows):
                row = int(kept[position + j])
                ranking_id, label_0, label_1 = ranking_ids[j], data["label_0"][j], labels_1[j]
                meta = _RowMeta(file_index, f.path, row, ranking_id, models_0[j], models_1[j], label_0, label_1, None)
                if ranking_id is not None and ranking_id in seen_ids:
                    meta.early = Rejected("duplicate_ranking_id", f"ranking_id {ranking_id} already seen")
                else:
                    if ranking_id is not None:
                        seen_ids.add(ranking_id)
                    payload.append((data["caption"][j], data["jpg_0"][j], data["jpg_1"][j], label_0, label_1))
                metas.append(meta)
            position += batch.num_rows
            yield metas, payload
        if position != len(kept):  # the pushed-down filter and the row numbering must agree
            raise DataError(f"{f.path}: scanned {position} rows but expected {len(kept)} after the tie filter")


def _run_ordered(
    tasks: Iterator[tuple[list[_RowMeta], list[tuple]]], options: RowOptions, workers: int
) -> Iterator[tuple[list[_RowMeta], list[Accepted | Rejected]]]:
    """Validate task payloads, in ``workers`` threads when > 1; results come back in task order.

    Threads, not processes: Pillow releases the GIL while decoding, resizing and encoding, which is nearly all the
    work on real images, and threads need no start-up or copying of image bytes between processes.
    """
    if workers <= 1:
        for metas, payload in tasks:
            yield metas, _validate_rows(payload, options)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for metas, payload in tasks:
            pending.append((metas, pool.submit(_validate_rows, payload, options)))
            if len(pending) >= 2 * workers:  # bounded: never more than a few batches in memory
                done_metas, future = pending.popleft()
                yield done_metas, future.result()
        while pending:
            done_metas, future = pending.popleft()
            yield done_metas, future.result()


# --- ingest -------------------------------------------------------------------------------------------------


def sample_key(file_index: int, row: int) -> str:
    """Shard key of a row: no dots or slashes, sortable, unique per (input file, row)."""
    return f"{file_index:04d}_{row:09d}"


def _sample_fields(meta: _RowMeta, result: Accepted, ext: str) -> dict[str, bytes]:
    label_1 = meta.label_1 if meta.label_1 is not None else 1.0 - meta.label_0
    models = [meta.model_0, meta.model_1]
    info = {
        "source": meta.source,
        "row": meta.row,
        "ranking_id": meta.ranking_id,
        "label_0": meta.label_0,
        "label_1": label_1,
        "winner": f"jpg_{result.winner}",
        "model_win": models[result.winner],
        "model_lose": models[1 - result.winner],
        "caption": result.caption,
    }
    return {
        f"win.{ext}": result.win,
        f"lose.{ext}": result.lose,
        "txt": result.caption.encode("utf-8"),
        "json": json.dumps(info, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def _reject_line(meta: _RowMeta, rejected: Rejected) -> bytes:
    record = {
        "source": meta.source,
        "row": meta.row,
        "ranking_id": meta.ranking_id,
        "reason": rejected.reason,
        "detail": rejected.detail,
    }
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def ingest(
    inputs: str | list[str],
    out_dir: str | Path,
    *,
    resolution: int = 16,
    shard_max_pairs: int = 1000,
    workers: int = 1,
    keep_ties: bool = False,
    min_size: int = 8,
    image_format: ImageFormat = "png",
) -> dict[str, Any]:
    """Validate Pick-a-Pic parquet ``inputs`` into WebDataset shards in ``out_dir``; returns the manifest.

    The output (shards, ``rejects.jsonl``, ``manifest.json``) is byte-identical for the same inputs and options,
    whatever ``workers`` is. ``out_dir`` is replaced whole and atomically.
    """
    if resolution < 1 or shard_max_pairs < 1 or workers < 1 or min_size < 1:
        raise DataError("resolution, shard_max_pairs, workers and min_size must all be at least 1")
    if image_format not in ("png", "jpg"):
        raise DataError(f"image format must be 'png' or 'jpg', got {image_format!r}")
    files = resolve_inputs(inputs)
    inspected = [inspect_input(f) for f in files]
    rows_read = sum(rows for _, rows in inspected)
    if rows_read == 0:
        raise DataError(f"{inputs}: the input has zero rows ({len(files)} file(s): {[f.path for f in files]})")
    input_records = []
    for f in files:
        size, sha256 = _input_sha256(f)
        input_records.append({"path": f.path, "size": size, "sha256": sha256})

    options = RowOptions(resolution, min_size, keep_ties, image_format)
    skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
    with staged_dataset_dir(out_dir) as staging:
        with ShardWriter(staging, shard_max_pairs) as writer, open(staging / REJECTS_NAME, "wb") as rejects:
            for metas, results in _run_ordered(_scan(files, inspected, options, skipped), options, workers):
                outcomes = iter(results)
                for meta in metas:
                    outcome = meta.early or next(outcomes)
                    if isinstance(outcome, Rejected):
                        skipped[outcome.reason] += 1
                        rejects.write(_reject_line(meta, outcome))
                    else:
                        writer.write(sample_key(meta.file_index, meta.row), _sample_fields(meta, outcome, image_format))
            shards = writer.close()
        pairs_written = sum(shard["pairs"] for shard in shards)
        if pairs_written == 0:
            counts = {k: v for k, v in skipped.items() if v}
            raise DataError(f"{inputs}: no valid pairs; all {rows_read} rows were skipped {counts}")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "inputs": input_records,
            "rows_read": rows_read,
            "pairs_written": pairs_written,
            "skipped": dict(sorted(skipped.items())),
            "shards": shards,
            "config": {
                "resolution": resolution,
                "shard_max_pairs": shard_max_pairs,
                "keep_ties": keep_ties,
                "format": image_format,
                "min_size": min_size,
            },
            "resolution": resolution,
        }
        write_manifest(staging, manifest)
    return manifest
