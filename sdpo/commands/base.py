"""``sdpo base``: the base model of every arm, checked or built (stage ``base``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "base",
        aliases=["pretrain"],
        help="check model.base, or build the toy base model (cached by what determines it)",
        description="With model.base set: check that it is a diffusers pipeline folder (local or s3://) or a hub "
        "id, and record it. Without: build the toy SD1.5-family pipeline and pretrain it on every image of the train "
        "shards, cached under model.toy.cache_dir (default ROOT/cache/toy-base/<key>), and publish it at "
        "ROOT/models/base/model. Either way ROOT/models/base/base.json says which base the arms start from.",
    )
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    record = stages.base(load_context(args))
    print(f"base model ({record['source']}): {record['uri']}")
    return 0
