"""``sdpo pretrain``: build (or reuse from the cache) the toy base model of the embedded default."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="train the toy base model on synthetic-world shards (cached by a hash of its config and data)",
        description="Build the toy SD1.5-family pipeline and pretrain it (VAE, then UNet) on every image of the "
        "train shards. The result is cached under model.toy.cache_dir/<hash>; a second run reuses it. With --out, "
        "the pipeline folder is also copied there.",
    )
    add_config_args(p)
    p.add_argument("--shards", required=True, help="train shards of the synthetic world (from sdpo ingest)")
    p.add_argument("--out", help="copy the finished pipeline folder here (e.g. a DVC output)")
    p.add_argument("--cache-dir", help="override model.toy.cache_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from sdpo.config import load_config
    from sdpo.models._atomic import atomic_directory
    from sdpo.train.pretrain import ensure_toy_base

    cfg = load_config(args.config, args.overrides)
    path = ensure_toy_base(cfg, args.shards, cache_dir=args.cache_dir)
    if args.out:
        with atomic_directory(args.out) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        path = args.out
    print(f"toy base: {path}")
    return 0
