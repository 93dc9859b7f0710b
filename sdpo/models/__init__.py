"""Diffusion model families behind one adapter, tiny offline builders, and LoRA.

The names below are loaded on first use (PEP 562): they import torch and diffusers (seconds), and a light submodule
such as :mod:`sdpo.models._atomic` must not pay for them. CLI commands import them inside ``run``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "sdpo.models.families": ("FAMILY_ADAPTERS", "DiffusionModel", "PredictionType", "SD3Model", "SDXLModel",
                             "UNetModel", "detect_family", "load_model"),
    "sdpo.models.lora": ("adapters_disabled", "add_lora", "has_lora", "lora_state_dict", "merge_lora", "save_lora"),
    "sdpo.models.tiny": ("TINY_FAMILIES", "build_tiny_pipeline", "build_toy_sd15"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
