"""The learning-rate schedule: any diffusers schedule, stepped the way accelerate steps a prepared scheduler."""

from __future__ import annotations

from typing import Any

import torch


def scaled_step_rules(rules: str, factor: int) -> str:
    """``"1:10,0.1:20,0.01"`` with every step boundary multiplied by ``factor`` (the multiplier stays)."""
    parts = []
    for rule in rules.split(","):
        if ":" in rule:
            value, step = rule.split(":")
            parts.append(f"{value}:{int(step) * factor}")
        else:
            parts.append(rule)
    return ",".join(parts)


def build_lr_scheduler(tcfg: Any, optimizer: torch.optim.Optimizer, num_processes: int):
    """``diffusers.optimization.get_scheduler`` for ``train.lr_schedule`` and its settings.

    A prepared scheduler is stepped once per process per optimizer step, so step counts are multiplied by the
    number of processes, as diffusers' training scripts (and the reference code) do. The schema refuses a warmup
    that the chosen schedule would ignore.
    """
    from diffusers.optimization import get_scheduler

    rules = scaled_step_rules(tcfg.lr_step_rules, num_processes) if tcfg.lr_step_rules else None
    return get_scheduler(tcfg.lr_schedule, optimizer, step_rules=rules,
                         num_warmup_steps=tcfg.warmup_steps * num_processes,
                         num_training_steps=tcfg.steps * num_processes, num_cycles=tcfg.lr_num_cycles,
                         power=tcfg.lr_power)
