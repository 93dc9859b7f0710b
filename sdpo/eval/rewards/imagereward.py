"""ImageReward (Xu et al. 2023): BLIP's text encoder reads the prompt while cross-attending to the image; an MLP on its
first output token gives the reward, standardised with the mean and std that ImageReward hard-codes.

Layout of ``eval.reward_paths.imagereward`` (a folder, or the checkpoint file with the other files beside it):

- ``ImageReward.pt``: the public checkpoint (THUDM/ImageReward), a plain state dict read with
  ``torch.load(weights_only=True)``; ``.pth`` or ``.safetensors`` of the same keys also work
- ``med_config.json``: the BERT config published beside it
- the ``bert-base-uncased`` tokenizer (``vocab.txt``, optionally ``tokenizer_config.json``) beside them or in a
  ``tokenizer/`` subfolder; ``[DEC]`` and ``[ENC]`` are added as BLIP's ``init_tokenizer`` does (30524 tokens)

Scoring follows ImageReward's ``ImageReward.score``/``inference_rank``: prompts are tokenised to 35 tokens
(padded to that length, truncated beyond it) and fed as the tokenizer returns them, so position 0 holds ``[CLS]``
(ImageReward does not swap in ``[ENC]`` there, unlike BLIP's ITM head); images are resized (shorter side, bicubic),
center-cropped to the ViT's input size (224 for ImageReward-v1.0), converted to RGB and normalised with CLIP's
mean and std. Conversion is a rename of tensors (see :mod:`~sdpo.eval.rewards.imagereward_convert`), so nothing is
cached: loading costs about one ``torch.load`` of the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdpo.errors import ModelError
from sdpo.eval.rewards.clip_embed import pick_device
from sdpo.eval.rewards.imagereward_convert import (
    HEAD_LINEAR_INDICES,
    ConvertedImageReward,
    imagereward_to_transformers,
    text_config_from_med,
    vision_config_from_state,
)
from sdpo.eval.rewards.weights import read_state_dict

# ImageReward.__init__: standardisation of the MLP output.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # ImageReward tokenises with padding="max_length", max_length=35
CHECKPOINT_NAME = "ImageReward.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
MED_CONFIG_NAME = "med_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardHead(nn.Module):
    """ImageReward's MLP: Linear layers at Sequential indices 0, 2, 4, 6, 7 with Dropouts between (no activations)."""

    def __init__(self, shapes: Sequence[tuple[int, int]]) -> None:
        """``shapes``: the (out, in) weight shapes of the five Linear layers."""
        super().__init__()
        first, second, third, fourth, last = (nn.Linear(inp, out) for out, inp in shapes)
        self.layers = nn.Sequential(
            first, nn.Dropout(0.2), second, nn.Dropout(0.2), third, nn.Dropout(0.1), fourth, last
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BERT with cross-attention + MLP head; ``forward`` returns the raw (unstandardised) rewards (N,)."""

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module, head: ImageRewardHead) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_encoder = text_encoder
        self.head = head

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.head(text[:, 0, :].float()).squeeze(-1)


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image, as ImageReward applies them.

    Written out because transformers' center crop rounds the offset down where torchvision rounds it to nearest.
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def make_image_processor():
    """A BLIP image processor that only rescales and normalises with CLIP's mean/std (resizing is done before)."""
    try:
        from transformers import BlipImageProcessorPil as processor_class
    except ImportError:  # transformers < 5: BlipImageProcessor is the PIL implementation
        from transformers import BlipImageProcessor as processor_class
    return processor_class(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


class ImageReward:
    """ImageReward scores: (MLP output - REWARD_MEAN) / REWARD_STD, as ImageReward.score returns them."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device, batch_size: int = 32) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = make_image_processor()
        self.image_size: int = model.vision_model.config.image_size
        self.device = device
        self.batch_size = batch_size

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, S, S) float32 inputs of the vision tower."""
        cropped = [resize_and_center_crop(im, self.image_size).convert("RGB") for im in images]
        return torch.as_tensor(self.image_processor(images=cropped, return_tensors="pt")["pixel_values"])

    def tokenize(self, prompts: Sequence[str]):
        """input_ids / attention_mask of shape (N, 35), exactly as ImageReward tokenises."""
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        out = [np.zeros(0)]
        for start in range(0, len(images), self.batch_size):
            batch_images = images[start : start + self.batch_size]
            tokens = self.tokenize(prompts[start : start + self.batch_size])
            raw = self.model(
                self.pixel_values(batch_images).to(self.device),
                tokens["input_ids"].to(self.device),
                tokens["attention_mask"].to(self.device),
            )
            out.append(((raw.float().cpu() - REWARD_MEAN) / REWARD_STD).double().numpy())
        return np.concatenate(out)


def find_checkpoint(path: Path) -> Path:
    """``path`` when it is a file; else ``ImageReward.pt`` in the folder, or its only checkpoint file."""
    if path.is_file():
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ModelError(
            f"{path}: expected the ImageReward checkpoint {CHECKPOINT_NAME} (or exactly one "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} file), found {found}"
        )
    return candidates[0]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an ImageReward checkpoint: ``weights_only`` torch.load (never unpickles code), or safetensors."""
    return read_state_dict(path, "ImageReward")


def load_tokenizer(folder: Path, vocab_size: int):
    """BLIP's tokenizer: bert-base-uncased from ``folder`` (or ``folder/tokenizer``) plus [DEC] and [ENC]."""
    from transformers import BertTokenizer

    location = folder / "tokenizer" if (folder / "tokenizer" / "vocab.txt").is_file() else folder
    if not (location / "vocab.txt").is_file():
        # Without vocab.txt transformers would build a tokenizer that maps every word to [UNK].
        raise ModelError(
            f"{folder}: no BERT tokenizer (vocab.txt of bert-base-uncased, beside the checkpoint or in tokenizer/)"
        )
    try:
        tokenizer = BertTokenizer.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"{location}: cannot load the BERT tokenizer: {err}") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ModelError(
            f"{location}: the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC], but {MED_CONFIG_NAME} "
            f"says vocab_size {vocab_size} (ImageReward uses bert-base-uncased: 30522 + 2)"
        )
    return tokenizer


