"""LoRA on the denoiser through peft, the way diffusers' training scripts do it.

In LoRA mode the reference model is the same network with its adapters switched off (:func:`adapters_disabled`),
so no second copy of the weights is held.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sdpo.errors import ModelError
from sdpo.models._atomic import atomic_directory

ADAPTER_NAME = "default"


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain model inside DDP / DeepSpeed / ``torch.compile`` wrappers (the module itself otherwise)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_torch_compile=False)


def has_lora(denoiser: nn.Module) -> bool:
    """Whether peft adapter layers are injected in ``denoiser``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unwrap_model(denoiser).modules())


def add_lora(denoiser: nn.Module, rank: int, alpha: float, target_modules: list[str]) -> nn.Module:
    """Inject a LoRA adapter into ``denoiser`` in place; afterwards only the LoRA parameters are trainable.

    ``lora_B`` starts at zero, so the adapted network computes exactly the base network until it is trained.
    """
    from peft import LoraConfig

    model = unwrap_model(denoiser)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ModelError(f"model.lora.target_modules {list(target_modules)}: {err}") from err
    return denoiser


def _require_lora(model: nn.Module) -> None:
    if not has_lora(model):
        raise ModelError(f"{type(model).__name__} has no LoRA adapter (call add_lora first)")


@contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``denoiser`` computes the base network (adapters off); ``requires_grad`` flags are restored."""
    model = unwrap_model(denoiser)
    _require_lora(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    model.disable_adapters()
    try:
        yield denoiser
    finally:
        model.enable_adapters()
        for param, flag in trainable:
            param.requires_grad_(flag)


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights alone, with peft's key names."""
    from peft import get_peft_model_state_dict

    model = unwrap_model(denoiser)
    _require_lora(model)
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def _lora_pipeline_class(model: nn.Module) -> tuple[type, str]:
    """The pipeline class whose ``save_lora_weights`` writes LoRA for ``model``, and its component name."""
    from diffusers import (
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if isinstance(model, SD3Transformer2DModel):
        return StableDiffusion3Pipeline, "transformer"
    if isinstance(model, UNet2DConditionModel):
        is_sdxl = model.config.get("addition_embed_type") == "text_time"
        return (StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline), "unet"
    raise ModelError(f"cannot save LoRA weights for a {type(model).__name__}: expected a UNet or an SD3 transformer")


def save_lora(denoiser: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write the LoRA weights and their rank/alpha in the diffusers format (``pipeline.load_lora_weights(out_dir)``)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    model = unwrap_model(denoiser)
    state = convert_state_dict_to_diffusers(lora_state_dict(model))
    metadata = model.peft_config[ADAPTER_NAME].to_dict()
    pipeline_class, component = _lora_pipeline_class(model)
    with atomic_directory(out_dir) as tmp:
        pipeline_class.save_lora_weights(
            tmp, **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata}
        )


def merge_lora(denoiser: nn.Module) -> nn.Module:
    """Fuse the LoRA weights into the base weights and remove the adapter layers (in place); returns the plain model."""
    model = unwrap_model(denoiser)
    _require_lora(model)
    model.fuse_lora()
    model.unload_lora()
    return model
