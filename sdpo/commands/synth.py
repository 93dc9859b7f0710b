"""``sdpo synth``: the synthetic preference world's pairs as Pick-a-Pic v2 parquet (stage ``synth``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context

DESCRIPTION = """\
Render preference pairs of the synthetic world (prompts "a <colour> <shape>"): the winner is a centred, clean
render, the loser an offset render with row-wise noise, as ranked by the world's judge. Sizes, seed, resolution and
ties come from data.synthetic and data.resolution. Writes ROOT/raw/<split>.parquet with the exact Pick-a-Pic v2
schema (images are lossless PNG bytes in the jpg_0/jpg_1 columns). The same parameters always give the same bytes.
The held-out split uses prompts that never occur in the train split."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="write the synthetic world's pairs as Pick-a-Pic v2 parquet",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["train", "heldout"], action="append",
                        help="split to write (repeatable; default: both)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    ctx = load_context(args)
    for split in args.split or ["train", "heldout"]:
        result = stages.synth(ctx, split)
        print(f"wrote {result['pairs']} {split} pairs to {result['uri']}")
    return 0
