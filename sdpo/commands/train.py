"""``sdpo train``: one training arm (method x safeguard) on ingested shards."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one variant (SFT, DPO, DSPO or DMPO, with or without the SDPO safeguard)",
        description="Train the base model on preference shards with the objective and safeguard from params.yaml. "
        "Writes OUT/model (a diffusers pipeline folder), OUT/checkpoints, OUT/metrics.jsonl and "
        "OUT/training_summary.json. Runs under `accelerate launch` for several GPUs or processes.",
    )
    add_config_args(p)
    p.add_argument("--shards", required=True, help="folder of pairs-*.tar shards with manifest.json (from sdpo ingest)")
    p.add_argument("--base", help="base model: diffusers folder or hub id (default: model.base from params.yaml)")
    p.add_argument("--out", required=True, help="output folder of this run")
    p.add_argument("--variant", help="name of a train.variants entry whose method/safeguard/mu/beta apply")
    p.add_argument("--heldout-shards", help="held-out shards for the winner/loser error deltas during training")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (metrics still go to OUT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.config import load_config
    from sdpo.errors import ModelError
    from sdpo.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    base = args.base or cfg.model.base
    if not base:
        raise ModelError("no base model: pass --base DIR or set model.base (the toy base comes from `sdpo pretrain`)")
    kwargs = dict(shards_dir=args.shards, base_model=base, output_dir=args.out, variant=args.variant,
                  heldout_shards=args.heldout_shards, resume=args.resume)
    if args.no_mlflow:
        result = train(cfg, **kwargs)
    else:
        import mlflow

        from sdpo.tracking.runs import log_config, start_run

        with start_run(cfg.registry.experiment, f"train-{args.variant or cfg.train.method}"):
            log_config(cfg)
            result = train(cfg, on_metrics=lambda row, step: mlflow.log_metrics(row, step=step), **kwargs)
    print(f"model: {result.model_dir}")
    final = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final_metrics.items()))
    print(f"steps: {result.steps}  final: {final}")
    if result.heldout:
        h = result.heldout
        print(f"held-out: winner_delta={h['winner_delta']:+.5f} loser_delta={h['loser_delta']:+.5f}")
    return 0
