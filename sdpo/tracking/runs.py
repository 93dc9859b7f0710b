"""Experiment and run logging: config params, data manifests, DVC lineage, evaluation dirs, training curves."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from sdpo.config import Config, config_to_dict, flatten, parse_yaml
from sdpo.errors import DataError

MAX_PARAM_VALUE_CHARS = 6000  # MLflow's limit for one param value
MAX_DATASET_DIGEST_CHARS = 36  # width of the datasets.digest column in MLflow's SQL schema
EVAL_ARTIFACT_DIR = "eval"
SPLITS = ("train", "heldout")  # the dataset names: one per split (sdpo.layout.SPLITS)
# The records an evaluation run carries (tags); the registry's gate reads them (sdpo.tracking.gate).
STAGE_TAG = "sdpo.stage"
EVAL_STAGE = "evaluate"
TAG_MODEL_DIGEST = "eval.model_digest"
TAG_MODEL_URI = "eval.model_uri"
TAG_REFERENCE_DIGEST = "eval.reference_digest"
TAG_REFERENCE_URI = "eval.reference_uri"
TAG_UNITS_KEY = "eval.units_key"
TAG_SCORES_SHA256 = "eval.scores_sha256"
TAG_N_IMAGES = "eval.n_images"
TAG_REWARDS = "eval.rewards"
SCORES_TABLE = f"{EVAL_ARTIFACT_DIR}/scores_table.json"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``mlflow.db`` in the current directory (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def configure() -> str:
    """Point the fluent API at :func:`tracking_uri` and return it."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def client() -> MlflowClient:
    """An :class:`MlflowClient` on the same store as the fluent API."""
    return MlflowClient(tracking_uri=configure())


