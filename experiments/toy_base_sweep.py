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
from pathlib import Path

import numpy as np


def _parse_sets(items: list[str]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _rates(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int) -> dict[str, float]:
    import torch

    from sdpo.eval.rewards.alignment import alignment_parts

    images, used = [], []
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            out = pipe(prompt=[prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, output_type="np").images
        images += [np.round(im * 255).astype(np.uint8) for im in out]
        used += [prompt] * len(seeds)
    parts = alignment_parts(images, used)
    return {"colour": float(parts.colour_ok.mean()), "shape": float(parts.shape_ok.mean()),
            "both": float((parts.colour_ok & parts.shape_ok).mean()), "alignment": float(parts.score.mean()),
            "n": len(images)}


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
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdpo.config import ToyBaseConfig
    from sdpo.data import synthetic
    from sdpo.train.pretrain import pretrain_toy_base

    if args.threads:
        torch.set_num_threads(args.threads)
    toy = ToyBaseConfig(**_parse_sets(args.set))
    table = synthetic.make_pairs(args.pairs, seed=0, split="train")
    decode = synthetic.decode_png if hasattr(synthetic, "decode_png") else None
    from io import BytesIO

    from PIL import Image

    def _img(b: bytes) -> np.ndarray:
        return decode(b) if decode else np.asarray(Image.open(BytesIO(b)).convert("RGB"))

    images = np.stack([_img(b) for b in table["jpg_0"].to_pylist()] + [_img(b) for b in table["jpg_1"].to_pylist()])
    captions = table["caption"].to_pylist() * 2
    folder = args.out / args.name
    tic = time.perf_counter()
    pretrain_toy_base(images, captions, folder, toy=toy, resolution=16, vocabulary=list(synthetic.VOCABULARY),
                      log=lambda m: print(f"[{args.name}] {m}", flush=True))
    train_s = time.perf_counter() - tic
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(10_000, 10_000 + args.seeds))
    result = {"name": args.name, "toy": toy.model_dump(mode="json"), "train_seconds": round(train_s, 1),
              "threads": torch.get_num_threads(), "guidance": {}}
    for g in args.guidance:
        result["guidance"][str(g)] = {
            "train_prompts": _rates(pipe, synthetic.prompts("train"), seeds, g, args.steps),
            "heldout_prompts": _rates(pipe, synthetic.prompts("heldout"), seeds, g, args.steps),
        }
        print(f"[{args.name}] guidance {g}: {json.dumps(result['guidance'][str(g)])}", flush=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
