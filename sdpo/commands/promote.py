"""``sdpo promote``: gate the ``champion`` alias on a paired comparison (stage ``promote``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="promote a registered version to champion if it beats the current one",
        description="Compare the registered version's evaluation (ROOT/evals/ARM) with the current champion's (or, "
        "with no champion, the base model's, ROOT/evals/base) and move the 'champion' alias only if the primary "
        "reward's win rate is confidently above registry.min_win_rate_lower and no registry.guards metric "
        "regresses. A refused version gets the 'challenger' alias. Writes ROOT/reports/promotion.json. Exits 0 for "
        "both outcomes.",
    )
    parser.add_argument("--arm", help="the arm whose evaluation is compared (default: registry.candidate)")
    parser.add_argument("--version", help="model version (default: the one `sdpo register` recorded)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing in the registry")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    result = stages.promote(load_context(args), args.arm, args.version, dry_run=args.dry_run)
    decision = result["decision"]
    verdict = "promoted to champion" if decision["promote"] else "not promoted (challenger)"
    if args.dry_run:
        verdict = ("would be " if decision["promote"] else "would not be ") + "promoted (dry run, nothing changed)"
    print(f"{result['name']} version {result['version']}: {verdict}: {decision['reason']}")
    return 0
