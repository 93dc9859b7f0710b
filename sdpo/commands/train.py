"""``sdpo train``: one training arm (method x safeguard) on the ingested shards (stage ``train``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one variant (SFT, DPO, DSPO or DMPO, with or without the SDPO safeguard)",
        description="Train the base model (ROOT/models/base/base.json, from `sdpo base`) on ROOT/shards/train with "
        "the objective of train.variants.VARIANT (unset keys inherit from train). Writes ROOT/models/VARIANT/: "
        "model/ (a diffusers pipeline folder), checkpoints/, metrics.jsonl, heldout.jsonl, training_summary.json. "
        "With several GPUs (or train.accelerate_config) it runs under `accelerate launch`.",
    )
    parser.add_argument("--variant", required=True, help="name of a train.variants entry (e.g. dpo-sdpo)")
    parser.add_argument("--base", metavar="URI", help="start from this model instead of the recorded base")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from the newest complete checkpoint; refused when it is another run's "
                      "(changed config keys, data or base; see FREE_ON_RESUME in sdpo/train/checkpoint.py)")
    mode.add_argument("--overwrite", action="store_true", help="discard an earlier run's checkpoints and start over")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    summary = stages.train(load_context(args), args.variant, base=args.base, resume=args.resume,
                           overwrite=args.overwrite)
    final = ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary["final_metrics"].items()))
    print(f"model: {summary['model']}\nsteps: {summary['steps']}  final: {final}")
    if summary.get("heldout"):
        h = summary["heldout"]
        print(f"held-out: winner_delta={h['winner_delta']:+.5f} loser_delta={h['loser_delta']:+.5f}")
    return 0
