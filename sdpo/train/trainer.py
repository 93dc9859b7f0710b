"""One accelerate trainer for SFT, Diffusion-DPO, DSPO and DMPO, with or without the SDPO safeguard.

The loop follows accelerate's conventions (``prepare``, ``accumulate``, ``save_state``/``load_state``). What is
specific here:

- the two images of a pair share one timestep and one noise tensor, and go through the denoiser in one batch;
- every random draw of a pair (prompt dropout, timestep, noise, VAE posterior sample) is a pure function of
  (seed, epoch, pair key) (:mod:`sdpo.train.noise`), whatever the batch, rank or resume point;
- with a latent cache (``train.cache``, :mod:`sdpo.train.cache`) it loads only the denoiser: no VAE, no text encoder;
- the reference is a frozen copy of the denoiser (fp32 or bf16 weights), the same network with LoRA adapters
  disabled, or, for DPO/DMPO with ``train.precompute_reference``, the errors the encode stage stored: no model;
- the data cursor and the noise generator are part of the checkpoint, so ``resume`` continues exactly where the
  run stopped without replaying data (on CPU the final weights equal an uninterrupted run's bit for bit);
- a non-finite loss or gradient stops the run with the step number; the last good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdpo.config import Config, config_to_dict
from sdpo.errors import TrainingError
from sdpo.objectives import ObjectiveConfig, compute_objective

MetricsCallback = Callable[[dict[str, float], int], None]
CheckpointCallback = Callable[[Path], None]


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_metrics: dict[str, float]
    heldout: dict[str, float] = field(default_factory=dict)


class _LoopState:
    """Everything besides model/optimizer/scheduler that a checkpoint must hold (registered with accelerate)."""

    def __init__(self, loader, generator: torch.Generator) -> None:
        self.step = 0
        self.loader = loader
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generator"])


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("step-*") if (p / "COMPLETE").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def _build_optimizer(params: list[torch.nn.Parameter], cfg, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise TrainingError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    raise TrainingError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 over the raw bytes of all parameters (order of ``named_parameters``)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """Train one variant of ``cfg`` on ``shards_dir`` starting from ``base_model``; see :func:`train`."""

    def __init__(self, cfg: Config, *, shards_dir: str | Path, base_model: str, output_dir: str | Path,
                 variant: str | None = None, heldout_shards: str | Path | None = None,
                 on_metrics: MetricsCallback | None = None, on_checkpoint: CheckpointCallback | None = None,
                 show_progress: bool = True, cache_dir: str | Path | None = None,
                 heldout_cache: str | Path | None = None) -> None:
        """``cache_dir``: the latent cache of the train shards (then ``shards_dir`` needs only its manifest);
        ``heldout_cache``: that of the held-out shards, for the held-out probe."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.tcfg = cfg.train.for_variant(variant) if variant else cfg.train
        self.variant = variant or self.tcfg.method
        self.output_dir = Path(output_dir)
        self.shards_dir = Path(shards_dir)
        self.heldout_shards = Path(heldout_shards) if heldout_shards else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.heldout_cache = Path(heldout_cache) if heldout_cache else None
        self.base_model = base_model
        self.on_metrics = on_metrics
        self.on_checkpoint = on_checkpoint
        self.show_progress = show_progress
        self.accelerator = Accelerator(
            mixed_precision=self.tcfg.mixed_precision,
            gradient_accumulation_steps=self.tcfg.grad_accum,
            cpu=not torch.cuda.is_available(),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), automatic_checkpoint_naming=False),
        )

    # --- set-up ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from accelerate.utils import set_seed

        from sdpo.data.loader import PairLoader
        from sdpo.models import load_model
        from sdpo.train.schedule import build_lr_scheduler

        acc, t = self.accelerator, self.tcfg
        set_seed(t.seed)
        if t.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = load_model(self.base_model, self.cfg.model.family if self.cfg.model.base else None,
                                revision=self.cfg.model.revision, device=acc.device, encoders=self.cache_dir is None)
        self.model.freeze_all_but_denoiser()
        denoiser = self.model.denoiser
        denoiser.train()
        self.lora = self.cfg.model.lora.enabled
        dataset = self._dataset()
        self.random_flip = t.random_flip and (self.cache is None or self.cache.flips)
        if t.random_flip and not self.random_flip:
            print(f"train: {self.cache_dir} holds one orientation per image (train.cache_flips=false): "
                  "training without random flips")
        self._set_up_reference(denoiser)
        if self.lora:
            from sdpo.models.lora import add_lora

            lc = self.cfg.model.lora
            add_lora(denoiser, lc.rank, lc.alpha, lc.target_modules)
        if t.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()

        self.loader = PairLoader(dataset, t.batch_size, t.seed, rank=acc.process_index, world_size=acc.num_processes,
                                 random_flip=self.random_flip, num_workers=t.dataloader_workers)
        lr = t.lr * (t.batch_size * t.grad_accum * acc.num_processes if t.scale_lr else 1)
        params = [p for p in denoiser.parameters() if p.requires_grad]
        optimizer = _build_optimizer(params, t, lr)
        scheduler = build_lr_scheduler(t, optimizer, acc.num_processes)
        self.denoiser, self.optimizer, self.scheduler = acc.prepare(denoiser, optimizer, scheduler)
        self.objective = ObjectiveConfig.from_train(t, family=self.model.family)
        # kept in the checkpoint for compatibility; the draws themselves come from sdpo.train.noise
        self.generator = torch.Generator().manual_seed(t.seed * 1000 + acc.process_index)
        self.state = _LoopState(self.loader, self.generator)
        acc.register_for_checkpointing(self.state)
        self.probe = self._heldout_probe() if self.heldout_shards and t.heldout_every and acc.is_main_process \
            else None

    def _dataset(self):
        """The image shards, or the latent cache checked against the model, resolution and shards."""
        from sdpo.data.loader import PairDataset

        self.cache = None
        if self.cache_dir is None:
            dataset = PairDataset(self.shards_dir)
            self.data_manifest, self.resolution = dataset.manifest, int(dataset.resolution)
            return dataset
        from sdpo.train.cache import CachedPairDataset, check_cache_matches

        manifest_path = self.shards_dir / "manifest.json"
        if not manifest_path.is_file():
            raise TrainingError(f"{self.shards_dir}: no manifest.json; training from a cache still needs the "
                                "train shards' manifest (what the cache was encoded from)")
        self.data_manifest = json.loads(manifest_path.read_text())  # the images themselves are not read
        self.resolution = int(self.data_manifest["resolution"])
        self.cache = CachedPairDataset(self.cache_dir)
        check_cache_matches(self.cache, model_dir=self.model.model_dir, family=self.model.family,
                            resolution=self.resolution, source_digest=_manifest_digest(self.shards_dir))
        return self.cache

    def _set_up_reference(self, denoiser: torch.nn.Module) -> None:
        """The reference before adapters are added: a frozen copy, the LoRA base, precomputed errors or none."""
        from sdpo.train.reference import PrecomputedReference, frozen_copy

        t = self.tcfg
        self.reference: torch.nn.Module | None = None
        self.precomputed: PrecomputedReference | None = None
        if t.method == "sft":
            return
        if t.precompute_reference:
            if t.method == "dspo":
                raise TrainingError("train.precompute_reference: DSPO needs the reference's prediction, not only "
                                    "its errors; train DSPO with train.precompute_reference=false")
            from sdpo.train.encode import reference_components

            self.precomputed = PrecomputedReference(self.cache, t, random_flip=self.random_flip,
                                                    world_size=self.accelerator.num_processes,
                                                    denoiser_digest=reference_components(self.model))
        elif not self.lora:
            self.reference = frozen_copy(denoiser, t.reference_dtype)

    def _heldout_probe(self):
        """Held-out winner/loser deltas: from the held-out cache when training from a cache, else from images."""
        from sdpo.train.heldout import HeldoutProbe

        t = self.tcfg
        if self.cache_dir is None:
            from sdpo.data.loader import load_pairs_arrays

            pairs = load_pairs_arrays(self.heldout_shards, n=t.heldout_pairs)
        elif self.heldout_cache is None:
            print("train: no held-out latent cache (run `sdpo encode` on the heldout split): no held-out probe")
            return None
        else:
            from sdpo.train.cache import CachedPairDataset, check_cache_matches

            held = CachedPairDataset(self.heldout_cache)
            check_cache_matches(held, model_dir=self.model.model_dir, family=self.model.family,
                                resolution=self.resolution, source_digest=_manifest_digest(self.heldout_shards))
            pairs = held.first(t.heldout_pairs)
        # before any training step (and before a resume loads its weights) the policy is the reference
        return HeldoutProbe(self.model, pairs, self.reference or self.model.denoiser, seed=t.seed,
                            image_size=self.resolution)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        if self.lora:
            from sdpo.models.lora import adapters_disabled

            inner = self.accelerator.unwrap_model(self.denoiser)
            with adapters_disabled(inner):
                yield inner
        elif self.reference is None:
            raise TrainingError("no reference model in memory (precomputed reference errors, or SFT)")
        else:
            yield self.reference

    # --- one micro-batch ------------------------------------------------------------------------------------

    def _encode(self, batch: dict):
        """Latents (posterior samples with the pairs' own normals), conditioning and draws: live or cached."""
        from sdpo.train.inputs import encode_batch

        return encode_batch(self.model, batch, seed=self.tcfg.seed, prompt_dropout=self.tcfg.prompt_dropout,
                            resolution=self.resolution,
                            empty_prompt=self.cache.empty_prompt() if self.cache is not None else None)

    def _inputs(self, batch: dict):
        """What the denoiser sees for a loader batch (:class:`sdpo.train.inputs.DenoiserInputs`)."""
        from sdpo.train.inputs import denoiser_inputs

        return denoiser_inputs(self.model, self._encode(batch), pairs=self.tcfg.method != "sft")

    def _reference_outputs(self, batch: dict, x) -> dict[str, Any]:
        """``compute_objective``'s reference arguments: precomputed errors, or the reference's predictions."""
        if self.precomputed is not None:
            return {"ref_mse": self.precomputed.errors(batch, x.target_w.device)}
        from sdpo.train.reference import forward_context

        # autocast explicitly: accelerate only wraps the prepared (policy) model's forward in it
        context = forward_context(self.accelerator.device, self.tcfg.mixed_precision,
                                  "float32" if self.lora else self.tcfg.reference_dtype)
        with torch.no_grad(), self._reference() as reference, context:
            ref_pred = self.model.predict(reference, x.noisy, x.timesteps, x.cond)
        ref_w, ref_l = ref_pred.chunk(2)
        return {"ref_pred_w": ref_w, "ref_pred_l": ref_l}

    def _micro_step(self, batch: dict) -> Any:
        x = self._inputs(batch)
        if self.tcfg.method == "sft":
            pred_w = self.model.predict(self.denoiser, x.noisy, x.timesteps, x.cond)
            return compute_objective(self.objective, pred_w, x.target_w)
        reference = self._reference_outputs(batch, x)
        pred = self.model.predict(self.denoiser, x.noisy, x.timesteps, x.cond)
        pred_w, pred_l = pred.chunk(2)
        return compute_objective(self.objective, pred_w, x.target_w, pred_l, x.target_l, **reference)

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop early after ``stop_after`` steps, for interruption tests)."""
        from tqdm.auto import tqdm

        self._setup()
        acc, t = self.accelerator, self.tcfg
        ckpt_root = self.output_dir / "checkpoints"
        metrics_path = self.output_dir / "metrics.jsonl"
        if resume:
            latest = _latest_checkpoint(ckpt_root)
            if latest is not None:
                acc.load_state(str(latest))
                acc.wait_for_everyone()
        elif acc.is_main_process and metrics_path.exists():
            metrics_path.unlink()
        last_good = _latest_checkpoint(ckpt_root)
        stop_at = t.steps if stop_after is None else min(t.steps, self.state.step + stop_after)
        progress = tqdm(total=t.steps, initial=self.state.step, desc=f"train {self.variant}",
                        disable=not (self.show_progress and acc.is_local_main_process))
        batches = iter(self.loader)
        window: dict[str, list[torch.Tensor]] = {}
        tic, pairs_seen = time.perf_counter(), 0
        final: dict[str, float] = {}
        heldout: dict[str, float] = {}
        while self.state.step < stop_at:
            step = self.state.step + 1
            for _ in range(t.grad_accum):
                batch = next(batches)
                with acc.accumulate(self.denoiser):
                    out = self._micro_step(batch)
                    if not torch.isfinite(out.loss):
                        raise TrainingError(self._nonfinite(f"loss is {out.loss.item()}", step, last_good))
                    acc.backward(out.loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = self._clip_and_check(step, last_good)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in out.metrics.items():
                    window.setdefault(k, []).append(v)
                pairs_seen += len(batch["caption"]) * acc.num_processes
            if grad_norm is not None:
                window.setdefault("grad_norm", []).append(grad_norm)
            self.state.step = step
            progress.update(1)
            if step % t.log_every == 0 or step == stop_at:
                final = self._flush(window, step, pairs_seen / (time.perf_counter() - tic))
                progress.set_postfix(loss=f"{final['loss']:.4f}", acc=f"{final.get('implicit_acc', 0):.2f}")
                window, tic, pairs_seen = {}, time.perf_counter(), 0
                self._append_jsonl(metrics_path, {"step": step, **final})
            if self.probe is not None and t.heldout_every and (step % t.heldout_every == 0 or step == t.steps):
                heldout = self.probe.deltas(acc.unwrap_model(self.denoiser))
                row = {f"heldout_{k}": v for k, v in heldout.items() if k != "n_pairs"}
                self._emit(row, step)
                self._append_jsonl(self.output_dir / "heldout.jsonl", {"step": step, **row})
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                last_good = self._checkpoint(ckpt_root, step)
        progress.close()
        if self.state.step < t.steps:  # stopped early on request
            self._checkpoint(ckpt_root, self.state.step)
            return TrainResult(self.output_dir, self.output_dir / "model", self.state.step, final, heldout)
        self._checkpoint(ckpt_root, self.state.step)
        model_dir = self._export(final, heldout)
        return TrainResult(self.output_dir, model_dir, self.state.step, final, heldout)

    def _clip_and_check(self, step: int, last_good: Path | None) -> torch.Tensor:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        max_norm = self.tcfg.max_grad_norm if self.tcfg.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        norm = torch.as_tensor(norm)
        if not torch.isfinite(norm):
            raise TrainingError(self._nonfinite(f"gradient norm is {norm.item()}", step, last_good))
        return norm.detach()

    def _nonfinite(self, what: str, step: int, last_good: Path | None) -> str:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        return (f"non-finite training at step {step} (variant {self.variant!r}): {what}; {kept}. "
                "Lower train.lr or train.beta, or enable gradient clipping (train.max_grad_norm).")

    def _flush(self, window: dict[str, list[torch.Tensor]], step: int, pairs_per_s: float) -> dict[str, float]:
        acc = self.accelerator
        means = {k: torch.stack([v.float() for v in vs]).mean() for k, vs in window.items()}
        names = sorted(means)
        stacked = acc.reduce(torch.stack([means[k] for k in names]).to(acc.device), reduction="mean")
        row = {k: float(v) for k, v in zip(names, stacked.tolist(), strict=True)}
        if "lambda_min" in window:  # min/max over the window, not the mean of minima
            row["lambda_min"] = float(torch.stack(window["lambda_min"]).min())
            row["lambda_max"] = float(torch.stack(window["lambda_max"]).max())
        row["lr"] = float(self.scheduler.get_last_lr()[0])
        row["pairs_per_s"] = pairs_per_s
        self._emit(row, step)
        return row

    def _emit(self, row: dict[str, float], step: int) -> None:
        if self.on_metrics is not None and self.accelerator.is_main_process:
            self.on_metrics(row, step)

    def _append_jsonl(self, path: Path, row: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _checkpoint(self, root: Path, step: int) -> Path:
        """``save_state`` into ``step-N``; a ``COMPLETE`` marker makes a checkpoint eligible for resume."""
        acc = self.accelerator
        path = root / f"step-{step:07d}"
        acc.wait_for_everyone()
        acc.save_state(str(path))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (path / "COMPLETE").write_text(str(step))
            for old in root.glob("step-*"):  # keep the newest two
                if old != path and int(old.name.split("-")[1]) < step - max(self.tcfg.checkpoint_every, 1):
                    shutil.rmtree(old, ignore_errors=True)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path)
        acc.wait_for_everyone()
        return path

    def _export(self, final: dict[str, float], heldout: dict[str, float]) -> Path:
        acc = self.accelerator
        denoiser = acc.unwrap_model(self.denoiser)
        digest = parameter_digest(denoiser)
        digests = acc.gather_for_metrics([digest]) if acc.num_processes > 1 else [digest]
        model_dir = self.output_dir / "model"
        if acc.is_main_process:
            if self.lora:
                from sdpo.models.lora import merge_lora, save_lora

                save_lora(denoiser, str(self.output_dir / "lora"))
                denoiser = merge_lora(copy.deepcopy(denoiser))
            from sdpo.fs import publishing

            with publishing(model_dir, marker="model_index.json") as staging:  # readers never see half a model
                self.model.save_pipeline(str(staging), denoiser=denoiser)
            summary = {
                "variant": self.variant,
                "base_model": self.base_model,
                "steps": self.state.step,
                "num_processes": acc.num_processes,
                "ranks_in_sync": len(set(digests)) == 1,
                "parameter_digest": digest,
                "data_manifest_digest": _manifest_digest(self.shards_dir),
                "final_metrics": final,
                "heldout": heldout,
                "train": self.tcfg.model_dump(mode="json"),
                "config": config_to_dict(self.cfg),
            }
            text = json.dumps(summary, indent=2, sort_keys=True)
            # beside the model, not inside it: it holds timings, and the model folder must stay reproducible
            (self.output_dir / "training_summary.json").write_text(text)
        acc.wait_for_everyone()
        return model_dir


def _manifest_digest(shards_dir: Path) -> str | None:
    path = shards_dir / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def train(cfg: Config, *, shards_dir: str | Path, base_model: str, output_dir: str | Path, variant: str | None = None,
          heldout_shards: str | Path | None = None, resume: bool = False, on_metrics: MetricsCallback | None = None,
          on_checkpoint: CheckpointCallback | None = None, stop_after: int | None = None,
          show_progress: bool = True, cache_dir: str | Path | None = None,
          heldout_cache: str | Path | None = None) -> TrainResult:
    """Train one variant and write ``output_dir/model`` (a diffusers pipeline folder), checkpoints and metrics.

    ``on_checkpoint(path)`` runs on the main process after each complete checkpoint (e.g. to mirror it to a store).
    ``cache_dir`` / ``heldout_cache``: latent caches of the train / held-out shards (``sdpo encode``).
    """
    os.makedirs(output_dir, exist_ok=True)
    trainer = Trainer(cfg, shards_dir=shards_dir, base_model=base_model, output_dir=output_dir, variant=variant,
                      heldout_shards=heldout_shards, on_metrics=on_metrics, on_checkpoint=on_checkpoint,
                      show_progress=show_progress, cache_dir=cache_dir, heldout_cache=heldout_cache)
    return trainer.run(resume=resume, stop_after=stop_after)
