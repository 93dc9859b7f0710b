"""HPS v2 / v2.1: an open_clip ViT-H-14 fine-tuned on human preferences; score = 100 * cosine(image, prompt).

The checkpoint (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) is an open_clip state dict, optionally under
``state_dict``. It is converted to a transformers ``CLIPModel`` whose architecture comes from ``config.json`` beside
it (a CLIPConfig for ViT-H-14 with ``hidden_act: gelu``, as in laion/CLIP-ViT-H-14-laion2B-s32B-b79K). The same
folder holds the CLIP tokenizer (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``) and
``preprocessor_config.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdpo.errors import ModelError
from sdpo.eval.rewards.clip_embed import ClipEmbedder, load_clip_processing, pick_device
from sdpo.eval.rewards.open_clip_convert import open_clip_to_transformers
from sdpo.eval.rewards.weights import read_state_dict

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


class HpsV2Reward:
    """Human Preference Score v2."""

    name = "hpsv2"

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return (100.0 * self.embedder.cosine(images, prompts)).double().numpy()


def find_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a file, else the single checkpoint file in the folder."""
    if path.is_file():
        return path
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ModelError(
            f"{path}: expected exactly one open_clip checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), found {found}"
        )
    return candidates[0]


def read_open_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an open_clip checkpoint (``weights_only`` torch.load, or safetensors)."""
    return read_state_dict(path, "HPS v2")


def clip_from_open_clip(checkpoint: Path, config_path: Path):
    """A transformers ``CLIPModel`` with the open_clip checkpoint's weights, loaded strictly."""
    from transformers import CLIPConfig, CLIPModel

    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; HPS v2 needs a transformers CLIPConfig json beside the checkpoint")
    config = CLIPConfig.from_json_file(config_path)
    try:
        converted = open_clip_to_transformers(read_open_clip_state(checkpoint))
    except ModelError as err:
        raise ModelError(f"{checkpoint}: {err}") from err
    try:
        # from_pretrained with a state dict skips the (slow, for ViT-H) random initialisation.
        model = CLIPModel.from_pretrained(None, config=config, state_dict=converted, dtype=torch.float32)
    except RuntimeError as err:  # shape mismatches
        raise ModelError(f"{checkpoint}: weights do not match {config_path}: {err}") from err
    expected = set(model.state_dict())
    if set(converted) != expected:
        raise ModelError(
            f"{checkpoint}: weights do not match {config_path}: missing {sorted(expected - set(converted))[:5]}, "
            f"unexpected {sorted(set(converted) - expected)[:5]}"
        )
    return model.float().eval()


def load_hpsv2(path: Path, device: torch.device | str | None = None) -> HpsV2Reward:
    """HPS v2 from a folder (or checkpoint file) laid out as in this module's docstring."""
    checkpoint = find_checkpoint(path)
    folder = checkpoint.parent
    model = clip_from_open_clip(checkpoint, folder / "config.json")
    tokenizer, image_processor = load_clip_processing(folder)
    return HpsV2Reward(ClipEmbedder(model, tokenizer, image_processor, pick_device(device)))
