"""The synthetic world's programmatic judge as a reward (no weights)."""

from __future__ import annotations

import numpy as np
from PIL import Image


class SyntheticJudgeReward:
    """Scores images with :func:`sdpo.data.synthetic.judge_scores` (the toy world's ground truth)."""

    name = "synthetic"

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        from sdpo.data.synthetic import judge_scores

        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return np.zeros(0)
        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        return np.asarray(judge_scores(arrays, list(prompts)), dtype=np.float64)
