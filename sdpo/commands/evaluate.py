"""``sdpo evaluate``: sample a model on fixed prompts and seeds, score the images, write an evaluation folder."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="generate images on fixed prompts and seeds and score them with the configured rewards",
        description="Sample a diffusers pipeline folder on every prompt with eval.seeds_per_prompt fixed seeds "
        "(eval.seed, eval.seed+1, ...), score each image with eval.rewards, and write OUT/ with images/, "
        "manifest.json, scores.jsonl, metrics.json (reward means with bootstrap 95% CIs) and grid.png. "
        "Guidance uses the diffusers convention (eval.guidance_scale=1 means none; the reference code's s is "
        "guidance_scale - 1). Run under `accelerate launch` to split the images over several GPUs.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="diffusers pipeline folder to evaluate")
    parser.add_argument(
        "--prompts",
        metavar="FILE_OR_SET",
        help="'heldout' or 'train' (the synthetic world's prompt sets) or a text file with one prompt a line "
        "(default: eval.prompts from the config)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="evaluation folder to write (replaced if present)")
    parser.add_argument(
        "--base", metavar="DIR", help="reference model folder for held-out winner/loser error deltas (needs shards)"
    )
    parser.add_argument(
        "--heldout-shards", metavar="DIR", help="held-out preference shards for the error deltas (needs --base)"
    )
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo.config import load_config
    from sdpo.eval.generate import evaluate, resolve_prompts

    cfg = load_config(args.config, args.overrides).eval
    prompts = resolve_prompts(args.prompts or cfg.prompts)
    metrics = evaluate(args.model, prompts, args.out, cfg, base_dir=args.base, heldout_shards=args.heldout_shards)
    print(f"evaluated {args.model}: {len(prompts)} prompts x {cfg.seeds_per_prompt} seeds -> {args.out}")
    for name, summary in metrics["rewards"].items():
        print(
            f"  {name}: mean {summary['mean']:.4f}  95% CI [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]"
            f"  n={summary['n']}"
        )
    for key, value in metrics.get("heldout", {}).items():
        print(f"  heldout {key}: {value:.6g}" if isinstance(value, float) else f"  heldout {key}: {value}")
    return 0
