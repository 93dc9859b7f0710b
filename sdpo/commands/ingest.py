"""``sdpo ingest``: validate Pick-a-Pic parquet into WebDataset shards with a manifest (stage ``ingest``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context

DESCRIPTION = """\
Stream the split's Pick-a-Pic v2 parquet (data.input for train and data.heldout_input for heldout: a file, a folder,
a glob or an s3:// URI; the synthetic world's ROOT/raw/<split>.parquet when data.input is null) and write validated
pairs to ROOT/shards/<split>/pairs-000000.tar ... (fields win.<ext>, lose.<ext>, txt, json), rejects.jsonl (every
skipped row and why) and manifest.json (inputs with sha256, counts, shards with sha256, config), the manifest last.
Images are decoded, checked against data.min_image_size, resized on the shorter side to data.resolution and
centre-cropped; the preferred image comes first. Ties are dropped unless data.keep_ties. The output is byte-identical
for the same input and parameters, whatever data.workers is. Bad input stops before anything is written."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ingest", help="validate Pick-a-Pic parquet into WebDataset shards",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["train", "heldout"], action="append",
                        help="split to ingest (repeatable; default: train, and heldout when it has an input)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    ctx = load_context(args)
    splits = args.split or [s for s in ("train", "heldout") if stages.split_inputs(ctx, s) is not None]
    for split in splits:
        result = stages.ingest(ctx, split)
        skipped = {reason: count for reason, count in result["skipped"].items() if count}
        print(f"{split}: read {result['rows_read']} rows, wrote {result['pairs_written']} pairs to {result['uri']}; "
              f"skipped {skipped or 'none'}")
    return 0
