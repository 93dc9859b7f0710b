"""The pipeline's stages, one function each: the flow's steps, the ``sdpo`` commands and ``dvc.yaml`` call these.

    synth -> ingest -> base -> [encode(split)] -> train(arm) -> evaluate(arm) -> compare(arm) -> register(arm)
          -> promote(arm)
    ingest -> rewards -> evaluate(arm)   (rewards: the embedded preference reward, trained on the train pairs)

(``encode`` runs when ``train.cache`` is on: the latent cache of each split, and with ``train.precompute_reference``
the reference errors every arm shares.)

Every stage is a function of a :class:`StageContext` (the typed config and the run layout) and a few names (a
split, an arm). It reads its inputs from the layout's root (a local folder or an object store), works in a local
scratch folder, publishes its outputs back to the root with the marker file last, owns its MLflow run, and returns
a small JSON-able result (URIs and metrics) that an orchestrator can pass to the next step on another machine.
A stage that writes a folder holds that folder's writer lock (:mod:`sdpo.locks`): a second writer is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo import fs
from sdpo.config import Config, ConfigError, config_to_dict, load_config
from sdpo.errors import DataError, ModelError, TrainingError
from sdpo.layout import BASE_ARM, EVAL_SETS, SPLITS, RunLayout
from sdpo.locks import writes

MANIFEST = "manifest.json"
MODEL_MARKER = "model_index.json"
EVAL_MARKER = "metrics.json"
FAULT_ENV = "SDPO_INJECT_FAULT"  # testing hook: "train-after-checkpoint" fails a first attempt after a checkpoint


@dataclass
class StageContext:
    """What every stage needs: the validated config, where the run lives, and how to file its MLflow runs."""

    cfg: Config
    layout: RunLayout
    project_dir: Path = field(default_factory=Path.cwd)
    source: str = "params.yaml"
    parent_run_id: str | None = None  # the flow run's MLflow parent run
    tags: dict[str, str] = field(default_factory=dict)  # added to every MLflow run (e.g. metaflow.run_id)
    attempt: int = 0  # retry number of the orchestrator's task (0 = first try)

    @classmethod
    def load(cls, config_path: str | Path | None, overrides: list[str] | None = None) -> StageContext:
        """From a parameter file and ``--set`` overrides; a relative ``data.root`` is relative to the file."""
        cfg = load_config(config_path, overrides)
        project_dir = Path(config_path).resolve().parent if config_path is not None else Path.cwd()
        return cls.from_config(cfg, project_dir, source=str(config_path or "<defaults>"))

    @classmethod
    def from_config(cls, cfg: Config, project_dir: str | Path, **kwargs: Any) -> StageContext:
        project_dir = Path(project_dir)
        return cls(cfg=cfg, layout=RunLayout.resolve(cfg.data.root, project_dir), project_dir=project_dir, **kwargs)


@contextlib.contextmanager
def _mlflow_run(ctx: StageContext, name: str, **tags: str) -> Iterator[Any]:
    from sdpo.tracking.runs import start_run

    with start_run(ctx.cfg.registry.experiment, name, tags={**ctx.tags, **tags},
                   parent_run_id=ctx.parent_run_id) as run:
        yield run


# --- data ---------------------------------------------------------------------------------------------------


def synth(ctx: StageContext, split: str) -> dict[str, Any]:
    """Write the synthetic world's ``split`` as Pick-a-Pic v2 parquet at ``layout.raw(split)``."""
    from sdpo.data.synthetic import make_pairs, write_parquet

    syn, data = ctx.cfg.data.synthetic, ctx.cfg.data
    pairs = syn.train_pairs if split == "train" else syn.heldout_pairs
    table = make_pairs(pairs, syn.seed, split=split, resolution=data.resolution, tie_fraction=syn.tie_fraction)
    uri = ctx.layout.raw(split)
    with fs.scratch() as tmp:
        fs.write_bytes(uri, write_parquet(table, tmp / "pairs.parquet").read_bytes())
    return {"uri": uri, "pairs": table.num_rows}


def split_inputs(ctx: StageContext, split: str) -> list[str] | None:
    """The parquet inputs of ``split``: the configured ones, the synthetic world's file, or None (no such split)."""
    data = ctx.cfg.data
    if data.input is None:
        return [ctx.layout.raw(split)]
    spec = data.input if split == "train" else data.heldout_input
    return [spec] if spec else None


def ingest_plan(ctx: StageContext, max_parts: int = 8) -> list[dict[str, Any]]:
    """Work items for parallel ingestion: one per split for the synthetic world, groups of files for real parquet."""
    from sdpo.data.pickapic import resolve_inputs

    items: list[dict[str, Any]] = []
    for split in SPLITS:
        specs = split_inputs(ctx, split)
        if specs is None:
            continue
        if ctx.cfg.data.input is None:
            items.append({"split": split, "part": 0, "sources": specs, "synthetic": True})
            continue
        files = [f.path for f in resolve_inputs(specs)]
        groups = min(max_parts, len(files))
        items += [{"split": split, "part": part, "sources": files[part::groups], "synthetic": False}
                  for part in range(groups)]
    return items


