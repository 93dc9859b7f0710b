"""One accelerate trainer for SFT, Diffusion-DPO, DSPO and DMPO, with or without the SDPO safeguard.

The loop follows accelerate's conventions (``prepare``, ``accumulate``). What is specific here:

- the two images of a pair share one timestep and one noise tensor, and go through the denoiser in one batch;
- every random draw of a pair (prompt dropout, timestep, noise, VAE posterior sample) is a pure function of
  (seed, epoch, pair key) (:mod:`sdpo.train.noise`), whatever the batch, rank or resume point;
- with a latent cache (``train.cache``, :mod:`sdpo.train.cache`) it loads only the denoiser: no VAE, no text encoder;
- the reference is a frozen copy of the denoiser (fp32 or bf16 weights), the same network with LoRA adapters
  disabled, or, for DPO/DMPO with ``train.precompute_reference``, the errors the encode stage stored: no model;
- checkpoints are JSON + safetensors (:mod:`sdpo.train.checkpoint`; accelerate's ``save_state`` pickles are neither
  written nor read) and carry the run's identity: ``resume`` continues only the same run, exactly where it stopped
  without replaying data (on CPU the final weights equal an uninterrupted run's bit for bit);
- a non-finite loss, gradient, weight or output stops the run with the step number and names a checkpoint that
  is known good (:mod:`sdpo.train.guard`).
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

from sdpo import fs
from sdpo.config import Config, config_to_dict
from sdpo.errors import TrainingError
from sdpo.objectives import ObjectiveConfig, compute_objective
from sdpo.runtime import flushed_denormals

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
    """Everything per process besides model/optimizer/scheduler that a checkpoint must hold.

    The data cursor, the noise generator and the process's Python/NumPy/torch random states; stored as JSON and
    safetensors by :mod:`sdpo.train.checkpoint` (never pickled).
    """

    def __init__(self, loader, generator: torch.Generator) -> None:
        self.step = 0
        self.loader = loader
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        from sdpo.train.checkpoint import rng_state

        return {"step": self.step, "loader": self.loader.state_dict(), "generator": self.generator.get_state(),
                "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from sdpo.train.checkpoint import set_rng_state

        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])


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
                 heldout_cache: str | Path | None = None, checkpoint_store: str | None = None) -> None:
        """``cache_dir``: the latent cache of the train shards (then ``shards_dir`` needs only its manifest);
        ``heldout_cache``: that of the held-out shards, for the held-out probe; ``checkpoint_store``: where
        ``on_checkpoint`` mirrors the checkpoints (it may hold older ones than this run's folder), named by the
        NaN guard's advice."""
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
        self.checkpoint_store = checkpoint_store
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
        """Train to ``train.steps`` (or stop early after ``stop_after`` steps, for interruption tests).

        A fresh run refuses a folder that holds complete checkpoints; ``resume`` continues the newest one only if
        it belongs to this run (:mod:`sdpo.train.checkpoint`), and with no checkpoint starts fresh.
        """
        from sdpo.logs import progress as sdpo_progress
        from sdpo.train import checkpoint as ck
        from sdpo.train.guard import weights_finite

        self._setup()
        acc, t = self.accelerator, self.tcfg
        ckpt_root = self.output_dir / "checkpoints"
        metrics_path = self.output_dir / "metrics.jsonl"
        self.identity = ck.RunIdentity.of(self.cfg, self.variant, self.shards_dir, self.base_model)
        self.run_id, self.history = ck.new_run_id(), []
        self._checkpoints_supported = self._check_strategy(resume)
        latest = ck.latest_checkpoint(ckpt_root)
        resumed_at: int | None = None
        if resume and latest is not None:
            resumed_at = self._resume(ckpt_root / latest)
        elif latest is not None:
            raise TrainingError(f"{ckpt_root} holds checkpoints of an earlier run (newest {latest}): resume it, or "
                                "remove them to start over (`sdpo train --overwrite`)")
        elif acc.is_main_process:
            for name in ("metrics.jsonl", "heldout.jsonl"):
                (self.output_dir / name).unlink(missing_ok=True)
        acc.wait_for_everyone()
        stop_at = t.steps if stop_after is None else min(t.steps, self.state.step + stop_after)
        progress = sdpo_progress(total=t.steps, initial=self.state.step, desc=f"train {self.variant}",
                        disable=not (self.show_progress and acc.is_local_main_process))
        batches = iter(self.loader)
        trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        window: dict[str, list[torch.Tensor]] = {}
        tic, pairs_seen = time.perf_counter(), 0
        final: dict[str, float] = {}
        heldout: dict[str, float] = {}
        batch: dict | None = None
        while self.state.step < stop_at:
            step = self.state.step + 1
            for _ in range(t.grad_accum):
                batch = next(batches)
                with acc.accumulate(self.denoiser):
                    out = self._micro_step(batch)
                    if not self._everywhere(bool(torch.isfinite(out.loss))):  # from the weights of step - 1
                        raise TrainingError(self._nonfinite(f"loss is {out.loss.item()}", step, weights_of=step - 1))
                    acc.backward(out.loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = self._clip_and_check(step)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in out.metrics.items():
                    window.setdefault(k, []).append(v)
                pairs_seen += len(batch["caption"]) * acc.num_processes
            if not weights_finite(trainable):  # before anything can write or use them
                raise TrainingError(self._nonfinite("the weights after the optimizer step are not finite", step,
                                                    weights_of=step))
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
                self._checkpoint(ckpt_root, step, batch)
        progress.close()
        if self.state.step != resumed_at:  # a resumed finished run has its final checkpoint already
            self._checkpoint(ckpt_root, self.state.step, batch)
        if self.state.step < t.steps:  # stopped early on request
            return TrainResult(self.output_dir, self.output_dir / "model", self.state.step, final, heldout)
        model_dir = self._export(final, heldout)
        self._record_run()
        return TrainResult(self.output_dir, model_dir, self.state.step, final, heldout)

    def _check_strategy(self, resume: bool) -> bool:
        """Whether this launch can write and read checkpoints: they hold whole (unsharded) tensors."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
            return True
        if resume or self.tcfg.checkpoint_every:
            raise TrainingError(f"checkpoints hold whole safetensors tensors; under {kind.value} the trainer neither "
                                "writes nor resumes them yet: set train.checkpoint_every=0 and run without --resume")
        print(f"train {self.variant}: no checkpoints under {kind.value} (whole-tensor format only)")
        return False

    def _everywhere(self, ok: bool) -> bool:
        """``ok`` on every process (one tiny all-reduce with several), so all ranks stop together."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
        return float(acc.reduce(flag, reduction="sum").item()) == 0.0

    def _outputs_finite(self, batch: dict) -> bool:
        """The objective's loss and diagnostics from the current weights on ``batch``, without moving any RNG."""
        from sdpo.train.guard import outputs_finite, rng_preserved

        with torch.no_grad(), rng_preserved(self.generator):
            out = self._micro_step(batch)
        return self._everywhere(outputs_finite(out.loss, out.metrics))

    def _resume(self, path: Path) -> int:
        """Load checkpoint ``path`` if it belongs to this run; apply allowed changes (lr...); returns its step."""
        import datetime as dt

        from sdpo.train import checkpoint as ck

        acc, t = self.accelerator, self.tcfg
        state = ck.read_state(path)
        step = int(state["step"])
        saved = ck.RunIdentity.from_dict(state["identity"])
        problems = ck.identity_problems(saved, self.identity, checkpoint_step=step)
        if int(state.get("world_size", 1)) != acc.num_processes:
            problems.append(f"it was written by {state.get('world_size')} processes, this run has "
                            f"{acc.num_processes}")
        if problems:
            raise TrainingError(f"cannot resume {path}: it is another run: " + "; ".join(problems)
                                + ". Resume with the settings it was written with, or start over with --overwrite")
        ck.load_weights(path, acc.unwrap_model(self.denoiser))
        ck.load_shared(path, state, optimizer=self.optimizer, scheduler=self.scheduler, scaler=acc.scaler)
        self.state.load_state_dict(ck.read_rank(path, acc.process_index))
        if self.state.step != step:
            raise TrainingError(f"{path}: loop state is at step {self.state.step}, state.json at {step}")
        acc.step = int(state["accelerate_step"])
        self.run_id, self.history = str(state["run_id"]), list(state.get("history", []))
        changes = ck.free_changes(saved, self.identity)
        old_lr = saved.free.get("train.lr")
        if old_lr is not None and float(old_lr) != t.lr:
            ck.rescale_lr(self.optimizer, self.scheduler, t.lr / float(old_lr))
        if changes:
            self.history.append({"step": step, "changed": changes,
                                 "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
            print(f"train {self.variant}: resuming {path.name} with "
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
        if acc.is_main_process:  # rows past the checkpoint came from the interrupted attempt: they are redone
            for name in ("metrics.jsonl", "heldout.jsonl"):
                _truncate_jsonl(self.output_dir / name, step)
        return step

    def _clip_and_check(self, step: int) -> torch.Tensor:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        max_norm = self.tcfg.max_grad_norm if self.tcfg.max_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        norm = torch.as_tensor(norm)
        if not torch.isfinite(norm):  # gradients of the loss from the weights of step - 1
            raise TrainingError(self._nonfinite(f"gradient norm is {norm.item()}", step, weights_of=step - 1))
        return norm.detach()

    def _nonfinite(self, what: str, step: int, *, weights_of: int) -> str:
        """The NaN guard's message. The weights after step ``weights_of`` are bad: their checkpoint is set aside."""
        from sdpo.train import checkpoint as ck
        from sdpo.train.guard import advice

        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        bad = root / ck.checkpoint_name(weights_of)
        rejected = ""
        if acc.is_main_process and (bad / ck.COMPLETE).is_file():
            moved = ck.reject(bad, f"step {step}: {what}")
            rejected = f"; {bad.name} was set aside as {moved.name} (step {step} was computed from its weights)"
            try:
                self._notify(bad)
            except Exception as err:  # the divergence is the error to report; say that the mirror lags
                rejected += f" (mirroring that change failed: {type(err).__name__}: {err})"
        acc.wait_for_everyone()
        store = self.checkpoint_store or root  # a resume reads the store, which may hold older checkpoints
        good = [name for name in ck.complete_checkpoints(store) if name != bad.name]  # also if mirroring failed
        last_good = fs.join(store, good[-1]) if good else None
        kept = (f"the last good checkpoint is {last_good} (finite weights and outputs, and the step after it "
                "trained from it)" if last_good else "no checkpoint passed the check")
        return (f"non-finite training at step {step} (variant {self.variant!r}): {what}; {kept}{rejected}. "
                + advice(self.tcfg, good[-1] if good else None, variant=self.variant))

    def _notify(self, path: Path) -> None:
        """Tell ``on_checkpoint`` that the checkpoints under ``path.parent`` changed (mirroring)."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)

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

    def _checkpoint(self, root: Path, step: int, batch: dict | None) -> Path | None:
        """Write ``step-N`` in safe formats, renamed into place complete; older ones beyond ``keep_checkpoints`` go.

        The weights were checked finite after the optimizer step; here the model's outputs from them on the step's
        own batch must be finite too, or nothing is written. Refused when another run's checkpoints appear.
        """
        from sdpo.train import checkpoint as ck

        acc = self.accelerator
        if not self._checkpoints_supported:
            return None
        if batch is not None and not self._outputs_finite(batch):
            raise TrainingError(self._nonfinite("the model's outputs from the weights after this step are not "
                                                "finite", step, weights_of=step))
        name = ck.checkpoint_name(step)
        path, staging = root / name, root / f".{name}.tmp"
        foreign = ck.foreign_runs(root, self.run_id, ck.complete_checkpoints(root))
        if foreign:
            raise TrainingError(f"{root}: checkpoints of another run appeared ({', '.join(foreign)}): is a second "
                                "trainer writing this folder? This run stops and leaves them as they are")
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        ck.write_rank(staging, acc.process_index, self.state.state_dict())
        if acc.is_main_process:
            meta = ck.CheckpointMeta(run_id=self.run_id, step=step, identity=self.identity.to_dict(),
                                     config=config_to_dict(self.cfg), world_size=acc.num_processes,
                                     history=self.history)
            ck.write_shared(staging, meta, denoiser=acc.unwrap_model(self.denoiser), optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=acc.scaler, accelerate_step=acc.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (staging / ck.COMPLETE).write_text(str(step))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(staging, path)
            for old in ck.expired_checkpoints(root, keep=self.tcfg.keep_checkpoints):
                shutil.rmtree(root / old, ignore_errors=True)
            self._notify(path)
        acc.wait_for_everyone()
        return path

    def _record_run(self) -> None:
        """Add the run's identity and resume history to ``training_summary.json`` (the config in force is there)."""
        if not self.accelerator.is_main_process:
            return
        path = self.output_dir / "training_summary.json"
        summary = json.loads(path.read_text())
        summary.update(run_id=self.run_id, identity={k: v for k, v in self.identity.to_dict().items()
                                                     if k in ("digest", "data", "base")},
                       resumes=self.history)
        path.write_text(json.dumps(summary, indent=2, sort_keys=True))

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


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines metrics file up to ``step``."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def _manifest_digest(shards_dir: Path) -> str | None:
    path = shards_dir / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def train(cfg: Config, *, shards_dir: str | Path, base_model: str, output_dir: str | Path, variant: str | None = None,
          heldout_shards: str | Path | None = None, resume: bool = False, on_metrics: MetricsCallback | None = None,
          on_checkpoint: CheckpointCallback | None = None, stop_after: int | None = None,
          show_progress: bool = True, cache_dir: str | Path | None = None,
          heldout_cache: str | Path | None = None, checkpoint_store: str | None = None) -> TrainResult:
    """Train one variant and write ``output_dir/model`` (a diffusers pipeline folder), checkpoints and metrics.

    ``on_checkpoint(path)`` runs on the main process after each complete checkpoint (e.g. to mirror it to a store).
    ``cache_dir`` / ``heldout_cache``: latent caches of the train / held-out shards (``sdpo encode``).
    ``checkpoint_store``: where ``on_checkpoint`` keeps the checkpoints, if elsewhere.
    """
    os.makedirs(output_dir, exist_ok=True)
    trainer = Trainer(cfg, shards_dir=shards_dir, base_model=base_model, output_dir=output_dir, variant=variant,
                      heldout_shards=heldout_shards, on_metrics=on_metrics, on_checkpoint=on_checkpoint,
                      show_progress=show_progress, cache_dir=cache_dir, heldout_cache=heldout_cache,
                      checkpoint_store=checkpoint_store)
    with flushed_denormals():  # a saturated DPO loss otherwise makes every step 2-3x slower on CPU
        return trainer.run(resume=resume, stop_after=stop_after)
