"""The frozen reference: a copy (fp32 or bf16 weights), the policy with LoRA adapters off, or precomputed errors.

DPO, DMPO and SFT need only the reference's per-sample errors ``r_w``, ``r_l``. Because every pair's draws are a
pure function of (seed, epoch, pair key) (:mod:`sdpo.train.noise`), those errors can be computed before training
for every (pair, epoch) the run will visit: :func:`precompute_reference_errors` does it from the latent cache, the
encode stage stores them beside it, and the trainer then runs no reference model at all (one forward fewer per
step, no second copy of the weights), for every arm of the experiment alike. DSPO needs the reference's prediction
itself and cannot use them.

The errors are always computed in fp32 from the reference's output (bf16 has about 3 significant digits, and at
beta 5000 an error of 1e-4 in ``r_w - r_l`` moves the inside term u by 0.25).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from sdpo.errors import TrainingError
from sdpo.objectives import per_sample_mse
from sdpo.train.inputs import DenoiserInputs, denoiser_inputs, encode_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# settings the precomputed errors depend on (besides the model and the cache): the trainer must use the same
REFERENCE_SETTINGS = ("seed", "random_flip", "prompt_dropout", "mixed_precision", "reference_dtype")


def frozen_copy(denoiser: nn.Module, dtype: str = "float32") -> nn.Module:
    """A frozen copy of ``denoiser`` (eval mode, no gradients) with weights in ``dtype``."""
    module = copy.deepcopy(denoiser).eval().requires_grad_(False)
    return module if dtype == "float32" else module.to(DTYPES[dtype])


def forward_context(device: torch.device, mixed_precision: str, reference_dtype: str = "float32"):
    """The autocast a reference forward runs under: the trainer's mixed precision, and bf16 for bf16 weights."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if reference_dtype == "bfloat16":
        dtype = torch.bfloat16  # bf16 weights need bf16 compute even when the policy trains in fp32
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def reference_errors(model, module: nn.Module, x: DenoiserInputs, context: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l): the reference's fp32 per-sample errors on a pair micro-batch."""
    with context:
        pred = model.predict(module, x.noisy, x.timesteps, x.cond)
    ref_w, ref_l = pred.chunk(2)
    return per_sample_mse(ref_w, x.target_w), per_sample_mse(ref_l, x.target_l)


def epochs_needed(tcfg: Any, num_pairs: int, world_size: int = 1) -> int:
    """How many epochs of draws ``train.steps`` visits with ``world_size`` processes (the loader's plan)."""
    per_epoch = num_pairs // (world_size * tcfg.batch_size)
    if per_epoch == 0:
        raise TrainingError(f"{num_pairs} pairs are fewer than one global batch ({world_size} x {tcfg.batch_size})")
    return math.ceil(tcfg.steps * tcfg.grad_accum / per_epoch)


def settings_of(tcfg: Any, *, random_flip: bool) -> dict[str, Any]:
    """The training settings the reference errors depend on, as recorded in the cache manifest."""
    values = {name: getattr(tcfg, name) for name in REFERENCE_SETTINGS}
    values["random_flip"] = random_flip
    return values


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@torch.no_grad()
def precompute_reference_errors(model, dataset, tcfg: Any, *, epochs: int, random_flip: bool,
                                batch_size: int, progress: bool = False) -> np.ndarray:
    """float32 ``[pairs, epochs, 2]``: (r_w, r_l) of every pair of the latent cache ``dataset`` in every epoch.

    The draws are those the trainer makes (same seed, flips, prompt dropout, timesteps, noise and posterior
    normals), the forward runs under the trainer's autocast with the reference weights in ``train.reference_dtype``.
    """
    from sdpo.data.loader import flip_plan
    from sdpo.logs import progress as sdpo_progress

    module = model.denoiser
    if tcfg.reference_dtype != "float32":
        module = frozen_copy(module, tcfg.reference_dtype)
    module.eval()
    context = forward_context(model.device, tcfg.mixed_precision, tcfg.reference_dtype)
    n = len(dataset)
    out = np.zeros((n, epochs, 2), dtype=np.float32)
    empty = dataset.empty_prompt()
    bar = sdpo_progress(n * epochs, "reference errors", disable=not progress)
    for epoch in range(epochs):
        flips = flip_plan(tcfg.seed, epoch, n) if random_flip else np.zeros(n, dtype=bool)
        for rows in _batches(n, batch_size):
            items = [dataset.item(i, bool(flips[i])) for i in rows]
            for i, item in zip(rows, items, strict=True):
                item["index"], item["epoch"] = i, epoch
            batch = dataset.collate(items)
            enc = encode_batch(model, batch, seed=tcfg.seed, prompt_dropout=tcfg.prompt_dropout,
                               resolution=dataset.resolution, empty_prompt=empty)
            r_w, r_l = reference_errors(model, module, denoiser_inputs(model, enc), context)
            out[rows.start:rows.stop, epoch, 0] = r_w.cpu().numpy()
            out[rows.start:rows.stop, epoch, 1] = r_l.cpu().numpy()
            bar.update(len(rows))
    bar.close()
    return out


class PrecomputedReference:
    """The reference errors of a latent cache, looked up by (dataset position, epoch)."""

    def __init__(self, dataset, tcfg: Any, *, random_flip: bool, world_size: int, denoiser_digest: str) -> None:
        record = dataset.reference
        if not record:
            raise TrainingError(f"{dataset.root}: train.precompute_reference is on but this cache holds no "
                                "reference errors; re-run `sdpo encode` with train.precompute_reference=true")
        wanted = settings_of(tcfg, random_flip=random_flip)
        differ = {k: (record["settings"].get(k), v) for k, v in wanted.items() if record["settings"].get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: cache {a!r}, training {b!r}" for k, (a, b) in sorted(differ.items()))
            raise TrainingError(f"{dataset.root}: the precomputed reference errors were drawn with other settings "
                                f"({detail}); re-run `sdpo encode` with these settings")
        if record["denoiser_digest"] != denoiser_digest:
            raise TrainingError(f"{dataset.root}: the precomputed reference errors come from another denoiser "
                                f"({record['denoiser_digest']}, training starts from {denoiser_digest}); re-run "
                                "`sdpo encode`")
        need = epochs_needed(tcfg, len(dataset), world_size)
        if need > record["epochs"]:
            raise TrainingError(f"{dataset.root}: the cache holds reference errors for {record['epochs']} epoch(s) "
                                f"but {tcfg.steps} steps of {tcfg.grad_accum} x {tcfg.batch_size} pairs on "
                                f"{world_size} process(es) reach {need}; set train.reference_epochs={need} and "
                                "re-run `sdpo encode`")
        self.table = dataset.reference_errors()

    def errors(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_w, r_l) of the pairs of a loader batch."""
        rows = self.table[np.asarray(batch["index"]), np.asarray(batch["epoch"])]
        values = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        return values[:, 0], values[:, 1]
