"""ImageReward (Xu et al. 2023) is registered but not supported offline yet.

A faithful port needs the BLIP ViT-L/16 image encoder plus a BERT text encoder with cross-attention and the
ImageReward MLP head, converted from the ``ImageReward.pt`` checkpoint (LAVIS/BLIP key layout) to transformers'
``BlipForImageTextRetrieval`` layout, and a ``bert-base-uncased`` tokenizer with the extra ``[ENC]`` token.
That conversion is not implemented; the adapter fails with a message saying so instead of scoring wrongly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpo.errors import ModelError


def load_imagereward(path: Path, device: torch.device | str | None = None):
    """Always raises :class:`ModelError`: ImageReward cannot be loaded offline by this version of sdpo."""
    raise ModelError(
        f"reward 'imagereward' is not supported offline yet (configured weights: {path}). It would need the "
        "ImageReward.pt checkpoint (BLIP ViT-L + BERT with cross-attention + MLP head), its med_config.json and a "
        "bert-base-uncased tokenizer folder, converted to transformers' BlipForImageTextRetrieval; that converter "
        "is not written. Remove 'imagereward' from eval.rewards or use pickscore, hpsv2, clip or aesthetic."
    )
