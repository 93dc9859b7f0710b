"""Reward models behind one interface.

Every reward scores a batch of (image, prompt) pairs; higher is better. ``load_reward(name, path, sha256)``
builds one from the registry below. Weights always come from a configured local path or URI
(``eval.reward_paths.<name>``), optionally pinned by sha256 (``eval.reward_sha256.<name>``); nothing is downloaded
implicitly.

=============  ==========================================================================================
name           weights (``eval.reward_paths.<name>``)
=============  ==========================================================================================
synthetic      none: the synthetic world's programmatic judge, the labeller of its pairs (toy "aesthetic")
alignment      none: colour and shape of the drawn object against the prompt's ground truth (toy CLIP score)
preference     a folder written by ``sdpo.eval.rewards.preference.train_preference_model``: a small image-text
               scorer trained Bradley-Terry on the train pairs only (toy PickScore; config.json +
               model.safetensors)
pickscore      a transformers CLIPModel folder (PickScore_v1) with the CLIP tokenizer and preprocessor files
               beside the weights or in a ``processor/`` subfolder (PickScore_v1 uses those of
               laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
clip           a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14), same layout
aesthetic      a folder with ``clip/`` (CLIP ViT-L/14 transformers folder) and one head file ``*.pth`` or
               ``*.safetensors`` (LAION aesthetic predictor v2, e.g. sac+logos+ava1-l14-linearMSE.pth)
hpsv2          a folder with the open_clip checkpoint (``HPS_v2*.pt``, ``.pth`` or ``.safetensors``), a
               transformers ``config.json`` (CLIPConfig of ViT-H-14, ``hidden_act: gelu``) and the CLIP tokenizer
               and preprocessor files; or the checkpoint file itself with those files beside it
imagereward    a folder with the public ``ImageReward.pt`` (or one ``.pth``/``.safetensors`` of its keys), its
               ``med_config.json`` and the bert-base-uncased tokenizer (``vocab.txt``) beside them or in
               ``tokenizer/``; or the checkpoint file itself with those files beside it
=============  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from sdpo.config import ConfigError
from sdpo.eval.rewards.weights import resolve_weights

if TYPE_CHECKING:
    import torch
    from PIL import Image


@runtime_checkable
class RewardModel(Protocol):
    """Scores images against their prompts; one float per pair, higher is better."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Scores of shape (len(images),) as float64."""
        ...


def _load_synthetic(path: Path | None, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.synthetic import SyntheticJudgeReward

    return SyntheticJudgeReward()


def _load_alignment(path: Path | None, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.alignment import AlignmentReward

    return AlignmentReward()


def _load_preference(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.preference import load_preference

    return load_preference(path, device)


def _load_pickscore(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.pickscore import load_pickscore

    return load_pickscore(path, device)


def _load_clip(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.clip_score import load_clip_score

    return load_clip_score(path, device)


def _load_aesthetic(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.aesthetic import load_aesthetic

    return load_aesthetic(path, device)


def _load_hpsv2(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.hpsv2 import load_hpsv2

    return load_hpsv2(path, device)


def _load_imagereward(path: Path, device: torch.device | str | None) -> RewardModel:
    from sdpo.eval.rewards.imagereward import load_imagereward

    return load_imagereward(path, device)


# name -> (loader, needs weights). Loaders import their module lazily: torch and transformers load only when used.
REWARDS: dict[str, tuple[Callable[[Path | None, torch.device | str | None], RewardModel], bool]] = {
    "synthetic": (_load_synthetic, False),
    "alignment": (_load_alignment, False),
    "preference": (_load_preference, True),
    "pickscore": (_load_pickscore, True),
    "clip": (_load_clip, True),
    "aesthetic": (_load_aesthetic, True),
    "hpsv2": (_load_hpsv2, True),
    "imagereward": (_load_imagereward, True),
}


def load_reward(
    name: str, path: str | None = None, sha256: str | None = None, device: torch.device | str | None = None
) -> RewardModel:
    """Build reward ``name`` with weights from ``path`` (local path, ``file://`` or pyarrow URI such as ``s3://``).

    ``sha256`` pins the weights (a file's sha256, or :func:`~sdpo.eval.rewards.weights.folder_digest` of a folder)
    and is checked before anything is loaded. ``device`` defaults to cuda when available, else cpu.
    """
    if name not in REWARDS:
        raise ConfigError(f"eval.rewards: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    loader, needs_weights = REWARDS[name]
    weights = resolve_weights(name, path, sha256) if needs_weights else None
    return loader(weights, device)


def needs_weights(name: str) -> bool:
    """Whether reward ``name`` needs ``eval.reward_paths.<name>`` (weights are never downloaded)."""
    return REWARDS[name][1]


def reward_names() -> list[str]:
    """Names ``load_reward`` accepts."""
    return sorted(REWARDS)
