"""PickScore: a CLIP model fine-tuned on Pick-a-Pic; score = logit_scale.exp() * cosine(image, prompt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdpo.eval.rewards.clip_embed import ClipEmbedder, load_clip_folder, pick_device


class PickScoreReward:
    """PickScore_v1-style reward over any transformers CLIP folder."""

    name = "pickscore"

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        cosine = self.embedder.cosine(images, prompts)
        return (self.embedder.logit_scale * cosine).double().numpy()


def load_pickscore(folder: Path, device: torch.device | str | None = None) -> PickScoreReward:
    """PickScore from a folder in the PickScore_v1 layout (CLIPModel weights, config, tokenizer, preprocessor)."""
    return PickScoreReward(load_clip_folder(folder, pick_device(device)))
