"""The pipeline's steps as plain functions: the Metaflow flow and the tests call these, DVC calls the CLI.

Each function takes the typed config and explicit paths, does one thing, and returns small JSON-able results
(paths, metrics), so an orchestrator can pass them between steps or machines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from sdpo.config import Config
from sdpo.errors import ModelError

BASE_ARM = "base"


def resolve_root(path: str, project_root: Path) -> Path:
    """A configured local path, relative to the project (the folder of params.yaml) unless absolute."""
    if "://" in path:
        raise NotImplementedError(
            f"{path}: remote data roots are reached through the orchestrator's datastore; set data.root to a local "
            "folder (on cloud workers the task's local disk) and keep inputs on S3 (data.input=s3://...)"
        )
    p = Path(path)
    return p if p.is_absolute() else project_root / p


def init_tracking(cfg: Config) -> str:
    """Create the MLflow store and experiment now, so parallel steps do not race to migrate a new database."""
    import mlflow

    from sdpo.tracking.runs import configure

    uri = configure()
    mlflow.set_experiment(cfg.registry.experiment)
    return uri


# --- data ---------------------------------------------------------------------------------------------------


def ingest_plan(cfg: Config, max_parts: int = 8) -> list[dict[str, Any]]:
    """Work items for parallel ingestion: one per split for the synthetic world, file groups for real parquet."""
    if cfg.data.input is None:
        return [{"split": split, "part": 0, "source": "synthetic"} for split in ("train", "heldout")]
    from sdpo.data.pickapic import resolve_inputs

    items: list[dict[str, Any]] = []
    for split, spec in (("train", cfg.data.input), ("heldout", cfg.data.heldout_input)):
        if spec is None:
            continue
        files = [f.path for f in resolve_inputs(spec)]
        groups = min(max_parts, len(files))
        for part in range(groups):
            items.append({"split": split, "part": part, "source": files[part::groups]})
    return items


def ingest_item(cfg: Config, item: dict[str, Any], work_dir: Path) -> str:
    """Ingest one work item into ``work_dir/<split>-part-<n>``; returns that folder."""
    from sdpo.data.pickapic import ingest

    out = work_dir / f"{item['split']}-part-{item['part']:04d}"
    sources = item["source"]
    if sources == "synthetic":
        from sdpo.data.synthetic import make_pairs, write_parquet

        syn = cfg.data.synthetic
        n = syn.train_pairs if item["split"] == "train" else syn.heldout_pairs
        table = make_pairs(n, syn.seed, split=item["split"], resolution=cfg.data.resolution,
                           tie_fraction=syn.tie_fraction)
        sources = str(write_parquet(table, work_dir / f"synthetic-{item['split']}.parquet"))
    ingest(sources, out, resolution=cfg.data.resolution, shard_max_pairs=cfg.data.shard_max_pairs,
           workers=cfg.data.workers, keep_ties=cfg.data.keep_ties, min_size=cfg.data.min_image_size,
           image_format=cfg.data.image_format)
    return str(out)


def publish_split(cfg: Config, parts: list[str], out_dir: Path) -> dict[str, Any]:
    """One dataset per split: the single part moved into place, or several parts merged."""
    from sdpo.data.merge import merge_datasets
    from sdpo.data.shards import read_manifest

    if len(parts) == 1:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(parts[0], out_dir)
        return read_manifest(out_dir)
    manifest = merge_datasets(parts, out_dir, shard_max_pairs=cfg.data.shard_max_pairs)
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return manifest


def record_datasets(cfg: Config, shards: dict[str, str], *, run_name: str) -> str:
    """Log every split's manifest as an MLflow dataset input of one ingest run; returns the run id."""
    from sdpo.tracking.runs import log_data_manifest, start_run

    with start_run(cfg.registry.experiment, run_name) as run:
        for split, folder in sorted(shards.items()):
            log_data_manifest(Path(folder) / "manifest.json", name=f"{split}-shards")
    return run.info.run_id


# --- models -------------------------------------------------------------------------------------------------


