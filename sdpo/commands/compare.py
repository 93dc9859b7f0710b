"""``sdpo compare``: paired win rates of one evaluation folder over another, with bootstrap confidence intervals."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="paired win rates of a candidate evaluation over a baseline evaluation",
        description="Compare two folders written by `sdpo evaluate` on the same prompts, seeds and generation "
        "settings. Each (prompt, seed) image is one paired unit: win = 1, tie = 0.5, loss = 0. Prints, per reward, "
        "the candidate's win rate with a percentile-bootstrap 95% CI over units, the wins/ties/losses and the "
        "mean scores. Folders that differ in prompts, seeds or settings are refused.",
    )
    parser.add_argument("candidate", metavar="A", help="evaluation folder of the candidate model")
    parser.add_argument("baseline", metavar="B", help="evaluation folder of the baseline model")
    parser.add_argument("--out", metavar="FILE", help="also write the full comparison (JSON, with per-prompt rates)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the CIs (default: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    parser.set_defaults(func=run)


def format_table(result: dict[str, Any]) -> str:
    """The comparison as an aligned text table, one reward a row."""
    header = ("reward", "win rate", "95% CI", "wins/ties/losses", "mean A", "mean B")
    rows = [header]
    for name, r in result["rewards"].items():
        rows.append(
            (
                name,
                f"{r['win_rate']:.3f}",
                f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                f"{r['wins']}/{r['ties']}/{r['losses']}",
                f"{r['mean_candidate']:.4f}",
                f"{r['mean_baseline']:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sdpo.config import ConfigError
    from sdpo.eval.winrate import compare_eval_dirs

    if args.bootstrap < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    result = compare_eval_dirs(args.candidate, args.baseline, bootstrap_samples=args.bootstrap, seed=args.seed)
    print(f"A = {result['candidate']}\nB = {result['baseline']}\n{result['n']} paired images (prompt x seed)\n")
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0
