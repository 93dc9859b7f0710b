"""Diffusion model families behind one adapter, tiny offline builders, and LoRA.

Importing this package imports torch and diffusers; CLI commands import it inside ``run``.
"""

from sdpo.models.families import (
    FAMILY_ADAPTERS,
    DiffusionModel,
    PredictionType,
    SD3Model,
    SDXLModel,
    UNetModel,
    detect_family,
    load_model,
)
from sdpo.models.lora import adapters_disabled, add_lora, has_lora, lora_state_dict, merge_lora, save_lora
from sdpo.models.tiny import TINY_FAMILIES, build_tiny_pipeline, build_toy_sd15

__all__ = [
    "FAMILY_ADAPTERS",
    "TINY_FAMILIES",
    "DiffusionModel",
    "PredictionType",
    "SD3Model",
    "SDXLModel",
    "UNetModel",
    "add_lora",
    "adapters_disabled",
    "build_tiny_pipeline",
    "build_toy_sd15",
    "detect_family",
    "has_lora",
    "load_model",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
]
