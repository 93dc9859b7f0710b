"""How small can the pathology regression test be? The sign pattern over training steps and seeds, measured.

Trains plain Diffusion-DPO and DPO + SDPO (the defaults of params.yaml) from the default toy base for several
training seeds, probing the held-out winner/loser error deltas every ``--every`` steps, and reports at each probed
step whether the pattern ``tests/test_pathology.py`` asserts holds for every seed:

    DPO:        winner_delta > 0 and loser_delta > winner_delta
    DPO + SDPO: winner_delta <= 0 and 0 < lambda_mean < 1

The learning rate is constant, so the probe at step k is what a k-step run ends with.

    python experiments/pathology_sweep.py --out /tmp/sweep --seeds 0 1 2 3 --steps 200 --every 25
    python experiments/pathology_sweep.py --out /tmp/sweep-colour --set model.toy.multires_noise=0.8 ...  # a recipe
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dpo", "dpo-sdpo")


def _pattern(arm: str, row: dict[str, float]) -> bool:
    if arm == "dpo":
        return row["heldout_winner_delta"] > 0 and row["heldout_loser_delta"] > row["heldout_winner_delta"]
    return row["heldout_winner_delta"] <= 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--toy-cache", help="a toy-base cache folder to reuse (model.toy.cache_dir)")
    parser.add_argument("--set", nargs="*", default=[], help="more params.yaml overrides, key=value")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")

    from sdpo import stages
    from sdpo.config import load_config
    from sdpo.train.trainer import train

    out = args.out.resolve()
    setup = [f"data.root={out / 'root'}", *args.set] + (
        [f"model.toy.cache_dir={args.toy_cache}"] if args.toy_cache else [])
    ctx = stages.StageContext.load(ROOT / "params.yaml", setup)
    layout = ctx.layout
    for split in ("train", "heldout"):
        if not Path(layout.manifest(split)).is_file():
            stages.synth(ctx, split)
            stages.ingest(ctx, split)
    if not Path(layout.base_record()).is_file():
        stages.base(ctx)
    for split in ("train", "heldout"):
        if not (Path(layout.cache(split)) / "manifest.json").is_file():
            stages.encode(ctx, split)
    curves: dict[str, dict[str, list[dict]]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            cfg = load_config(ROOT / "params.yaml", [*setup, f"train.seed={seed}", f"train.steps={args.steps}",
                                                     f"train.heldout_every={args.every}"])
            tic = time.perf_counter()
            result = train(cfg, shards_dir=layout.shards("train"), base_model=stages.base_uri(ctx),
                           output_dir=out / f"{arm}-{seed}", variant=arm, heldout_shards=layout.shards("heldout"),
                           cache_dir=layout.cache("train"), heldout_cache=layout.cache("heldout"),
                           show_progress=False)
            rows = [json.loads(line) for line in (result.output_dir / "heldout.jsonl").read_text().splitlines()]
            lam = result.final_metrics.get("lambda_mean")
            curves[arm][str(seed)] = rows
            print(f"{arm} seed {seed}: {time.perf_counter() - tic:.0f}s, final {result.heldout}, lambda_mean {lam}")
    steps = sorted({row["step"] for rows in curves["dpo"].values() for row in rows})
    table = []
    for step in steps:
        holds = {arm: all(_pattern(arm, next(r for r in rows if r["step"] == step))
                          for rows in curves[arm].values()) for arm in ARMS}
        table.append({"step": step, **holds})
        print(f"step {step:4d}: dpo pattern on every seed {holds['dpo']}, dpo-sdpo {holds['dpo-sdpo']}")
    (out / "pathology-sweep.json").write_text(json.dumps({"seeds": args.seeds, "curves": curves, "holds": table},
                                                         indent=2))


if __name__ == "__main__":
    main()