@contextmanager
def start_run(experiment: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run in ``experiment`` (created if missing); inside an active run, start a nested child of it.

    ``parent_run_id`` files the run under another run that may live in another process (a flow run's parent run):
    MLflow's UI nests runs by the ``mlflow.parentRunId`` tag, whatever the parent's state.
    A nested run stays in its parent's experiment so that the MLflow UI shows it under the parent.
    """
    configure()
    parent = mlflow.active_run()
    tags = dict(tags or {})
    if parent is None:
        mlflow.set_experiment(experiment)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, nested=parent is not None, tags=tags) as run:
        yield run


def create_parent_run(experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create (and leave running) the run that a flow run's stage runs are filed under; returns its id.

    Creating it also creates the store and the experiment once, before parallel steps would race to migrate a new
    database.
    """
    store = client()
    found = store.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else store.create_experiment(experiment)
    return store.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


def finish_run(run_id: str, metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
    """Log final metrics into a run created by :func:`create_parent_run` and end it."""
    store = client()
    now = int(time.time() * 1000)
    points = [Metric(_tag_key(k), float(v), now, 0) for k, v in (metrics or {}).items()
              if isinstance(v, int | float) and math.isfinite(v)]
    if points:
        store.log_batch(run_id, metrics=points)
    store.set_terminated(run_id, status=status)


def log_metrics_at(run_id: str, metrics: dict[str, float], step: int, *, store: MlflowClient | None = None) -> None:
    """Log ``metrics`` at ``step`` into run ``run_id`` (it may have finished) in one request; ``store``: a client to
    reuse (a training loop logs many times), default :func:`client`."""
    now = int(time.time() * 1000)
    points = [Metric(_tag_key(k), float(v), now, step) for k, v in metrics.items()]
    (store or client()).log_batch(run_id, metrics=points)


@contextmanager
def resume_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Log into an existing run: the active one if it is ``run_id``, else reopen it until the block ends."""
    configure()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
        yield run


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_VALUE_CHARS]


def log_config(cfg: Config) -> dict[str, str]:
    """Log every parameter of ``cfg`` as a flat MLflow param (``train.mu``...); returns what was logged."""
    params = {key: _param_value(value) for key, value in flatten(config_to_dict(cfg)).items()}
    mlflow.log_params(params)
    return params


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: {what} is not valid JSON ({err})") from None


def log_data_manifest(manifest_path: str | Path, name: str, context: str = "training",
                      source: str | None = None) -> str:
    """Record a shard manifest as an MLflow dataset input (its shard table, digest = sha256 of the manifest).

    ``name`` is the split (``train`` or ``heldout``): one dataset name per split, whichever stage logs it.
    ``source`` is where the shards live (default: the manifest's folder; pass the run layout's URI when the
    manifest is a local copy). Also tags the run ``data.manifest_digest`` (full sha256, for ``context ==
    "training"``; ``data.<name>.manifest_digest`` always) and logs the manifest under ``data/<name>/``.
    Returns the full digest.
    """
    if name not in SPLITS:
        raise DataError(f"dataset name {name!r}: use the split's name, one of {SPLITS}")
    manifest_path = Path(manifest_path)
    manifest = _read_json(manifest_path, "data manifest")
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{manifest_path}: data manifest has no 'shards' list")
    import pandas as pd

    digest = file_sha256(manifest_path)
    with warnings.catch_warnings():
        # MLflow registers the local source class twice and warns about it; the shard table has no missing values
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_pandas(
            pd.DataFrame(shards),
            source=source or str(manifest_path.parent.resolve()),
            name=name,
            digest=digest[:MAX_DATASET_DIGEST_CHARS],
        )
        mlflow.log_input(dataset, context=context)  # the schema is inferred here, lazily: inside the filter
    mlflow.set_tag(f"data.{name}.manifest_digest", digest)
    if context == "training":
        mlflow.set_tag("data.manifest_digest", digest)
    mlflow.log_artifact(str(manifest_path), artifact_path=f"data/{name}")
    return digest


def _tag_key(text: str) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", text)


def log_lineage(dvc_lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """Tag the run with the md5 of every stage input in ``dvc.lock`` (``lineage.<path>``); no-op without the file."""
    dvc_lock_path = Path(dvc_lock_path)
    if not dvc_lock_path.is_file():
        return {}
    lock = parse_yaml(dvc_lock_path.read_text()) or {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise DataError(f"{dvc_lock_path}: no 'stages' mapping (is this a DVC 3 lock file?)")
    tags: dict[str, str] = {}
    for stage in stages.values():
        for dep in (stage or {}).get("deps") or []:
            if isinstance(dep, dict) and dep.get("path") and dep.get("md5"):
                tags[_tag_key(f"lineage.{dep['path']}")] = str(dep["md5"])
    if tags:
        mlflow.set_tags(tags)
    return tags


def eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten an evaluation ``metrics.json`` to numeric MLflow metrics (``reward.<name>.mean``, ``heldout.*``)."""
    renamed = {("reward" if key == "rewards" else key): value for key, value in metrics.items()}
    out: dict[str, float] = {}
    for key, value in flatten(renamed).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[_tag_key(key)] = float(value)
    return out


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Reference:
    """The model an evaluation's held-out error deltas were measured against."""

    digest: str  # sdpo.fs.folder_digest of the reference's folder
    uri: str


def _score_table(rows: list[dict[str, Any]], rewards: list[str]) -> dict[str, list[Any]]:
    table: dict[str, list[Any]] = {"prompt_index": [], "seed": [], "prompt": [], "image": []}
    table.update({f"score.{name}": [] for name in rewards})
    for row in rows:
        for key in ("prompt_index", "seed", "prompt"):
            table[key].append(row[key])
        table["image"].append(f"{EVAL_ARTIFACT_DIR}/{row['image']}")
        for name in rewards:
            table[f"score.{name}"].append(row["scores"].get(name))
    return table


def log_eval_dir(eval_dir: str | Path, *, metrics: dict[str, Any] | None = None,
                 reference: Reference | None = None, model_uri: str | None = None) -> dict[str, float]:
    """Log a finished evaluation folder into the active run as the records promotion decides from.

    - metrics: ``metrics.json`` flattened (``reward.<name>.mean``, ``heldout.winner_delta``...), each logged once;
    - artifacts under ``eval/``: ``images/`` (every image), ``scores.jsonl`` (per-image scores), ``manifest.json``,
      ``metrics.json``, ``grid.png``, and ``scores_table.json`` (the per-image scores as an MLflow table);
    - tags: ``sdpo.stage=evaluate``, the evaluated model's digest and URI, the held-out reference's digest and URI
      (``reference``), the units key (prompts, seeds, settings), the sha256 of ``scores.jsonl``, the image count
      and the rewards.

    ``metrics`` are the values the evaluation computed in memory: a folder whose ``metrics.json`` differs from them
    was changed and is refused. Returns the logged metrics.
    """
    from sdpo.eval.winrate import read_eval_dir, units_key

    eval_dir = Path(eval_dir)
    manifest, rows_by_unit, on_disk = read_eval_dir(eval_dir)
    if not isinstance(on_disk, dict):
        raise DataError(f"{eval_dir / 'metrics.json'}: expected a JSON object")
    if metrics is not None and json.loads(json.dumps(metrics)) != on_disk:
        raise DataError(f"{eval_dir / 'metrics.json'}: differs from the metrics the evaluation computed")
    digest = manifest.get("model_digest")
    if not isinstance(digest, str) or on_disk.get("model_digest") != digest:
        raise DataError(f"{eval_dir}: manifest.json and metrics.json do not name the same model_digest")
    rows = [rows_by_unit[unit] for unit in sorted(rows_by_unit)]
    for row in rows:
        image = eval_dir / str(row.get("image", ""))
        if not str(row.get("image", "")).startswith("images/") or not image.is_file():
            raise DataError(f"{eval_dir / 'scores.jsonl'}: row {row.get('image')!r} names no image under images/")
    rewards = [str(name) for name in manifest.get("rewards", [])]
    flat = eval_metrics(on_disk)
    mlflow.log_metrics(flat)
    tags = {
        STAGE_TAG: EVAL_STAGE,
        TAG_MODEL_DIGEST: digest,
        TAG_MODEL_URI: model_uri or str(manifest.get("model", "")),
        TAG_UNITS_KEY: units_key(manifest),
        TAG_SCORES_SHA256: sha256_hex((eval_dir / "scores.jsonl").read_bytes()),
        TAG_N_IMAGES: str(len(rows)),
        TAG_REWARDS: ",".join(rewards),
    }
    if reference is not None:
        tags.update({TAG_REFERENCE_DIGEST: reference.digest, TAG_REFERENCE_URI: reference.uri})
    mlflow.set_tags(tags)
    settings = manifest.get("settings") or {}
    mlflow.log_params({f"eval.{key}": _param_value(settings[key]) for key in sorted(settings)}
                      | {"eval.prompts": str(len(manifest.get("prompts", []))),
                         "eval.seeds": _param_value(manifest.get("seeds"))})
    mlflow.log_artifacts(str(eval_dir), artifact_path=EVAL_ARTIFACT_DIR)
    mlflow.log_table(_score_table(rows, rewards), artifact_file=SCORES_TABLE)
    return flat


def log_metrics_history(jsonl_path: str | Path) -> int:
    """Log per-step training metrics from JSON lines ``{"step": 10, "loss": 0.3, ...}``; returns points logged.

    Non-numeric and non-finite values are skipped (MLflow rejects NaN on some stores).
    """
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise DataError(f"{jsonl_path}: metrics history not found")
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_metrics_history needs an active MLflow run (use sdpo.tracking.runs.start_run)")
    now = int(time.time() * 1000)
    points: list[Metric] = []
    for number, line in enumerate(jsonl_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{jsonl_path}:{number}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{jsonl_path}:{number}: expected an object with an integer 'step'")
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                points.append(Metric(key=_tag_key(key), value=float(value), timestamp=now, step=row["step"]))
    MlflowClient().log_batch(run.info.run_id, metrics=points)  # the store the active run lives in
    return len(points)
