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
EVAL_MAX_FILE_BYTES = 20 * 1024 * 1024  # eval files above this stay out of the artifacts (images/ never goes)
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


def log_data_manifest(manifest_path: str | Path, name: str, context: str = "training") -> str:
    """Record a shard manifest as an MLflow dataset input (its shard table, digest = sha256 of the manifest).

    Also tags the run ``data.manifest_digest`` (full sha256) and logs the manifest under ``data/<name>/``.
    Returns the full digest.
    """
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
            source=str(manifest_path.parent.resolve()),
            name=name,
            digest=digest[:MAX_DATASET_DIGEST_CHARS],
        )
    mlflow.log_input(dataset, context=context)
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


def log_eval_dir(eval_dir: str | Path) -> dict[str, float]:
    """Log an evaluation dir: its metrics (flattened) and its top-level files (grid.png included) under ``eval/``.

    ``images/`` is not uploaded; the top-level files are what a later comparison against this run needs.
    """
    eval_dir = Path(eval_dir)
    metrics = _read_json(eval_dir / "metrics.json", "evaluation metrics")
    if not isinstance(metrics, dict):
        raise DataError(f"{eval_dir / 'metrics.json'}: expected a JSON object")
    flat = eval_metrics(metrics)
    mlflow.log_metrics(flat)
    if isinstance(metrics.get("model_digest"), str):
        mlflow.set_tag("eval.model_digest", metrics["model_digest"])
    for path in sorted(eval_dir.iterdir()):
        if path.is_file() and path.stat().st_size <= EVAL_MAX_FILE_BYTES:
            mlflow.log_artifact(str(path), artifact_path=EVAL_ARTIFACT_DIR)
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
