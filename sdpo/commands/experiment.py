"""``sdpo experiment``: every arm over several seeds of the whole pipeline, with intervals across seeds."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run arms x seeds of the whole pipeline and tabulate the results with intervals",
        description="For each seed, a complete run (synth, ingest, base, [encode], train, evaluate, compare; the "
        "base is always evaluated) under ROOT/experiments/NAME/seed-S/, where seed S adds S to data.synthetic.seed, "
        "model.toy.seed and train.seed (eval.seed stays fixed, so a seed's arms are compared on the same units). "
        "Then ROOT/experiments/NAME/ gets results.csv (long format), results.md, curves.csv and plots/*.png: every "
        "reward and the held-out winner/loser deltas with a 95% Student-t interval across seeds, lambda statistics "
        "over training, and paired win rates against the base and between arms pooled over seeds (95% percentile "
        "bootstrap over images). Stages already done are skipped, so a rerun resumes; rerunning a NAME with other "
        "settings is refused. Recipes: experiments/*.yaml (e.g. --config experiments/long-horizon.yaml).",
    )
    parser.add_argument("--name", default="default", help="the experiment's folder name (default: default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                        help="the seeds (at least two; default: 0 1 2)")
    parser.add_argument("--arm", dest="arms", action="append", metavar="VARIANT",
                        help="a train.variants entry to run (repeatable; default: every variant)")
    parser.add_argument("--checkpoint-rewards", action="store_true",
                        help="also score every kept training checkpoint on the same prompts and seeds, for reward "
                        "curves over the steps (curves.csv, plots/curves-rewards*.png); needs train.checkpoint_every "
                        "below train.steps and train.keep_checkpoints=0")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdpo import fs
    from sdpo.config import load_config
    from sdpo.experiments import run_experiment

    cfg = load_config(args.config, args.overrides)
    project_dir = Path(args.config).resolve().parent
    summary = run_experiment(cfg, args.name, seeds=args.seeds, arms=args.arms, project_dir=project_dir,
                             source=args.config, checkpoint_rewards=args.checkpoint_rewards)
    print("\n" + fs.read_text(fs.join(summary["uri"], "results.md")))
    print(f"wrote {summary['uri']}/: " + ", ".join(summary["outputs"]))
    return 0
