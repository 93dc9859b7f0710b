"""The toy base follows its prompts: on unseen seeds of the train prompts it draws the prompt's colour and shape.

Uses the session's toy base (tests/pipeline_fixtures.py: the default params, the model `make run` builds), sampled
the way evaluation samples it (sdpo.eval.generate), and scored with the alignment reward (not the labeller).
"""

import numpy as np
import pytest
import torch

from sdpo.data.synthetic import prompts
from sdpo.eval.generate import generate_images, load_pipeline, plan_units
from sdpo.eval.rewards.alignment import alignment_parts

SEEDS = [90_001, 90_002]  # seeds no test or evaluation default uses (eval.seed is 1234 onwards)


@pytest.fixture(scope="module")
def samples(toy_base):
    pipe = load_pipeline(toy_base, "ddim", torch.device("cpu"))
    settings = {"num_inference_steps": 20, "guidance_scale": 1.0, "resolution": 16}
    out = {}
    for split in ("train", "heldout"):
        units = plan_units(prompts(split), SEEDS)
        pairs = list(generate_images(pipe, units, settings, batch_size=64))
        out[split] = ([np.asarray(im.convert("RGB")) for _, im in pairs], [u.prompt for u, _ in pairs])
    return out


@pytest.mark.xfail(strict=True, reason="issue 12 item 1 is open: the default toy base ignores its prompts (measured "
                   "at chance: colour 0.15, shape 0.25); remove this mark when a recipe meets the rates")
def test_base_draws_the_prompted_colour_and_shape_on_train_prompts(samples):
    heldout = alignment_parts(*samples["heldout"])  # never-trained compositions: measured (-s shows it), not required
    print("heldout colour", heldout.colour_ok.mean(), "shape", heldout.shape_ok.mean())
    parts = alignment_parts(*samples["train"])
    print("train colour", parts.colour_ok.mean(), "shape", parts.shape_ok.mean())
    assert parts.colour_ok.mean() >= 0.9, parts.colour
    assert parts.shape_ok.mean() >= 0.8, parts.shape

