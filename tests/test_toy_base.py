"""The colour-following toy recipe (experiments/colour-following.yaml): the drawn colour follows the prompt.

docs/results.md ("Does the toy base follow its prompts?") has the rates on 8 unseen seeds per train prompt: colour
0.59-0.71 for bases of this recipe (the default base: 0.16; chance 1/6), shape 0.31-0.35 (chance 1/4: the shape does
not follow yet, so it is not asserted). The test samples those seeds the way the evaluation stage does; its bound on
the colour rate is far below what was measured and far above chance (160 images: about 0.04 of sampling error).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from sdpo.config import EvalConfig, load_config
from sdpo.data.synthetic import prompts
from sdpo.eval.generate import load_pipeline, prompt_following

ROOT = Path(__file__).resolve().parents[1]
UNSEEN_SEEDS = [10_000 + k for k in range(8)]  # the evaluation uses 1234 onwards; training never sees any seed
pytestmark = pytest.mark.timeout(1800)  # a hang guard only: the base trains for a few minutes on one core


@pytest.fixture(scope="module")
def colour_base(toy_shards, toy_cache) -> Path:
    from filelock import FileLock

    from sdpo.train.pretrain import ensure_toy_base

    cfg = load_config(ROOT / "experiments" / "colour-following.yaml")
    with FileLock(str(toy_cache / ".build-colour.lock")):  # not the default base's lock: both build side by side
        return ensure_toy_base(cfg, toy_shards["train"], cache_dir=toy_cache)


def test_the_colour_following_base_draws_the_prompts_colour(colour_base):
    pipe = load_pipeline(colour_base, EvalConfig().scheduler, torch.device("cpu"))
    # the default sampler (DDIM, 20 steps, no guidance)
    units, parts = prompt_following(pipe, prompts("train"), UNSEEN_SEEDS, EvalConfig(batch_size=80))
    colour_rate, shape_rate = float(parts.colour_ok.mean()), float(parts.shape_ok.mean())
    print(f"train prompts, {len(units)} images: colour {colour_rate:.2f}, shape {shape_rate:.2f}")
    assert colour_rate >= 0.4, (colour_rate, shape_rate)  # chance: 1/6
    # one seed, twenty prompts: the drawn colour changes with the prompt, not only with the noise (measured: 4.75
    # colours per seed on average for this recipe, 1.75 for the default base, whose seed decides the colour)
    per_seed = [len({parts.colour[i] for i, unit in enumerate(units) if unit.seed == seed}) for seed in UNSEEN_SEEDS]
    assert np.mean(per_seed) >= 3, per_seed
