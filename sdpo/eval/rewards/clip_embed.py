"""Shared CLIP machinery for the CLIP-family rewards: load a transformers CLIP folder, embed images and prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from sdpo.errors import ModelError

T = TypeVar("T")
TOKENIZER_BPE_FILES = ("vocab.json", "merges.txt")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def features(output: torch.Tensor | object) -> torch.Tensor:
    """Projected features from ``get_image_features``/``get_text_features`` (a tensor, or an output object in
    transformers >= 5 where the projection is stored in ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """L2-normalised CLIP image and text embeddings, computed in batches on one device."""

    def __init__(self, model, tokenizer, image_processor, device: torch.device, batch_size: int = 32) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.batch_size = batch_size
        self.max_text_length = model.config.text_config.max_position_embeddings
        if tokenizer is not None:
            self.max_text_length = min(tokenizer.model_max_length, self.max_text_length)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings (float32, on cpu)."""
        out = []
        for batch in chunks(images, self.batch_size):
            pixels = self.image_processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")
            emb = features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (float32, on cpu); prompts longer than the context are truncated."""
        out = []
        for batch in chunks(prompts, self.batch_size):
            tokens = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
            )
            emb = features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            )
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt, shape (N,)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def load_clip_processing(folder: Path):
    """(tokenizer, image processor) from a CLIP folder (``vocab.json``+``merges.txt`` or ``tokenizer.json``,
    and ``preprocessor_config.json``), offline."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    # Without these files transformers silently builds an empty tokenizer that maps every word to one token.
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in TOKENIZER_BPE_FILES):
        raise ModelError(f"{folder}: no CLIP tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{folder}: cannot load the CLIP tokenizer (needs vocab.json + merges.txt or tokenizer.json): {err}"
        ) from err
    return tokenizer, _load_image_processor(folder, CLIPImageProcessorPil)


def load_clip_folder(
    folder: Path, device: torch.device, batch_size: int = 32, *, with_tokenizer: bool = True
) -> ClipEmbedder:
    """A :class:`ClipEmbedder` for a transformers ``CLIPModel`` folder (e.g. PickScore_v1, openai/clip-vit-*).

    ``with_tokenizer=False`` loads only what image embeddings need (no tokenizer files required).
    """
    from transformers import CLIPImageProcessorPil, CLIPModel

    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a transformers CLIP folder (config.json is missing)")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"{folder}: cannot load a CLIPModel: {err}") from err
    # PickScore_v1 ships without processor files (its card loads them from laion/CLIP-ViT-H-14-laion2B-s32B-b79K):
    # they may sit beside the weights or in a processor/ subfolder.
    processing = folder / "processor" if (folder / "processor").is_dir() else folder
    if with_tokenizer:
        tokenizer, image_processor = load_clip_processing(processing)
    else:
        tokenizer, image_processor = None, _load_image_processor(processing, CLIPImageProcessorPil)
    return ClipEmbedder(model, tokenizer, image_processor, device, batch_size)


def _load_image_processor(folder: Path, processor_class):
    try:
        return processor_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}: cannot load the image preprocessor (preprocessor_config.json): {err}") from err