@writes("ingest", lambda ctx, item, *_, **__: ctx.layout.ingest_part(item["split"], item["part"]))
def ingest_part(ctx: StageContext, item: dict[str, Any]) -> str:
    """Ingest one work item of :func:`ingest_plan` into ``layout.ingest_part``; returns its URI."""
    from sdpo.data.pickapic import ingest as ingest_parquet

    data = ctx.cfg.data
    uri = ctx.layout.ingest_part(item["split"], item["part"])
    with fs.publishing(uri, marker=MANIFEST) as out:
        ingest_parquet(item["sources"], out, resolution=data.resolution, shard_max_pairs=data.shard_max_pairs,
                       workers=data.workers, keep_ties=data.keep_ties, min_size=data.min_image_size,
                       image_format=data.image_format)
    return uri


@writes("ingest", lambda ctx, split, *_, **__: ctx.layout.shards(split))
def publish_split(ctx: StageContext, split: str, parts: list[str]) -> dict[str, Any]:
    """One dataset per split at ``layout.shards(split)``: a single part as it is, several merged; parts removed.

    Owns the MLflow run that records the dataset (name: the split), so later runs reuse its row.
    """
    from sdpo.data.merge import merge_datasets
    from sdpo.data.shards import read_manifest
    from sdpo.tracking.runs import log_data_manifest

    target = ctx.layout.shards(split)
    with contextlib.ExitStack() as stack:
        local = [stack.enter_context(fs.local_copy(part, marker=MANIFEST)) for part in parts]
        if len(local) == 1:
            read_manifest(local[0])
            fs.publish_dir(local[0], target, marker=MANIFEST)
        else:
            with fs.publishing(target, marker=MANIFEST) as out:
                merge_datasets(local, out, shard_max_pairs=ctx.cfg.data.shard_max_pairs)
    for part in parts:
        fs.remove(part)
    with fs.local_copy(target, marker=MANIFEST) as dataset, _mlflow_run(ctx, f"ingest-{split}", split=split):
        manifest = read_manifest(dataset)
        log_data_manifest(dataset / MANIFEST, name=split)
    return {"uri": target, **{k: manifest[k] for k in ("rows_read", "pairs_written", "skipped")}}


@writes("ingest", lambda ctx, split, *_, **__: ctx.layout.shards(split))
def ingest(ctx: StageContext, split: str) -> dict[str, Any]:
    """Validate the split's parquet into WebDataset shards at ``layout.shards(split)`` (one process)."""
    sources = split_inputs(ctx, split)
    if sources is None:
        raise ConfigError(f"{ctx.source}: data.heldout_input is not set, so there is no {split!r} split to ingest")
    part = ingest_part(ctx, {"split": split, "part": 0, "sources": sources})
    return publish_split(ctx, split, [part])


# --- models -------------------------------------------------------------------------------------------------


def _is_hub_id(spec: str) -> bool:
    return not fs.is_remote(spec) and not Path(spec).expanduser().exists() and not spec.startswith((".", "/", "~"))


def _local_spec(spec: str, project_dir: Path) -> str:
    """A configured local path made absolute against the project; URIs and hub ids unchanged."""
    if fs.is_remote(spec) or _is_hub_id(spec):
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else (project_dir / path).resolve())


def _toy_base(ctx: StageContext) -> str:
    """The toy base for the train shards: reused from the content-keyed cache, else trained and published there."""
    from sdpo.train.pretrain import data_content_digest, ensure_toy_base, toy_base_key

    toy = ctx.cfg.model.toy
    cache = _local_spec(toy.cache_dir, ctx.project_dir) if toy.cache_dir else ctx.layout.toy_base_cache()
    with fs.local_copy(ctx.layout.shards("train"), marker=MANIFEST) as shards:
        key = toy_base_key(toy, ctx.cfg.data.resolution, data_content_digest(shards))
        target = fs.join(cache, key)
        if fs.exists(fs.join(target, MODEL_MARKER)):
            print(f"toy base: cached at {target}")
            return target
        with fs.scratch("sdpo-toy-") as tmp:
            # trained VAEs are shared between recipes in a local cache only (an object-store root retrains them)
            vae_cache = None if fs.is_remote(cache) else Path(cache) / "vae"
            built = ensure_toy_base(ctx.cfg, shards, cache_dir=tmp, vae_cache_dir=vae_cache)
            fs.publish_dir(built, target, marker=MODEL_MARKER)
    return target


