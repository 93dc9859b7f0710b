"""``sdpo promote``: gate the ``champion`` alias on the version's verified evaluation (stage ``promote``)."""

from __future__ import annotations

import argparse
from typing import Any

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="promote a registered version to champion if its verified evaluation beats the champion's",
        description="Decide from MLflow records only: the version's linked evaluation run and the current "
        "champion's (or, with no champion, the base model's) evaluation run with the same prompts, seeds and "
        "settings. The gate checks that the evaluated model is this version's (digest), that the held-out reference "
        "is the base or the champion and not the candidate, that the records are as logged, and re-scores a seeded "
        "sample of the logged images; then the 'champion' alias moves only if the primary reward's win rate, "
        "re-derived from the per-image scores, is confidently above registry.min_win_rate_lower and no "
        "registry.guards metric regresses. A refused version gets the 'challenger' alias. Writes "
        "ROOT/reports/promotion.json. Exits 0 for every decision.",
    )
    parser.add_argument("--version", help="model version (default: the one `sdpo register` recorded)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing in the registry")
    add_config_args(parser)
    parser.set_defaults(func=run)


def verdict(result: dict[str, Any]) -> str:
    """One line saying what happened, in the words of the outcome."""
    where, reason = f"{result['name']} version {result['version']}", result["decision"]["reason"]
    outcome = result["outcome"]
    if outcome == "already-champion":
        return f"{where}: {reason}"
    if outcome == "promoted":
        return f"{where}: promoted to champion ({'; '.join(result['changed'])}): {reason}"
    if outcome == "refused":
        champion = f"version {result['champion']}" if result["champion"] else "unset"  # the registry's version: int
        return (f"{where}: refused, now {result['alias'] or 'without alias'}; champion stays "
                f"{champion}: {reason}")
    word = "would be promoted" if outcome == "would-promote" else "would be refused"
    return f"{where}: {word} (dry run, nothing changed): {reason}"


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    print(verdict(stages.promote(load_context(args), args.version, dry_run=args.dry_run)))
    return 0
