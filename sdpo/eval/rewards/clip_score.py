"""CLIP score (Hessel et al. 2021, as torchmetrics reports it): max(100 * cosine(image, prompt), 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdpo.eval.rewards.clip_embed import ClipEmbedder, load_clip_folder, pick_device


class ClipScoreReward:
    """CLIP score with any transformers CLIP folder."""

    name = "clip"

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return (100.0 * self.embedder.cosine(images, prompts)).clamp(min=0).double().numpy()


def load_clip_score(folder: Path, device: torch.device | str | None = None) -> ClipScoreReward:
    """CLIP score from a transformers CLIPModel folder (weights, config, tokenizer, preprocessor)."""
    return ClipScoreReward(load_clip_folder(folder, pick_device(device)))
