"""LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Folder layout (``eval.reward_paths.aesthetic``)::

    aesthetic/
      clip/                                   transformers CLIP folder (openai/clip-vit-large-patch14):
                                              config.json, model.safetensors, preprocessor_config.json
      sac+logos+ava1-l14-linearMSE.pth        the head: a state dict with keys layers.{0,2,4,6,7}.{weight,bias}
                                              (or the same tensors in one *.safetensors file)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdpo.errors import ModelError
from sdpo.eval.rewards.clip_embed import ClipEmbedder, load_clip_folder, pick_device

# Indices of the Linear layers inside ``layers`` (the others are Dropout), as in the public checkpoint.
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The predictor's MLP; sizes come from the checkpoint (768 -> 1024 -> 128 -> 64 -> 16 -> 1 for ViT-L/14)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        if len(sizes) != len(HEAD_LINEAR_INDICES) + 1:
            raise ValueError(f"expected {len(HEAD_LINEAR_INDICES) + 1} layer sizes, got {sizes}")
        s = sizes
        self.layers = nn.Sequential(
            nn.Linear(s[0], s[1]),
            nn.Dropout(HEAD_DROPOUTS[0]),
            nn.Linear(s[1], s[2]),
            nn.Dropout(HEAD_DROPOUTS[1]),
            nn.Linear(s[2], s[3]),
            nn.Dropout(HEAD_DROPOUTS[2]),
            nn.Linear(s[3], s[4]),
            nn.Linear(s[4], s[5]),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def read_head_state(path: Path) -> dict[str, torch.Tensor]:
    """The head's state dict from a ``.pth`` (tensors only, loaded with ``weights_only``) or ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load and safetensors raise many types for corrupt or foreign files
        raise ModelError(f"{path}: cannot read the aesthetic head weights: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def build_head(state: dict[str, torch.Tensor], source: Path) -> AestheticHead:
    """An :class:`AestheticHead` with sizes inferred from ``state`` and the weights loaded strictly."""
    expected = {f"layers.{i}.{kind}" for i in HEAD_LINEAR_INDICES for kind in ("weight", "bias")}
    if set(state) != expected:
        raise ModelError(
            f"{source}: not a LAION aesthetic head: expected keys {sorted(expected)}, "
            f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    weights = [state[f"layers.{i}.weight"] for i in HEAD_LINEAR_INDICES]
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    head = AestheticHead(sizes)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{source}: aesthetic head weights do not fit the MLP: {err}") from err
    return head.eval()


def find_head_file(folder: Path) -> Path:
    """The single ``*.pth`` / ``*.safetensors`` file at the top of the aesthetic folder."""
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".pth", ".pt", ".safetensors"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ModelError(f"{folder}: expected exactly one head file (*.pth or *.safetensors), found {found}")
    return candidates[0]


class AestheticReward:
    """Aesthetic score (roughly 1-10 for the public head) of each image; the prompt is ignored."""

    name = "aesthetic"

    def __init__(self, embedder: ClipEmbedder, head: AestheticHead) -> None:
        self.embedder = embedder
        self.head = head.to(embedder.device)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return np.zeros(0)
        embeddings = self.embedder.image_embeds(images).to(self.embedder.device)
        return self.head(embeddings).squeeze(-1).double().cpu().numpy()


def load_aesthetic(folder: Path, device: torch.device | str | None = None) -> AestheticReward:
    """The aesthetic predictor from a folder laid out as in this module's docstring."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: the aesthetic reward needs a folder holding clip/ and the head file")
    head_path = find_head_file(folder)
    head = build_head(read_head_state(head_path), head_path)
    embedder = load_clip_folder(folder / "clip", pick_device(device), with_tokenizer=False)
    if embedder.model.config.projection_dim != head.layers[0].in_features:
        raise ModelError(
            f"{head_path}: head expects {head.layers[0].in_features}-d embeddings but {folder / 'clip'} "
            f"projects to {embedder.model.config.projection_dim}"
        )
    return AestheticReward(embedder, head)