def resolve_base(cfg: Config, train_shards: Path, project_root: Path) -> str:
    """The configured base model (a local folder is checked), or the toy base built/cached from the shards."""
    if cfg.model.base:
        local = Path(cfg.model.base)
        if local.exists() or cfg.model.base.startswith((".", "/")):
            if not (local / "model_index.json").is_file():
                raise ModelError(f"model.base={cfg.model.base}: not a diffusers pipeline folder (no model_index.json)")
            return str(local.resolve())
        return cfg.model.base  # a hub id: resolved where the training step runs
    from sdpo.train.pretrain import ensure_toy_base

    cache = resolve_root(cfg.model.toy.cache_dir, project_root)
    return str(ensure_toy_base(cfg, train_shards, cache_dir=cache))


def train_arm(cfg: Config, arm: str, *, shards: Path, heldout: Path | None, base: str, out_dir: Path,
              config_path: Path | None = None, overrides: list[str] | None = None,
              experiment_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one variant. Several GPUs on this machine: ``accelerate launch`` of ``sdpo train``; else in process."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 1 and config_path is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "-m", "sdpo.cli", "train", "--config", str(config_path), "--variant", arm, "--shards", str(shards),
               "--base", base, "--out", str(out_dir)]
        for item in overrides or []:
            cmd += ["--set", item]
        if heldout is not None:
            cmd += ["--heldout-shards", str(heldout)]
        subprocess.run(cmd, check=True)
        return json.loads((out_dir / "training_summary.json").read_text())

    import mlflow

    from sdpo.tracking.runs import log_config, log_data_manifest, start_run
    from sdpo.train.trainer import train

    with start_run(cfg.registry.experiment, f"train-{arm}", tags=experiment_tags) as run:
        log_config(cfg)
        mlflow.log_params({"variant": arm})
        log_data_manifest(shards / "manifest.json", name="train-shards")  # the row exists: see record_datasets
        train(cfg, shards_dir=shards, base_model=base, output_dir=out_dir, variant=arm,
              heldout_shards=heldout, on_metrics=lambda row, step: mlflow.log_metrics(row, step=step))
        summary = json.loads((out_dir / "training_summary.json").read_text())
        summary["mlflow_run_id"] = run.info.run_id
    return summary


def evaluate_arm(cfg: Config, model_dir: str, out_dir: Path, *, base: str, heldout: Path | None) -> dict[str, Any]:
    """Generate with fixed seeds and score; held-out deltas against the base when held-out shards exist."""
    from sdpo.eval.generate import evaluate, resolve_prompts

    prompts = resolve_prompts(cfg.eval.prompts)
    same_as_base = Path(model_dir).resolve() == Path(base).resolve() if Path(base).exists() else False
    use_heldout = heldout is not None and Path(base).exists() and not same_as_base
    metrics = evaluate(model_dir, prompts, out_dir, cfg.eval, base_dir=base if use_heldout else None,
                       heldout_shards=str(heldout) if use_heldout else None)
    if same_as_base and heldout is not None:  # the base against itself: the deltas are zero by definition
        metrics["heldout"] = {"winner_delta": 0.0, "loser_delta": 0.0, "n_pairs": 0}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def compare_arms(cfg: Config, eval_dirs: dict[str, str]) -> dict[str, Any]:
    """Every trained arm against the base: paired win rates with bootstrap intervals per reward."""
    from sdpo.eval.winrate import compare_eval_dirs

    return {
        arm: compare_eval_dirs(path, eval_dirs[BASE_ARM], bootstrap_samples=cfg.eval.bootstrap_samples,
                               seed=cfg.eval.seed)
        for arm, path in sorted(eval_dirs.items())
        if arm != BASE_ARM
    }


def register_and_promote(cfg: Config, *, model_dir: str, eval_dir: str, base_eval_dir: str,
                         data_manifest: Path | None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register the candidate as a new model version and apply the gated promotion policy."""
    from sdpo.tracking.registry import promote, register

    reg = cfg.registry
    version = register(model_dir, name=reg.model_name, eval_dir=eval_dir, data_manifest=data_manifest,
                       experiment=reg.experiment, config=cfg, tags=tags, dvc_lock=None)
    decision = promote(reg.model_name, version.version, candidate_eval=eval_dir, baseline_eval=base_eval_dir,
                       primary_reward=reg.primary_reward, min_win_rate_lower=reg.min_win_rate_lower,
                       guards=dict(reg.guards), bootstrap_samples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
    return {"name": reg.model_name, "version": str(version.version), "decision": decision.to_dict()}
