"""Helpers for the evaluation tests: tiny CLIP folders and the open_clip weight layout.

Everything is built offline from configs with random weights. The helpers' own behaviour is checked here too,
since the reward tests rely on them (the tokenizer trap from STACK_NOTES in particular).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]


def write_clip_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt) in ``folder``; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [*LETTERS, *(c + "</w>" for c in LETTERS), *(a + b for a, b in MERGES)]:
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    return len(vocab)


def write_clip_preprocessor(folder: Path, size: int) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)


def tiny_clip_config(vocab_size: int, image_size: int = 16, projection_dim: int = 8, hidden_act: str = "quick_gelu"):
    from transformers import CLIPConfig

    eos = vocab_size - 1
    layer = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, hidden_act=hidden_act
    )
    text = dict(layer, vocab_size=vocab_size, max_position_embeddings=77, eos_token_id=eos, bos_token_id=eos - 1)
    vision = dict(layer, image_size=image_size, patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_tiny_clip(folder: Path, seed: int = 0, hidden_act: str = "quick_gelu", logit_scale: float = 2.0):
    """A tiny random CLIPModel saved with its tokenizer and preprocessor in ``folder``; returns the model."""
    from transformers import CLIPModel

    vocab_size = write_clip_tokenizer(folder)
    write_clip_preprocessor(folder, 16)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size, hidden_act=hidden_act)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    return model


def clip_cosines(model, folder: Path, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """cos(image_i, prompt_i) straight from CLIPModel.forward (logits_per_image / logit_scale.exp())."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    tokens = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        return out.logits_per_image.diagonal() / model.logit_scale.exp()


def to_open_clip_layout(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights in open_clip's key layout (the inverse of the adapter's conversion)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),  # a buffer older open_clip versions saved
    }
    for w in ("weight", "bias"):
        out[f"visual.ln_pre.{w}"] = sd[f"vision_model.pre_layrnorm.{w}"]
        out[f"visual.ln_post.{w}"] = sd[f"vision_model.post_layernorm.{w}"]
        out[f"ln_final.{w}"] = sd[f"text_model.final_layer_norm.{w}"]
    towers = (
        ("vision_model", "visual.transformer", model.config.vision_config.num_hidden_layers),
        ("text_model", "transformer", model.config.text_config.num_hidden_layers),
    )
    block_parts = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for hf_tower, oc_tower, layers in towers:
        for n in range(layers):
            hf, oc = f"{hf_tower}.encoder.layers.{n}.", f"{oc_tower}.resblocks.{n}."
            for w in ("weight", "bias"):
                out[f"{oc}attn.in_proj_{w}"] = torch.cat([sd[f"{hf}self_attn.{p}_proj.{w}"] for p in "qkv"])
                for oc_part, hf_part in block_parts.items():
                    out[f"{oc}{oc_part}.{w}"] = sd[f"{hf}{hf_part}.{w}"]
    return {k: v.clone() for k, v in out.items()}


def random_images(n: int, size: tuple[int, int] = (20, 24), seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def test_tiny_tokenizer_tokenizes_words(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path)
    ids = CLIPTokenizer.from_pretrained(tmp_path)("red blue").input_ids
    assert len(ids) == 4 and len(set(ids)) == 4  # bos, red, blue, eos: words are not all <|endoftext|>


def test_open_clip_layout_covers_every_weight(tmp_path: Path) -> None:
    model = build_tiny_clip(tmp_path)
    layout = to_open_clip_layout(model)
    assert sum(v.numel() for k, v in layout.items() if k != "attn_mask") == sum(
        v.numel() for k, v in model.state_dict().items() if not k.endswith("position_ids")
    )
