"""A tiny random ImageReward checkpoint in the public layout, and an independent plain-torch reference of its score.

The checkpoint uses the key names of THUDM/ImageReward's ``ImageReward`` module (``blip.visual_encoder.*`` in BLIP's
timm-style ViT naming, ``blip.text_encoder.*`` in BLIP's ``med.py`` BERT naming, ``mlp.layers.{0,2,4,6,7}``). The
reference forward reads those raw tensors directly (fused qkv split as (3, heads, head_dim), BERT heads, additive
-10000 masks as in ``med.py``), so it shares nothing with the adapter's conversion to transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__
MAX_TOKENS = 35
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])

# A hand-written uncased wordpiece vocabulary (whole words only); BLIP's [DEC] and [ENC] are added on top.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "on", "the"]
VOCAB += ["triangle", "big", "small", "##s"]
VISION = dict(width=128, heads=2, layers=2, mlp=256, patch=8, image=32)  # width / heads = 64, as BLIP's ViTs
TEXT = dict(hidden=32, heads=4, layers=2, intermediate=64, max_positions=40)
HEAD_DIMS = [TEXT["hidden"], 24, 12, 8, 4, 1]
IGNORED_KEYS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias")
IGNORED_KEYS += ("blip.text_encoder.embeddings.position_ids",)


def vocab_size() -> int:
    """Token count with [DEC] and [ENC], i.e. med_config's vocab_size."""
    return len(VOCAB) + 2


def med_config() -> dict:
    """A tiny med_config.json. ``encoder_width`` is 768 as in the published file: BLIP overrides it with the vision
    width (1024 for ViT-L, 128 here), so a converter that trusted it would fail to load."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": TEXT["max_positions"],
        "model_type": "bert",
        "num_attention_heads": TEXT["heads"],
        "num_hidden_layers": TEXT["layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size(),
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's key names (including the unused contrastive projections)."""
    gen = torch.Generator().manual_seed(seed)

    def matrix(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) / math.sqrt(inp)

    def vector(n: int, around: float = 0.0) -> torch.Tensor:
        return around + 0.1 * torch.randn(n, generator=gen)

    def linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": matrix(out, inp), f"{prefix}.bias": vector(out)}

    def norm(prefix: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": vector(n, 1.0), f"{prefix}.bias": vector(n)}

    # Embeddings are small (variance ~1e-4 in the ViT, ~1e-5 in BERT) so that the first layer norms depend on
    # their eps: a converter with transformers' default eps (1e-5) instead of BLIP's (1e-6, 1e-12) fails the test.
    small = 0.01
    w, p, grid = VISION["width"], VISION["patch"], VISION["image"] // VISION["patch"]
    v = "blip.visual_encoder."
    state: dict[str, torch.Tensor] = {
        f"{v}cls_token": small * torch.randn(1, 1, w, generator=gen),
        f"{v}pos_embed": small * torch.randn(1, grid * grid + 1, w, generator=gen),
        f"{v}patch_embed.proj.weight": small * torch.randn(w, 3, p, p, generator=gen) / math.sqrt(3 * p * p),
        f"{v}patch_embed.proj.bias": small * vector(w),
        **norm(f"{v}norm", w),
    }
    for n in range(VISION["layers"]):
        b = f"{v}blocks.{n}."
        state |= norm(b + "norm1", w) | linear(b + "attn.qkv", 3 * w, w) | linear(b + "attn.proj", w, w)
        state |= (
            norm(b + "norm2", w) | linear(b + "mlp.fc1", VISION["mlp"], w) | linear(b + "mlp.fc2", w, VISION["mlp"])
        )
    h, t = TEXT["hidden"], "blip.text_encoder."
    state |= {
        f"{t}embeddings.word_embeddings.weight": 0.3 * small * torch.randn(vocab_size(), h, generator=gen),
        f"{t}embeddings.position_embeddings.weight": 0.3 * small * torch.randn(TEXT["max_positions"], h, generator=gen),
        f"{t}embeddings.position_ids": torch.arange(TEXT["max_positions"]).expand(1, -1).clone(),
        **norm(f"{t}embeddings.LayerNorm", h),
    }
    for n in range(TEXT["layers"]):
        layer = f"{t}encoder.layer.{n}."
        for kind, kv_width in (("attention", h), ("crossattention", w)):
            a = f"{layer}{kind}."
            state |= linear(a + "self.query", h, h) | linear(a + "self.key", h, kv_width)
            state |= linear(a + "self.value", h, kv_width) | linear(a + "output.dense", h, h)
            state |= norm(a + "output.LayerNorm", h)
        state |= linear(layer + "intermediate.dense", TEXT["intermediate"], h)
        state |= linear(layer + "output.dense", h, TEXT["intermediate"]) | norm(layer + "output.LayerNorm", h)
    state |= linear("blip.vision_proj", 16, w) | linear("blip.text_proj", 16, h)
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(HEAD_DIMS, HEAD_DIMS[1:], strict=False), strict=True):
        state |= linear(f"mlp.layers.{index}", out, inp)
    return state


