"""``sdpo promote``: gate the ``champion`` alias on a paired comparison against the current champion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="promote a model version to champion if it beats the current one",
        description="Compare a registered version's evaluation with the current champion's (or, with no champion, "
        "the base model's) and move the 'champion' alias only if the primary reward's win rate is confidently "
        "above registry.min_win_rate_lower and no registry.guards metric regresses. A refused version gets the "
        "'challenger' alias. Exits 0 for both outcomes.",
    )
    parser.add_argument("--name", help="registered model name (default: registry.model_name from the config)")
    parser.add_argument("--version", required=True, help="model version to consider")
    parser.add_argument("--candidate-eval", required=True, metavar="DIR", help="evaluation dir of that version")
    parser.add_argument(
        "--baseline-eval",
        metavar="DIR",
        help="evaluation dir of the base model, used only while the model has no champion",
    )
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing in the registry")
    parser.add_argument("--output", metavar="FILE", help="also write the decision here as JSON")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.config import load_config
    from sdpo.tracking.registry import promote

    cfg = load_config(args.config, args.overrides)
    name = args.name or cfg.registry.model_name
    decision = promote(
        name,
        args.version,
        candidate_eval=args.candidate_eval,
        baseline_eval=args.baseline_eval,
        primary_reward=cfg.registry.primary_reward,
        min_win_rate_lower=cfg.registry.min_win_rate_lower,
        guards=cfg.registry.guards,
        bootstrap_samples=cfg.eval.bootstrap_samples,
        seed=cfg.eval.seed,
        dry_run=args.dry_run,
    )
    verdict = "promoted to champion" if decision.promote else "not promoted (challenger)"
    if args.dry_run:
        verdict = ("would be " if decision.promote else "would not be ") + "promoted (dry run, nothing changed)"
    print(f"{name} version {args.version}: {verdict}: {decision.reason}")
    if args.output:
        Path(args.output).write_text(json.dumps(decision.to_dict(), indent=2, default=str) + "\n")
    return 0
