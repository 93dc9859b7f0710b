"""Convert an open_clip CLIP state dict (ViT image tower + transformer text tower) to transformers ``CLIPModel`` keys.

open_clip needs torchvision, which cannot be imported beside this torch, so checkpoints in its format (HPS v2 is one)
are loaded as plain tensors and renamed. The architectures match block for block; the differences are names, fused
q/k/v projections (``in_proj_weight``) and projections stored transposed (``x @ proj`` versus ``Linear``).
"""

from __future__ import annotations

import re

import torch

from sdpo.errors import ModelError

# open_clip prefix -> transformers prefix, tried in order (first match wins).
_PREFIXES: list[tuple[str, str]] = [
    (r"visual\.transformer\.resblocks\.(\d+)\.", r"vision_model.encoder.layers.\1."),
    (r"transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1."),
    (r"visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"ln_final\.", "text_model.final_layer_norm."),
]
_WHOLE_KEYS = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
# Stored as (width, embed_dim) and applied as x @ proj; transformers' Linear wants the transpose.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Inside a residual block.
_BLOCK_PARTS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
# Buffers open_clip may save that transformers rebuilds itself.
_IGNORED = {"attn_mask"}


def _convert_block_key(rest: str, value: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]  # weight | bias
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (q, k, v), strict=True)}
    for old, new in _BLOCK_PARTS.items():
        if rest.startswith(old):
            return {prefix + new + rest[len(old) :]: value}
    raise KeyError(rest)


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip state dict to ``CLIPModel`` keys; unknown keys raise :class:`ModelError`."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if key in _IGNORED:
            continue
        if key in _WHOLE_KEYS:
            converted[_WHOLE_KEYS[key]] = value
            continue
        if key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        for pattern, replacement in _PREFIXES:
            match = re.match(pattern, key)
            if not match:
                continue
            prefix = match.expand(replacement)
            rest = key[match.end() :]
            try:
                converted.update(
                    _convert_block_key(rest, value, prefix) if "layers." in prefix else {prefix + rest: value}
                )
            except KeyError:
                unknown.append(raw_key)
            break
        else:
            unknown.append(raw_key)
    if unknown:
        raise ModelError(
            f"not an open_clip ViT CLIP state dict: {len(unknown)} keys have no transformers equivalent, "
            f"e.g. {unknown[:5]}"
        )
    return converted
