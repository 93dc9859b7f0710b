"""``sdpo ingest``: validate Pick-a-Pic parquet into WebDataset shards with a manifest."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Stream Pick-a-Pic v2 parquet (a file, a folder of *.parquet, a glob, or an s3:// URI) and write validated pairs to
OUT/pairs-000000.tar ... (fields win.<ext>, lose.<ext>, txt, json), plus rejects.jsonl (every skipped row and why)
and manifest.json (inputs with sha256, counts, shards with sha256, config). Each image is decoded (any mode -> RGB),
checked for a minimum size, resized on its shorter side and centre-cropped; the preferred image comes first.
Ties (label_0 = 0.5) are dropped unless --keep-ties. Rows with bad images, empty captions, invalid labels or a
repeated ranking_id are skipped and counted. Output is byte-identical for the same input and options, whatever
--workers is, and OUT is replaced atomically. Bad input (no files, not parquet, missing column, zero rows) stops
before anything is written."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sdpo.config import DataConfig

    defaults = DataConfig()
    parser = subparsers.add_parser(
        "ingest",
        help="validate Pick-a-Pic parquet into WebDataset shards",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        required=True,
        action="append",
        metavar="PATH_OR_GLOB_OR_S3",
        help="parquet file, folder, glob (quote it) or s3:// URI; repeat for several",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (replaced whole)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=defaults.resolution,
        help=f"output image side (default: {defaults.resolution})",
    )
    parser.add_argument(
        "--shard-max-pairs",
        type=int,
        default=defaults.shard_max_pairs,
        help=f"pairs per shard at most (default: {defaults.shard_max_pairs})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help=f"decoding threads; the output does not depend on it (default: {defaults.workers})",
    )
    parser.add_argument("--keep-ties", action="store_true", help="keep ties (label_0 = 0.5) instead of dropping them")
    parser.add_argument(
        "--min-size",
        type=int,
        default=defaults.min_image_size,
        help=f"reject images whose shorter side is below this many pixels (default: {defaults.min_image_size})",
    )
    parser.add_argument(
        "--format",
        choices=["png", "jpg"],
        default=defaults.image_format,
        help=f"image encoding inside the shards: png (lossless) or jpg (quality 95); default: {defaults.image_format}",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.data.pickapic import ingest

    manifest = ingest(
        args.input if len(args.input) > 1 else args.input[0],
        args.out,
        resolution=args.resolution,
        shard_max_pairs=args.shard_max_pairs,
        workers=args.workers,
        keep_ties=args.keep_ties,
        min_size=args.min_size,
        image_format=args.format,
    )
    skipped = {reason: count for reason, count in manifest["skipped"].items() if count}
    print(
        f"read {manifest['rows_read']} rows from {len(manifest['inputs'])} file(s); wrote {manifest['pairs_written']} "
        f"pairs in {len(manifest['shards'])} shard(s) to {args.out}; skipped {skipped or 'none'}"
    )
    return 0