@writes("base", lambda ctx, *_, **__: ctx.layout.base_dir())
def base(ctx: StageContext) -> dict[str, Any]:
    """The base model of every arm: ``model.base`` checked, or the toy base built; recorded in ``base.json``.

    A built base is also published at ``layout.model("base")`` (the DVC output); a configured one stays where it
    is. Returns ``{"uri", "source", "digest"}``; :func:`base_uri` reads it back.
    """
    spec = ctx.cfg.model.base
    if spec:
        uri = _local_spec(spec, ctx.project_dir)
        if not _is_hub_id(uri) and not fs.exists(fs.join(uri, MODEL_MARKER)):
            raise ModelError(f"model.base={spec}: not a diffusers pipeline folder (no {MODEL_MARKER})")
        digest = None if _is_hub_id(uri) else fs.folder_digest(uri)
        record = {"uri": uri, "source": "configured", "digest": digest, "revision": ctx.cfg.model.revision}
    else:
        cached = _toy_base(ctx)
        with fs.local_copy(cached, marker=MODEL_MARKER) as local:
            fs.publish_dir(local, ctx.layout.model(BASE_ARM), marker=MODEL_MARKER)
        uri = ctx.layout.model(BASE_ARM)
        record = {"uri": uri, "source": "toy", "cache": cached, "digest": fs.folder_digest(uri)}
    fs.write_json(ctx.layout.base_record(), record)
    return record


def base_uri(ctx: StageContext) -> str:
    """Where the base model is, as recorded by :func:`base`."""
    record = ctx.layout.base_record()
    if not fs.exists(record):
        raise ModelError(f"{record}: no base model recorded yet; run `sdpo base` (the base stage) first")
    return fs.read_json(record)["uri"]


# --- rewards the pipeline trains ----------------------------------------------------------------------------

PREFERENCE_MARKER = "config.json"


def trained_rewards(ctx: StageContext) -> list[str]:
    """The rewards of ``eval.rewards`` that the rewards stage trains (no weights configured for them)."""
    return [name for name in ctx.cfg.eval.rewards if ctx.cfg.trains_reward(name)]


@writes("rewards", lambda ctx, *_, **__: ctx.layout.reward_model("preference"))
def preference_reward(ctx: StageContext) -> dict[str, Any]:
    """Train the embedded ``preference`` reward on the train shards only; publish ``layout.reward_model``.

    The toy counterpart of PickScore: a small image-text scorer fitted Bradley-Terry to which image won, never to
    the judge that labelled the pairs (:mod:`sdpo.eval.rewards.preference`). Logged as the MLflow run
    ``reward-preference`` with the digest of the pairs it saw. Returns ``{"uri", "data_digest", "pairs",
    "train_accuracy", "run_id"}``.
    """
    from sdpo.eval.rewards.preference import read_preference_config, train_preference_model

    pm, target = ctx.cfg.eval.preference_model, ctx.layout.reward_model("preference")
    with fs.local_copy(ctx.layout.shards("train"), marker=MANIFEST) as shards, fs.scratch("sdpo-reward-") as tmp:
        folder = train_preference_model(shards, tmp / "preference", seed=pm.seed, steps=pm.steps,
                                        batch_size=pm.batch_size, lr=pm.lr)
        training = read_preference_config(folder).training
        with _mlflow_run(ctx, "reward-preference", reward="preference") as run:
            import mlflow

            mlflow.log_params({f"preference.{k}": v for k, v in pm.model_dump().items()})
            mlflow.log_metrics({"train_accuracy": training["train_accuracy"], "final_loss": training["final_loss"]})
            mlflow.set_tag("data_digest", training["data_digest"])
            mlflow.log_artifacts(str(folder), artifact_path="preference")
        fs.publish_dir(folder, target, marker=PREFERENCE_MARKER)
    return {"uri": target, "data_digest": training["data_digest"], "pairs": training["pairs"],
            "train_accuracy": training["train_accuracy"], "run_id": run.info.run_id}


