"""``sdpo synth``: write pairs of the synthetic preference world as Pick-a-Pic v2 parquet."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Render preference pairs of the synthetic world (prompts "a <colour> <shape>"): the winner is a centred, clean
render, the loser an offset render with row-wise noise, as ranked by the world's judge. The file has the exact
Pick-a-Pic v2 schema (18 columns); images are lossless PNG bytes stored in the jpg_0/jpg_1 columns (JPEG artifacts
would swamp 16 px images). The same arguments always give the same bytes. The held-out split uses prompts that
never occur in the train split."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic preference pairs as Pick-a-Pic v2 parquet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="parquet file to write (atomically)")
    parser.add_argument("--pairs", type=int, default=2048, help="number of pairs (default: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, a non-negative integer (default: 0)")
    parser.add_argument("--resolution", type=int, default=16, help="image side in pixels (default: 16)")
    parser.add_argument(
        "--tie-fraction",
        type=float,
        default=0.0,
        help="share of pairs that are ties (two renders of the same quality, labels 0.5/0.5); default: 0",
    )
    parser.add_argument(
        "--split",
        choices=["train", "heldout"],
        default="train",
        help="prompt split: train (20 prompts) or heldout (4 prompts never seen in training); default: train",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.data.synthetic import make_pairs, write_parquet
    from sdpo.errors import DataError

    try:
        table = make_pairs(args.pairs, args.seed, args.split, args.resolution, args.tie_fraction)
    except ValueError as err:
        raise DataError(f"--out {args.out}: {err}") from None
    path = write_parquet(table, args.out)
    ties = sum(1 for label in table.column("label_0").to_pylist() if label == 0.5)
    print(f"wrote {table.num_rows} {args.split} pairs ({ties} ties, {args.resolution} px) to {path}")
    return 0
