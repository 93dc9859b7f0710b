"""``sdpo evaluate``: sample an arm's model on fixed prompts and seeds, score the images (stage ``evaluate``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="generate images on fixed prompts and seeds and score them with the configured rewards",
        description="Sample the arm's model (ROOT/models/ARM/model; the recorded base for --arm base) on every "
        "prompt of eval.prompts with eval.seeds_per_prompt fixed seeds (eval.seed, eval.seed+1, ...), score each "
        "image with eval.rewards and publish ROOT/evals/ARM/ with images/, manifest.json, scores.jsonl, grid.png and "
        "metrics.json (reward means with bootstrap 95%% CIs, held-out winner/loser error deltas against the base); "
        "each further prompt set of eval.prompt_sets is evaluated the same way into ROOT/evals/ARM/sets/NAME/. "
        "Guidance uses the diffusers convention (eval.guidance_scale=1 means none; the reference code's s is "
        "guidance_scale - 1).",
    )
    parser.add_argument("--arm", required=True, help="a variant name, or 'base'")
    parser.add_argument("--model", metavar="URI", help="evaluate this model folder instead, as arm ARM")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    ctx = load_context(args)
    metrics = stages.evaluate(ctx, args.arm, model=args.model)
    print(f"evaluated {args.arm} -> {ctx.layout.evals(args.arm)}")
    sets = [(metrics.get("prompts", "eval"), metrics["rewards"])]
    sets += [(name, entry["rewards"]) for name, entry in metrics.get("prompt_sets", {}).items()]
    for label, rewards in sets:
        for name, summary in rewards.items():
            print(f"  {label} {name}: mean {summary['mean']:.4f}  95% CI [{summary['ci_low']:.4f}, "
                  f"{summary['ci_high']:.4f}]  n={summary['n']}")
    for key, value in metrics.get("heldout", {}).items():
        print(f"  heldout {key}: {value:.6g}" if isinstance(value, float) else f"  heldout {key}: {value}")
    return 0
