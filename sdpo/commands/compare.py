"""``sdpo compare``: paired win rates of one arm's evaluation over another's (stage ``compare``)."""

from __future__ import annotations

import argparse
from typing import Any

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="paired win rates of an arm's evaluation over a baseline's",
        description="Compare ROOT/evals/ARM with ROOT/evals/BASELINE (the same prompts, seeds and generation "
        "settings). Each (prompt, seed) image is one paired unit: win = 1, tie = 0.5, loss = 0. Prints, per reward, "
        "the win rate with a percentile-bootstrap 95% CI over units (eval.bootstrap_samples, seeded by eval.seed), "
        "for the headline prompts and for each set of eval.prompt_sets, "
        "the wins/ties/losses and the mean scores, and writes ROOT/reports/compare-ARM.json. Folders that differ in "
        "prompts, seeds or settings are refused.",
    )
    parser.add_argument("--arm", required=True, help="the candidate arm")
    parser.add_argument("--baseline", default="base", help="the baseline arm (default: base)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a text table, one reward a row."""
    from tabulate import tabulate

    rows = [[name, f"{r['win_rate']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
             f"{r['wins']}/{r['ties']}/{r['losses']}", f"{r['mean_candidate']:.4f}", f"{r['mean_baseline']:.4f}"]
            for name, r in result["rewards"].items()]
    return tabulate(rows, headers=["reward", "win rate", "95% CI", "wins/ties/losses", "mean A", "mean B"],
                    disable_numparse=True)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    ctx = load_context(args)
    result = stages.compare(ctx, args.arm, args.baseline)
    print(f"A = {result['candidate']}\nB = {result['baseline']}\n{result['n']} paired images (prompt x seed)\n")
    print(format_table(result))
    for name, by_set in result.get("prompt_sets", {}).items():
        print(f"\nprompt set {name}: {by_set['n']} paired images\n")
        print(format_table(by_set))
    print(f"\nwrote {ctx.layout.compare_report(args.arm)}")
    return 0
