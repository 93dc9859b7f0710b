"""``sdpo tiny``: write a tiny random-weight diffusers pipeline (for tests and trying the pipeline offline)."""

from __future__ import annotations

import argparse

FAMILIES = ("sd15", "sd2", "sdxl", "sd3")  # sdpo.models.TINY_FAMILIES, without importing torch for --help


def _resolution(text: str) -> int:
    value = int(text)
    if value <= 0 or value % 4:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 4")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny",
        help="write a tiny random-weight diffusers pipeline of a model family (offline, for tests)",
        description="Build a complete diffusers pipeline folder with tiny random weights, built offline from configs. "
        "It loads with DiffusionPipeline.from_pretrained and samples on a CPU in well under a second.",
    )
    parser.add_argument("--family", required=True, choices=FAMILIES, help="model family to imitate")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: 0)")
    parser.add_argument(
        "--resolution", type=_resolution, default=32, help="default image size in pixels, a multiple of 4 (default: 32)"
    )
    parser.add_argument(
        "--vocabulary",
        nargs="+",
        metavar="WORD",
        help="words the tokenizers know as single tokens (default: a small built-in list; other text still tokenizes)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.models.tiny import build_tiny_pipeline

    out = build_tiny_pipeline(
        args.family, args.out, seed=args.seed, resolution=args.resolution, vocabulary=args.vocabulary
    )
    print(out)
    return 0
