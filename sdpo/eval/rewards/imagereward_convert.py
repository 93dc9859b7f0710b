"""Convert the public ``ImageReward.pt`` state dict (THUDM/ImageReward) to transformers BLIP modules plus its head.

The checkpoint is the state dict of ImageReward's ``ImageReward`` module: ``blip.visual_encoder.*`` (BLIP's timm-style
VisionTransformer), ``blip.text_encoder.*`` (BLIP's ``med.py`` BertModel with cross-attention, no pooler),
``blip.vision_proj`` / ``blip.text_proj`` (contrastive projections the score never uses) and ``mlp.layers.*``
(Linear layers at Sequential indices 0, 2, 4, 6, 7; Dropouts in between have no weights).

The vision tower maps onto transformers' ``BlipVisionModel`` name for name (both store a fused ``qkv`` projection laid
out as ``(3, heads, head_dim)``, so it is copied, not split). The text tower's names are transformers'
``BlipTextModel`` names already (transformers ported the same ``med.py``). Architecture: the text side comes from
``med_config.json``; the vision side is not in any config file (ImageReward hard-codes ``vit='large'``) and is read
from the tensor shapes, with heads of width 64 as in BLIP's ViT-B/16 and ViT-L/16.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sdpo.errors import ModelError

VISION_HEAD_DIM = 64  # BLIP ViT-B (768 / 12) and ViT-L (1024 / 16)
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)  # Linear layers of ImageReward's MLP Sequential

_VISION_WHOLE = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1.": "layer_norm1.",
    "attn.qkv.": "self_attn.qkv.",
    "attn.proj.": "self_attn.projection.",
    "norm2.": "layer_norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
# Text-encoder key suffixes that BlipTextModel (is_decoder=True: it has cross-attention) also uses.
_TEXT_KEY = re.compile(
    r"embeddings\.(word_embeddings\.weight|position_embeddings\.weight|LayerNorm\.(weight|bias))"
    r"|encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(intermediate\.dense|output\.(dense|LayerNorm))\.(weight|bias)"
)
# Parts of the checkpoint that the score does not use.
_IGNORED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")


@dataclass
class ConvertedImageReward:
    """An ImageReward checkpoint split into transformers-named state dicts."""

    vision: dict[str, torch.Tensor]  # BlipVisionModel keys
    text: dict[str, torch.Tensor]  # BlipTextModel(add_pooling_layer=False) keys
    head: dict[str, torch.Tensor]  # ImageRewardHead keys (layers.N.weight / bias)


def _convert_vision_key(rest: str) -> str | None:
    if rest in _VISION_WHOLE:
        return _VISION_WHOLE[rest]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if match:
        block, part = match.groups()
        for old, new in _VISION_BLOCK.items():
            if part.startswith(old) and part[len(old) :] in ("weight", "bias"):
                return f"encoder.layers.{block}.{new}{part[len(old) :]}"
    return None


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> ConvertedImageReward:
    """Split and rename an ImageReward state dict; unknown keys and missing head layers raise :class:`ModelError`."""
    out = ConvertedImageReward({}, {}, {})
    unknown: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if not isinstance(value, torch.Tensor):
            unknown.append(raw_key)
            continue
        if _IGNORED.fullmatch(key):
            continue
        value = value.float() if value.is_floating_point() else value
        if key.startswith("blip.visual_encoder."):
            new = _convert_vision_key(key.removeprefix("blip.visual_encoder."))
            if new is None:
                unknown.append(raw_key)
            else:
                out.vision[new] = value
        elif key.startswith("blip.text_encoder.") and _TEXT_KEY.fullmatch(key.removeprefix("blip.text_encoder.")):
            out.text[key.removeprefix("blip.text_encoder.")] = value
        elif re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", key) and int(key.split(".")[2]) in HEAD_LINEAR_INDICES:
            out.head[key.removeprefix("mlp.")] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ModelError(
            f"not an ImageReward state dict: {len(unknown)} keys have no transformers equivalent, e.g. {unknown[:5]}"
        )
    expected_head = {f"layers.{i}.{kind}" for i in HEAD_LINEAR_INDICES for kind in ("weight", "bias")}
    if set(out.head) != expected_head:
        raise ModelError(f"not an ImageReward state dict: MLP head lacks {sorted(expected_head - set(out.head))}")
    for needed in ("embeddings.class_embedding", "embeddings.position_embedding", "embeddings.patch_embedding.weight"):
        if needed not in out.vision:
            raise ModelError(f"not an ImageReward state dict: no blip.visual_encoder weights for {needed}")
    return out


def vision_config_from_state(vision: dict[str, torch.Tensor]):
    """The ``BlipVisionConfig`` of a converted vision state dict, read from its shapes."""
    from transformers import BlipVisionConfig

    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    positions = vision["embeddings.position_embedding"].shape[1]
    grid = math.isqrt(positions - 1)
    layers = {int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")}
    if grid * grid != positions - 1 or hidden % VISION_HEAD_DIM or layers != set(range(len(layers))) or not layers:
        raise ModelError(
            f"not a BLIP ViT: {positions} positions, width {hidden}, blocks {sorted(layers)} (expected a square "
            f"patch grid plus a class token, width a multiple of {VISION_HEAD_DIM}, blocks 0..n-1)"
        )
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // VISION_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def text_config_from_med(med: dict, encoder_width: int):
    """A ``BlipTextConfig`` (with cross-attention layers) from ImageReward's ``med_config.json``.

    ``encoder_width`` is the vision width: BLIP overrides med_config's ``encoder_width`` with it (1024 for ViT-L).
    """
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise ModelError(
            "med_config.json: add_cross_attention must be true (ImageReward's text encoder attends to the image)"
        )
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(
            f"med_config.json: position_embedding_type {med['position_embedding_type']!r} is not supported"
        )
    try:
        return BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=med["hidden_size"],
            encoder_hidden_size=encoder_width,
            intermediate_size=med["intermediate_size"],
            num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=med["max_position_embeddings"],
            hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            pad_token_id=med.get("pad_token_id", 0),
            bos_token_id=None,  # generation ids; the score never generates (defaults warn on tiny vocabularies)
            eos_token_id=None,
            sep_token_id=None,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=True,  # builds the cross-attention layers; the forward pass still runs bidirectionally
        )
    except KeyError as err:
        raise ModelError(f"med_config.json: missing {err.args[0]!r}") from err