def _strict_from_state(model_class, config, state: dict[str, torch.Tensor], what: str, **kwargs) -> nn.Module:
    # from_pretrained with a state dict skips the slow random initialisation of ViT-L; it would also silently
    # initialise missing weights at random, hence the key check.
    try:
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32, **kwargs)
    except RuntimeError as err:  # shape mismatches
        raise ModelError(f"{what} weights do not match their config: {err}") from err
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ModelError(
            f"{what} weights do not match their config: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    return model.float().eval()


def build_model(converted: ConvertedImageReward, med_config: dict) -> ImageRewardModel:
    """The transformers modules for a converted checkpoint, every weight loaded (none left at random)."""
    from transformers import BlipTextModel, BlipVisionModel

    vision_config = vision_config_from_state(converted.vision)
    text_config = text_config_from_med(med_config, vision_config.hidden_size)
    vision = _strict_from_state(BlipVisionModel, vision_config, converted.vision, "vision (blip.visual_encoder)")
    text = _strict_from_state(
        BlipTextModel, text_config, converted.text, "text (blip.text_encoder)", add_pooling_layer=False
    )
    head = ImageRewardHead([tuple(converted.head[f"layers.{i}.weight"].shape) for i in HEAD_LINEAR_INDICES])
    try:
        head.load_state_dict(converted.head, strict=True)
    except RuntimeError as err:
        raise ModelError(f"MLP head (mlp.layers) weights are inconsistent: {err}") from err
    return ImageRewardModel(vision, text, head.eval())


def load_imagereward(path: Path, device: torch.device | str | None = None) -> ImageReward:
    """ImageReward from a folder (or checkpoint file) laid out as in this module's docstring."""
    checkpoint = find_checkpoint(path)
    folder = checkpoint.parent
    med_path = folder / MED_CONFIG_NAME
    if not med_path.is_file():
        raise ModelError(f"{med_path}: missing; ImageReward needs its {MED_CONFIG_NAME} beside the checkpoint")
    try:
        med_config = json.loads(med_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{med_path}: cannot read: {err}") from err
    tokenizer = load_tokenizer(folder, med_config.get("vocab_size", -1))
    try:
        model = build_model(imagereward_to_transformers(read_checkpoint(checkpoint)), med_config)
    except ModelError as err:
        raise ModelError(f"{checkpoint}: {err}") from err
    return ImageReward(model, tokenizer, pick_device(device))