def write_vocab(folder: Path, vocab: list[str] = VOCAB) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")


def write_tiny_imagereward(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageReward.pt + med_config.json + vocab.txt in ``folder``; returns the state dict that was saved."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_state(seed)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med_config(), indent=2))
    write_vocab(folder)
    return state


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB noise images of the given (width, height)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())
        for width, height in sizes
    ]


def reference_tokens(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD]... to 35 tokens: what ImageReward's BERT tokenizer gives for whole-word prompts."""
    ids = []
    for prompt in prompts:
        words = [VOCAB.index(word) for word in prompt.lower().split()][: MAX_TOKENS - 2]
        row = [VOCAB.index("[CLS]"), *words, VOCAB.index("[SEP]")]
        ids.append(row + [VOCAB.index("[PAD]")] * (MAX_TOKENS - len(row)))
    input_ids = torch.tensor(ids)
    return input_ids, (input_ids != VOCAB.index("[PAD]")).long()


def reference_pixels(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC), CenterCrop(size), RGB, ToTensor, Normalize(CLIP), written out;
    ``size`` defaults to the ViT's input size."""
    size = size or VISION["image"]
    out = []
    for image in images:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if width <= height else (new_long, size)
        resized = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        crop = resized.crop((left, top, left + size, top + size)).convert("RGB")
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        out.append((x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None])
    return torch.stack(out)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | float = 0.0):
    """softmax(q k^T / sqrt(d) + bias) v over ``heads`` heads; q (B, Lq, D), k and v (B, Lk, D)."""
    b, lq, d = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads) + bias
    return (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, lq, d)


def reference_vit(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer forward (pre-norm blocks, eps 1e-6, exact GELU, final norm) from raw tensors."""
    s = {k.removeprefix("blip.visual_encoder."): t for k, t in state.items() if k.startswith("blip.visual_encoder.")}
    width, heads = s["cls_token"].shape[-1], VISION["heads"]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    w = s["patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, s["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s["pos_embed"]
    for n in range(VISION["layers"]):
        blk = f"blocks.{n}"
        q, k, v = lin(ln(x, f"{blk}.norm1"), f"{blk}.attn.qkv").chunk(3, dim=-1)  # (3, heads, head_dim) layout
        x = x + lin(_attention(q, k, v, heads), f"{blk}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{blk}.norm2"), f"{blk}.mlp.fc1")), f"{blk}.mlp.fc2")
    return ln(x, "norm")


def reference_text(
    state: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor
) -> torch.Tensor:
    """med.py's BertModel in multimodal mode (self-attention, cross-attention to ``image``, FFN); (B, L, H)."""
    s = {k.removeprefix("blip.text_encoder."): t for k, t in state.items() if k.startswith("blip.text_encoder.")}
    hidden, heads = TEXT["hidden"], TEXT["heads"]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (hidden,), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-12)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    positions = s["embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    x = ln(s["embeddings.word_embeddings.weight"][input_ids] + positions, "embeddings.LayerNorm")
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for n in range(TEXT["layers"]):
        for kind, source, bias in (("attention", None, pad_bias), ("crossattention", image, 0.0)):
            a = f"encoder.layer.{n}.{kind}"
            kv = x if source is None else source
            ctx = _attention(
                lin(x, f"{a}.self.query"), lin(kv, f"{a}.self.key"), lin(kv, f"{a}.self.value"), heads, bias
            )
            x = ln(lin(ctx, f"{a}.output.dense") + x, f"{a}.output.LayerNorm")
        layer = f"encoder.layer.{n}"
        ffn = lin(F.gelu(lin(x, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        x = ln(ffn + x, f"{layer}.output.LayerNorm")
    return x


def reference_scores(state: dict[str, torch.Tensor], images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """ImageReward scores computed from the raw checkpoint tensors: (mlp(text[:, 0]) - mean) / std."""
    with torch.no_grad():
        state = {k: t.double() if t.is_floating_point() else t for k, t in state.items()}
        image = reference_vit(state, reference_pixels(images).double())
        input_ids, mask = reference_tokens(prompts)
        x = reference_text(state, input_ids, mask, image)[:, 0]
        for index in (0, 2, 4, 6, 7):  # Dropouts at 1, 3, 5 are identities at inference; no activations
            x = x @ state[f"mlp.layers.{index}.weight"].T + state[f"mlp.layers.{index}.bias"]
        return ((x.squeeze(-1) - MEAN) / STD).numpy()