def rewards(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Every reward the pipeline trains for this config (see :func:`trained_rewards`), by name."""
    trainers = {"preference": preference_reward}
    return {name: trainers[name](ctx) for name in trained_rewards(ctx)}


def reward_paths(ctx: StageContext) -> dict[str, str]:
    """``eval.reward_paths`` plus the published location of every reward the pipeline trains."""
    paths = dict(ctx.cfg.eval.reward_paths)
    for name in trained_rewards(ctx):
        uri = ctx.layout.reward_model(name)
        if not fs.exists(fs.join(uri, PREFERENCE_MARKER)):
            raise ModelError(f"{uri}: reward {name!r} is not trained yet; run `sdpo rewards` (the rewards stage) "
                             "first, or set eval.reward_paths." + name)
        paths[name] = uri
    return paths


def _scoring_config(ctx: StageContext) -> Config:
    """The config with :func:`reward_paths` as ``eval.reward_paths``: what evaluation and the gate score with."""
    eval_cfg = ctx.cfg.eval.model_copy(update={"reward_paths": reward_paths(ctx)})
    return ctx.cfg.model_copy(update={"eval": eval_cfg})


@contextlib.contextmanager
def _local_model(uri: str) -> Iterator[str]:
    """A local folder (or hub id) for a model URI."""
    if _is_hub_id(uri):
        yield uri
        return
    with fs.local_copy(uri, marker=MODEL_MARKER) as local:
        yield str(local)


@writes("encode", lambda ctx, split, *_, **__: ctx.layout.cache(split))
def encode(ctx: StageContext, split: str, *, base: str | None = None) -> dict[str, Any]:
    """The latent cache of ``layout.shards(split)`` at ``layout.cache(split)`` (``train.cache``).

    Runs the base model's VAE and text encoders once over the split (both flips with ``train.random_flip``), and for
    the train split with ``train.precompute_reference`` the reference errors of every (pair, epoch) draw. The
    manifest (model folder, component digests, dtype, resolution) is published last. A published cache made from
    the same shards, base encoders and settings is reused as it is (:func:`sdpo.train.encode.stale_reason`), so a
    second run of the flow does not encode the dataset again. Returns a summary.
    """
    from sdpo.train.encode import add_reference_errors, encode_dataset, stale_reason

    t, layout = ctx.cfg.train, ctx.layout
    if not t.cache:
        raise ConfigError(f"{ctx.source}: train.cache is off, so there is nothing to encode (set train.cache=true)")
    base_model = base or base_uri(ctx)
    target = layout.cache(split)
    with_reference = split == "train" and t.precompute_reference
    published_manifest = fs.join(target, MANIFEST)
    published = fs.read_json(published_manifest) if fs.exists(published_manifest) else None
    source_digest = fs.file_sha256(fs.require_published(layout.shards(split), MANIFEST))
    with _local_model(base_model) as local_base:
        stale = "there is none yet" if published is None else stale_reason(
            published, model_dir=local_base, source_digest=source_digest, tcfg=t, with_reference=with_reference)
        if stale is None:  # re-encoding a large dataset costs hours: a cache of the same inputs is reused
            print(f"sdpo encode: {target} is up to date (same shards, base encoders and settings): reused")
            manifest = published
        else:
            print(f"sdpo encode: writing {target} ({stale})")
            with fs.local_copy(layout.shards(split), marker=MANIFEST) as shards, \
                    fs.publishing(target, marker=MANIFEST) as out:
                import torch

                from sdpo.models import load_model

                device = "cuda" if torch.cuda.is_available() else "cpu"
                model = load_model(local_base, ctx.cfg.model.family if ctx.cfg.model.base else None,
                                   revision=ctx.cfg.model.revision, device=device)
                model.freeze_all_but_denoiser()
                manifest = encode_dataset(model, shards, out, t, model_uri=base_model,
                                          shard_max_pairs=ctx.cfg.data.shard_max_pairs, source_uri=layout.shards(split))
                if with_reference:
                    manifest = add_reference_errors(model, out, t)
    reference = manifest.get("reference")
    return {"uri": target, "pairs": manifest["pairs_written"], "dtype": manifest["cache"]["dtype"],
            "flips": manifest["cache"]["flips"], "reference_epochs": reference["epochs"] if reference else 0}


def cached_splits(ctx: StageContext) -> list[str]:
    """The splits training reads through the latent cache: train, and heldout when its deltas are tracked."""
    return ["train", "heldout"] if ctx.cfg.train.heldout_every and _optional_heldout(ctx) else ["train"]


def _optional_heldout(ctx: StageContext) -> str | None:
    uri = ctx.layout.shards("heldout")
    return uri if fs.exists(fs.join(uri, MANIFEST)) else None


_TRAINING_FILES = ("metrics.jsonl", "heldout.jsonl", "training_summary.json", "train_curve.json",
                   "heldout_curve.json")


def _write_curves(work: Path) -> None:
    """DVC plots read JSON arrays, not JSON lines: the curves beside the model, as arrays."""
    import json

    for src, dst in (("metrics.jsonl", "train_curve.json"), ("heldout.jsonl", "heldout_curve.json")):
        rows = fs.read_jsonl(work / src)
        (work / dst).write_text(json.dumps(rows, indent=1) + "\n")


def _prepare_train_dir(ctx: StageContext, arm: str, work: Path, *, shards: Path, base_model: str, resume: bool,
                       overwrite: bool) -> str | None:
    """Make the arm's output folder ready; returns the checkpoint resumed from (None for a fresh run).

    A fresh run refuses an earlier run's checkpoints unless ``overwrite``. A resume refuses, before anything is
    staged or logged, a checkpoint of another run (the trainer checks again when it loads it).
    """
    from sdpo.train import checkpoint as ck

    layout = ctx.layout
    latest = ck.latest_checkpoint(layout.checkpoints(arm))
    if latest is not None and not resume and not overwrite:
        raise TrainingError(f"{layout.train_dir(arm)} holds checkpoints of an earlier run (newest {latest}); pass "
                            "--resume to continue it or --overwrite to start over")
    if not resume:
        for name in ("model", "checkpoints", "lora", *_TRAINING_FILES):
            fs.remove(fs.join(layout.train_dir(arm), name))
        return None
    if latest is None:
        return None
    uri = fs.join(layout.checkpoints(arm), latest)
    with fs.scratch("sdpo-ckpt-") as tmp:
        state_dir = tmp if layout.remote else Path(uri)
        if layout.remote:
            fs.download(fs.join(uri, ck.STATE), tmp / ck.STATE)
        state = ck.read_state(state_dir)
    saved = ck.RunIdentity.from_dict(state["identity"])
    problems = ck.identity_problems(saved, ck.RunIdentity.of(ctx.cfg, arm, shards, base_model),
                                    checkpoint_step=int(state["step"]))
    if problems:
        raise TrainingError(f"cannot resume {uri}: it is another run: " + "; ".join(problems)
                            + ". Resume with the settings it was written with, or start over with --overwrite")
    # Remote: only the newest, the one resumed from. The older ones stay in the store (the mirror removes only what
    # the keep rule expires or the NaN guard sets aside), and the guard names the last good one there.
    if layout.remote:
        fs.download(uri, work / "checkpoints" / latest)
    return latest


@writes("train", lambda ctx, arm, *_, **__: ctx.layout.train_dir(arm))
def train(ctx: StageContext, arm: str, *, base: str | None = None, resume: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Train variant ``arm`` of ``train.variants`` from the base on the train shards into ``layout.train_dir(arm)``.

    Checkpoints go under the root as they are written, so ``resume`` (or a retried task on a fresh machine)
    continues from the newest complete one. Several GPUs on this machine: the work runs under ``accelerate
    launch`` (see :mod:`sdpo.train.job`). Returns the training summary.
    """
    from sdpo.train.job import TrainJob, launch, run_job, should_launch

    layout = ctx.layout
    ctx.cfg.train.for_variant(arm)  # an unknown arm fails here, before anything is staged
    base_model = base or base_uri(ctx)
    with contextlib.ExitStack() as stack:
        heldout_uri = _optional_heldout(ctx) if ctx.cfg.train.heldout_every else None
        caches = _training_caches(ctx, stack, heldout_uri)
        stage = _manifest_only if caches.get("cache") else fs.local_copy  # a cache makes the images unneeded
        shards = stack.enter_context(stage(layout.shards("train"), marker=MANIFEST))
        heldout = stack.enter_context(stage(heldout_uri, marker=MANIFEST)) if heldout_uri else None
        local_base = stack.enter_context(_local_model(base_model))
        work = stack.enter_context(fs.scratch("sdpo-train-")) if layout.remote else Path(layout.train_dir(arm))
        work.mkdir(parents=True, exist_ok=True)
        resumed_from = _prepare_train_dir(ctx, arm, work, shards=shards, base_model=str(local_base), resume=resume,
                                          overwrite=overwrite)
        run = stack.enter_context(_mlflow_run(ctx, f"train-{arm}", variant=arm))
        job = TrainJob(config=config_to_dict(ctx.cfg), arm=arm, shards=str(shards),
                       heldout=str(heldout) if heldout else None, base=str(local_base), work_dir=str(work),
                       resume=resumed_from is not None, checkpoint_uri=layout.checkpoints(arm) if layout.remote
                       else None, mlflow_run_id=run.info.run_id, fault=ctx.attempt == 0
                       and "train-after-checkpoint" in os.environ.get(FAULT_ENV, "").split(","), **caches)
        _log_training_inputs(ctx, arm, shards)
        summary = launch(job, ctx.cfg.train) if should_launch(ctx.cfg.train) else run_job(job)
        _record_mlflow_run(work / "training_summary.json", run.info.run_id)
        _write_curves(work)
        if layout.remote:
            fs.publish_dir(work / "model", layout.model(arm), marker=MODEL_MARKER)
            for name in _TRAINING_FILES:
                if (work / name).is_file():
                    fs.write_bytes(layout.training_file(arm, name), (work / name).read_bytes())
    summary.update(base_model=base_model, model=layout.model(arm), resumed_from=resumed_from,
                   mlflow_run_id=run.info.run_id)
    return summary


def _record_mlflow_run(summary_path: Path, run_id: str) -> None:
    """Name the training's MLflow run in its summary: later evaluations of the arm log their rewards into it."""
    fs.write_json(str(summary_path), {**fs.read_json(str(summary_path)), "mlflow_run_id": run_id})


def _log_rewards_at_step(ctx: StageContext, arm: str, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log an evaluation's reward means into the arm's training run at ``step`` (default: the trained model's last
    step) as ``eval.<reward>`` for the headline prompts and ``eval.<prompt set>.<reward>`` for the others, so that
    MLflow charts the rewards over the steps. An arm whose summary names no run is left as it is."""
    from mlflow.exceptions import MlflowException

    from sdpo.tracking.runs import log_metrics_at

    summary_uri = ctx.layout.training_file(arm, "training_summary.json")
    summary = fs.read_json(summary_uri) if fs.exists(summary_uri) else {}
    if not summary.get("mlflow_run_id"):
        return
    means = {f"eval.{name}": entry["mean"] for name, entry in metrics.get("rewards", {}).items()}
    for set_name, entry in metrics.get("prompt_sets", {}).items():
        means.update({f"eval.{set_name}.{name}": stats["mean"] for name, stats in entry["rewards"].items()})
    try:
        log_metrics_at(summary["mlflow_run_id"], means, summary["steps"] if step is None else step)
    except MlflowException as err:  # trained against another tracking store: the evaluation itself stands
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        print(f"{summary_uri}: its MLflow run {summary['mlflow_run_id']} is not in this tracking store; the rewards "
              "were not added to it")


def _training_caches(ctx: StageContext, stack: contextlib.ExitStack, heldout_uri: str | None) -> dict[str, str]:
    """Local copies of the latent caches a run uses (``train.cache``): ``{"cache", "heldout_cache"}``."""
    if not ctx.cfg.train.cache:
        return {}
    layout = ctx.layout
    if not fs.exists(fs.join(layout.cache("train"), MANIFEST)):
        raise TrainingError(f"{layout.cache('train')}: no latent cache; train.cache is on, run `sdpo encode "
                            "--split train` (the encode stage) first")
    found = {"cache": str(stack.enter_context(fs.local_copy(layout.cache("train"), marker=MANIFEST)))}
    if heldout_uri and fs.exists(fs.join(layout.cache("heldout"), MANIFEST)):
        found["heldout_cache"] = str(stack.enter_context(fs.local_copy(layout.cache("heldout"), marker=MANIFEST)))
    return found


@contextlib.contextmanager
def _manifest_only(uri: str, *, marker: str) -> Iterator[Path]:
    """A local folder holding only the dataset's manifest (a local dataset as it is): what cached training reads."""
    if not fs.is_remote(uri):
        with fs.local_copy(uri, marker=marker) as local:
            yield local
        return
    with fs.scratch("sdpo-manifest-") as tmp:
        folder = tmp / Path(uri.rstrip("/")).name
        fs.download(fs.join(uri, marker), folder / marker)
        yield folder


def _log_training_inputs(ctx: StageContext, arm: str, shards: Path) -> None:
    import mlflow

    from sdpo.tracking.runs import log_config, log_data_manifest

    log_config(ctx.cfg)
    mlflow.log_params({"variant": arm})
    log_data_manifest(shards / MANIFEST, name="train")


# --- evaluation and the registry ----------------------------------------------------------------------------


def arm_model(ctx: StageContext, arm: str) -> str:
    """The model URI of an arm: the base for ``base``, else the arm's trained model."""
    return base_uri(ctx) if arm == BASE_ARM else ctx.layout.model(arm)


@writes("evaluate", lambda ctx, arm, *_, **__: ctx.layout.evals(arm))
def evaluate(ctx: StageContext, arm: str, *, model: str | None = None, base: str | None = None) -> dict[str, Any]:
    """Sample the arm's model on the evaluation prompts with fixed seeds, score it, publish ``layout.evals(arm)``.

    With held-out shards the held-out winner/loser error deltas against the base are added (zero by definition
    for the base itself). ``base`` is that reference (default: the recorded base). The evaluation is written to a
    scratch folder, logged from there into the MLflow run ``evaluate-<arm>`` (the records promotion decides from:
    see :func:`sdpo.tracking.runs.log_eval_dir`), then published. Returns the metrics and ``evaluation_run_id``.
    """
    model_uri = model or arm_model(ctx, arm)
    heldout_uri = _optional_heldout(ctx)
    base_model = base or (base_uri(ctx) if heldout_uri or fs.exists(ctx.layout.base_record()) else None)
    is_base = model_uri == base_model
    with contextlib.ExitStack() as stack:
        local_model = stack.enter_context(_local_model(model_uri))
        deltas = heldout_uri is not None and not is_base
        local_base = stack.enter_context(_local_model(base_model)) if deltas else None
        heldout = stack.enter_context(fs.local_copy(heldout_uri, marker=MANIFEST)) if deltas else None
        extra = {"heldout": {"winner_delta": 0.0, "loser_delta": 0.0, "n_pairs": 0}} if heldout_uri and is_base \
            else None
        scratch = stack.enter_context(fs.scratch("sdpo-eval-"))
        work = scratch / "eval"
        metrics = _evaluate_prompt_sets(ctx, local_model, scratch, model_uri=model_uri, base_dir=local_base,
                                        heldout_shards=heldout, extra_metrics=extra)
        if not metrics:
            return {}  # not the main process of a multi-process evaluation: the main one logs and publishes
        reference = _heldout_reference(metrics, model_uri, base_model, local_base) if heldout_uri else None
        run_id = _log_evaluation(ctx, arm, work, metrics, reference, model_uri, heldout, heldout_uri)
        fs.publish_dir(work, ctx.layout.evals(arm), marker=EVAL_MARKER)
    if model is None and not is_base:  # the arm's own final model: the last point of its rewards over the steps
        _log_rewards_at_step(ctx, arm, metrics)
    return {**metrics, "evaluation_run_id": run_id}


def _evaluate_prompt_sets(ctx: StageContext, model_dir: str, scratch: Path, *, model_uri: str,
                          extra_metrics: dict[str, Any] | None = None, **heldout: Any) -> dict[str, Any]:
    """Evaluate ``model_dir`` on every further prompt set, then on the headline prompts into ``scratch/eval``
    (``heldout``: the base folder and held-out shards of the held-out deltas), with the sets inside it as
    ``sets/<name>/``. Returns the headline metrics (empty on a process that is not the main one)."""
    from sdpo.eval.generate import evaluate as evaluate_model
    from sdpo.eval.generate import resolve_prompts

    work, scoring = scratch / "eval", _scoring_config(ctx).eval
    set_metrics = {}
    for name in scoring.prompt_sets:  # each a whole evaluation folder, moved under work/sets/ below
        set_cfg = scoring.for_prompt_set(name)
        result = evaluate_model(model_dir, resolve_prompts(set_cfg.prompts), scratch / EVAL_SETS / name, set_cfg,
                                model_uri=model_uri)
        set_metrics[name] = {"prompts": set_cfg.prompts, "seeds_per_prompt": set_cfg.seeds_per_prompt,
                             "rewards": result.get("rewards", {})}
    extra = {**(extra_metrics or {}), "prompts": ctx.cfg.eval.prompts, "prompt_sets": set_metrics}
    metrics = evaluate_model(model_dir, resolve_prompts(ctx.cfg.eval.prompts), work, scoring, extra_metrics=extra,
                             model_uri=model_uri, **heldout)
    if not metrics:
        return {}
    (scratch / EVAL_SETS).mkdir(exist_ok=True)
    (scratch / EVAL_SETS).rename(work / EVAL_SETS)
    # also when there are none: the folder is a DVC output, and DVC needs it to hold a file
    fs.write_json(str(work / EVAL_SETS / "index.json"),
                  {name: {k: v for k, v in entry.items() if k != "rewards"} for name, entry in set_metrics.items()})
    return metrics


@writes("evaluate", lambda ctx, arm, step, **__: ctx.layout.checkpoint_eval(arm, step))
def evaluate_checkpoint(ctx: StageContext, arm: str, step: int) -> dict[str, Any]:
    """Score the arm's kept training checkpoint at ``step`` as :func:`evaluate` scores a model, on the same prompt
    sets and sampling seeds; publish ``layout.checkpoint_eval(arm, step)``. Returns its metrics.

    Rewards only: the held-out error deltas over the steps are the trainer's own probes (``heldout.jsonl``). The
    reward means are logged into the arm's training run at ``step`` (no evaluation run of their own: ``sdpo
    experiment`` tabulates the evaluations); the model is exported to a scratch folder and deleted.
    """
    from sdpo.train.checkpoint import COMPLETE, checkpoint_name, export_model

    uri = fs.join(ctx.layout.checkpoints(arm), checkpoint_name(step))
    with contextlib.ExitStack() as stack:
        checkpoint = stack.enter_context(fs.local_copy(uri, marker=COMPLETE))
        local_base = stack.enter_context(_local_model(base_uri(ctx)))
        scratch = stack.enter_context(fs.scratch("sdpo-eval-step-"))
        export_model(Path(checkpoint), local_base, scratch / "model")
        metrics = _evaluate_prompt_sets(ctx, str(scratch / "model"), scratch, model_uri=uri,
                                        extra_metrics={"step": step})
        if metrics:
            fs.publish_dir(scratch / "eval", ctx.layout.checkpoint_eval(arm, step), marker=EVAL_MARKER)
    if metrics:
        _log_rewards_at_step(ctx, arm, metrics, step)
    return metrics


def _heldout_reference(metrics: dict[str, Any], model_uri: str, base_model: str, local_base: Path | str | None):
    """The model the held-out deltas are against: the base folder's digest, or the model itself for the base."""
    from sdpo.tracking.runs import Reference

    if local_base is None:
        return Reference(digest=metrics["model_digest"], uri=model_uri)
    return Reference(digest=fs.folder_digest(local_base), uri=base_model)


def _log_evaluation(ctx: StageContext, arm: str, work: Path, metrics: dict[str, Any], reference: Any,
                    model_uri: str, heldout: Path | None, heldout_uri: str | None) -> str:
    """The ``evaluate-<arm>`` run: the evaluation's records (from the scratch folder) and the held-out dataset."""
    from sdpo.tracking.runs import log_data_manifest, log_eval_dir

    with _mlflow_run(ctx, f"evaluate-{arm}", variant=arm) as run:
        log_eval_dir(work, metrics=metrics, reference=reference, model_uri=model_uri)
        if heldout is not None:
            log_data_manifest(heldout / MANIFEST, name="heldout", context="evaluation", source=heldout_uri)
    return run.info.run_id


def compare(ctx: StageContext, arm: str, baseline: str = BASE_ARM) -> dict[str, Any]:
    """Paired win rates of the arm's images over the baseline arm's; written to ``layout.compare_report(arm)``.

    The headline prompt set's comparison is the result itself; each further prompt set (``eval.prompt_sets``)
    is compared the same way, under ``prompt_sets.<name>``.
    """
    from sdpo.eval.winrate import compare_eval_dirs

    options = {"bootstrap_samples": ctx.cfg.eval.bootstrap_samples, "seed": ctx.cfg.eval.seed}
    with fs.local_copy(ctx.layout.evals(arm), marker=EVAL_MARKER) as cand, \
            fs.local_copy(ctx.layout.evals(baseline), marker=EVAL_MARKER) as base_eval:
        result = compare_eval_dirs(cand, base_eval, **options)
        result["prompt_sets"] = {}
        for name in ctx.cfg.eval.prompt_sets:
            for folder, which in ((cand, arm), (base_eval, baseline)):
                if not (folder / EVAL_SETS / name / EVAL_MARKER).is_file():
                    raise DataError(f"{ctx.layout.evals(which)}: no evaluation of prompt set {name!r} "
                                    f"(eval.prompt_sets); evaluate {which} again")
            by_set = compare_eval_dirs(cand / EVAL_SETS / name, base_eval / EVAL_SETS / name, **options)
            result["prompt_sets"][name] = {key: by_set[key] for key in ("n", "rewards")}
    result.update(candidate=ctx.layout.evals(arm), baseline=ctx.layout.evals(baseline))
    fs.write_json(ctx.layout.compare_report(arm), result)
    return result


def _gate(ctx: StageContext):
    """The promotion gate; it re-scores images, so it reads the trained rewards where the rewards stage put them."""
    from sdpo.tracking.gate import GateConfig

    return GateConfig.from_config(_scoring_config(ctx))


def _base_digest(ctx: StageContext) -> str:
    """The base model's digest, computed from the recorded base's folder (the baseline when there is no champion)."""
    uri = base_uri(ctx)
    if _is_hub_id(uri):
        raise ModelError(f"base model {uri}: a hub id has no folder digest; download it and set model.base to the "
                         "folder, so that its evaluation can be verified")
    return fs.folder_digest(uri)


def register(ctx: StageContext, arm: str | None = None, *, eval_run: str | None = None) -> dict[str, Any]:
    """Register the arm's model (default: ``registry.candidate``) as a model version, or reuse the version holding it.

    The version is linked to the model's evaluation run (``eval_run``, else the newest ``evaluate`` run of the same
    model digest) and the gate is run against the champion (or the base) before anything is created: with no
    evaluation, or nothing comparable, it raises and no version exists. A new version's decision is ``pending``
    until :func:`promote`. Writes ``reports/registry.json``. Returns ``{"name", "version", "run_id", "arm",
    "digest", "eval_run_id", "reused", "aliases", "decision"}``.
    """
    from sdpo.tracking.registry import register as register_model

    arm = arm or ctx.cfg.registry.candidate
    reg = ctx.cfg.registry
    with fs.local_copy(ctx.layout.model(arm), marker=MODEL_MARKER) as model, \
            fs.local_copy(ctx.layout.shards("train"), marker=MANIFEST) as shards:
        done = register_model(model, name=reg.model_name, base_digest=_base_digest(ctx), gate=_gate(ctx),
                              experiment=reg.experiment, eval_run_id=eval_run,
                              data_manifests={"train": (shards / MANIFEST, ctx.layout.shards("train"))},
                              config=ctx.cfg, tags={**ctx.tags, "variant": arm, "model.uri": ctx.layout.model(arm)},
                              parent_run_id=ctx.parent_run_id, dvc_lock=ctx.project_dir / "dvc.lock",
                              serving={"steps": ctx.cfg.eval.num_inference_steps,
                                       "guidance_scale": ctx.cfg.eval.guidance_scale})
    version = done.version
    record = {"name": reg.model_name, "version": str(version.version), "run_id": version.run_id, "arm": arm,
              "digest": version.tags.get("model.digest"), "eval_run_id": done.eval_run_id, "reused": done.reused,
              "aliases": done.aliases, "decision": done.decision.to_dict()}
    fs.write_json(ctx.layout.report("registry.json"), record)
    return record


def promote(ctx: StageContext, version: str | None = None, *, dry_run: bool = False) -> dict[str, Any]:
    """Decide whether a registered version becomes ``champion`` (else ``challenger``), from MLflow records only.

    ``version`` defaults to the one :func:`register` recorded. The gate reads the version's linked evaluation run
    and the champion's (or the base's) and checks them (:mod:`sdpo.tracking.gate`). Returns ``{"name", "version",
    "outcome", "decision", "alias", "champion", "changed"}``; ``outcome`` is ``promoted``, ``refused``,
    ``already-champion`` or, with ``dry_run``, ``would-promote`` / ``would-refuse``.
    """
    from sdpo.tracking.registry import promote as promote_version

    reg = ctx.cfg.registry
    if version is None:
        record = ctx.layout.report("registry.json")
        if not fs.exists(record):
            raise ModelError(f"{record}: nothing registered yet; run `sdpo register` first or pass --version")
        registered = fs.read_json(record)
        if registered.get("name") != reg.model_name:
            raise ModelError(f"{record} names model {registered.get('name')!r}, not registry.model_name "
                             f"{reg.model_name!r}; pass --version")
        version = str(registered["version"])
    result = promote_version(reg.model_name, version, base_digest=_base_digest(ctx), gate=_gate(ctx),
                             experiment=reg.experiment, dry_run=dry_run).to_dict()
    if not dry_run:
        fs.write_json(ctx.layout.report("promotion.json"), result)
        fs.write_json(ctx.layout.report("promotion_summary.json"), promotion_summary(result))
    return result


def promotion_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The promotion's headline, flat, for ``dvc metrics show``: the version, whether it is champion, the gate's
    primary win rate and its lower bound (``promotion.json`` keeps everything)."""
    details = result["decision"].get("details", {})
    return {"version": int(result["version"]), "champion": result.get("alias") == "champion",
            "win_rate": details.get("win_rate"), "win_rate_lower": details.get("ci_low")}
