"""Does the toy base follow its prompts? Colour and shape rates of toy bases trained with different recipes, measured.

Builds the default synthetic train pairs, pretrains one toy base per ``--set`` recipe (``model.toy`` keys), samples
every train prompt on unseen seeds and every held-out composition, and reports the share of images whose drawn
colour / shape is the prompt's (``sdpo.eval.rewards.alignment``), at each ``--guidance`` scale:

    python experiments/toy_base_sweep.py --out /tmp/toy-sweep --name default
    python experiments/toy_base_sweep.py --out /tmp/toy-sweep --name te-hn5 \
        --set train_text_encoder=true high_noise_weight=5 --guidance 1 3

One JSON per recipe is written to ``--out`` (rates, training time, settings); ``--threads`` bounds torch's threads
so that two sweeps can run side by side on a 2-core machine. ``--table`` prints the Markdown table of every JSON in
``--out`` instead (the one in docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image


def _table(out: Path) -> str:
    from sdpo.config import ToyBaseConfig

    defaults = ToyBaseConfig().model_dump(mode="json")
    results = sorted((json.loads(p.read_text()) for p in out.glob("*.json")),
                     key=lambda r: (r["toy"]["unet_steps"], r["train_seconds"], r["name"]))
    lines = ["| recipe | UNet steps | train s | guidance | train prompts: colour / shape / both "
             "| held-out: colour / shape / both |", "|---|---|---|---|---|---|"]
    recipes = []
    for r in results:
        # a knob missing from an older result did not exist yet: it was off
        toy = {k: r["toy"].get(k, type(v)() if isinstance(v, bool | int | float) else v) for k, v in defaults.items()}
        changed = {k: v for k, v in toy.items() if v != defaults[k] and k not in ("unet_steps", "cache_dir")}
        recipes.append(f"- `{r['name']}`: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "the default"))
        for g, rates in r["guidance"].items():
            tr, ho = rates["train_prompts"], rates["heldout_prompts"]
            lines.append(f"| {r['name']} | {r['toy']['unet_steps']} | {r['train_seconds']:.0f} | {float(g):g} | "
                         f"{tr['colour']:.2f} / {tr['shape']:.2f} / {tr['both']:.2f} | "
                         f"{ho['colour']:.2f} / {ho['shape']:.2f} / {ho['both']:.2f} |")
    return "\n".join([*lines, "", *recipes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name")
    parser.add_argument("--table", action="store_true", help="print the table of --out's results and stop")
    parser.add_argument("--set", nargs="*", default=[], help="model.toy overrides, key=value")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seeds", type=int, default=8, help="sampling seeds per prompt (unseen: from 10_000)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.table:
        print(_table(args.out))
        return
    if not args.name:
        parser.error("--name is required to train a recipe")

    import torch

    from sdpo.config import EvalConfig, load_config
    from sdpo.data import synthetic
    from sdpo.eval.generate import load_pipeline, prompt_following
    from sdpo.train.pretrain import pretrain_toy_base

    if args.threads:
        torch.set_num_threads(args.threads)
    toy = load_config(None, [f"model.toy.{item}" for item in args.set]).model.toy
    table = synthetic.make_pairs(args.pairs, seed=0, split="train")
    images = np.stack([np.asarray(Image.open(BytesIO(b)).convert("RGB"))
                       for column in ("jpg_0", "jpg_1") for b in table[column].to_pylist()])
    captions = table["caption"].to_pylist() * 2
    folder = args.out / args.name
    tic = time.perf_counter()
    pretrain_toy_base(images, captions, folder, toy=toy, resolution=16, vocabulary=list(synthetic.VOCABULARY),
                      log=lambda m: print(f"[{args.name}] {m}", flush=True))
    train_s = time.perf_counter() - tic
    pipe = load_pipeline(folder, "ddim", torch.device("cpu"))
    seeds = list(range(10_000, 10_000 + args.seeds))
    result = {"name": args.name, "toy": toy.model_dump(mode="json"), "train_seconds": round(train_s, 1),
              "threads": torch.get_num_threads(), "guidance": {}}
    for g in args.guidance:
        cfg = EvalConfig(guidance_scale=g, num_inference_steps=args.steps, batch_size=80)
        result["guidance"][str(g)] = {
            f"{split}_prompts": prompt_following(pipe, synthetic.prompts(split), seeds, cfg)[1].rates()
            for split in ("train", "heldout")
        }
        print(f"[{args.name}] guidance {g}: {json.dumps(result['guidance'][str(g)])}", flush=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
