"""Model registry: register a diffusers pipeline as a pyfunc model version, and gate the ``champion`` alias.

Aliases: ``champion`` (the model to serve), ``previous-champion`` (the one it replaced, kept reachable),
``challenger`` (the latest refused candidate). Every promotion decision is recorded on the model version
as ``promotion.*`` tags, in its description and as ``promotion/v<N>.json`` in the version's run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sdpo.config import Config
from sdpo.errors import DataError, ModelError
from sdpo.tracking import runs
from sdpo.tracking.policy import Decision, decide
from sdpo.tracking.pyfunc import log_pipeline_model

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
BASE_LABEL = "base"
PROMOTION_MARKER = "\n\nPromotion: "
REGISTRATION_TIMEOUT_S = 300

CompareFn = Callable[..., dict[str, Any]]


def model_dir_digest(model_dir: str | Path) -> str:
    """``sha256:<hex>`` over every file of a model folder: :func:`sdpo.fs.folder_digest`, the one model digest."""
    from sdpo.fs import folder_digest

    return folder_digest(model_dir)


def register(
    model_dir: str | Path,
    *,
    name: str,
    run_id: str | None = None,
    eval_dir: str | Path | None = None,
    data_manifest: str | Path | None = None,
    data_name: str | None = None,
    tags: dict[str, str] | None = None,
    experiment: str = "sdpo",
    config: Config | None = None,
    dvc_lock: str | Path | None = "dvc.lock",
    parent_run_id: str | None = None,
) -> ModelVersion:
    """Log ``model_dir`` as a pyfunc model and register it as a new version of ``name`` (READY on return).

    Logs into run ``run_id`` if given, else into a new run of ``experiment`` (with ``config`` as params).
    The eval dir (metrics + files under ``eval/``, which promotion compares against later), the data manifest
    and the dvc.lock lineage are logged in the same run. The version is tagged with the model digest, the run
    id and the evaluation metrics.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir}: not a diffusers pipeline folder (model_index.json missing)")
    digest = model_dir_digest(model_dir)
    run_context = runs.resume_run(run_id) if run_id else runs.start_run(
        experiment, f"register-{name}", tags=tags, parent_run_id=parent_run_id)
    with run_context as run:
        if config is not None and run_id is None:
            runs.log_config(config)
        if dvc_lock is not None:
            runs.log_lineage(dvc_lock)
        if data_manifest is not None:
            dataset = data_name or Path(data_manifest).resolve().parent.name or "pairs"
            runs.log_data_manifest(data_manifest, name=dataset)
        eval_summary = runs.log_eval_dir(eval_dir) if eval_dir is not None else {}
        mlflow.set_tag("model.digest", digest)
        info = log_pipeline_model(str(model_dir), name="model")
        run_id = run.info.run_id

    version_tags = {
        "model.digest": digest,
        "source.run_id": run_id,
        **{f"eval.{key}": f"{value:.6g}" for key, value in eval_summary.items()},
        **(tags or {}),
    }
    version = mlflow.register_model(
        info.model_uri, name, await_registration_for=REGISTRATION_TIMEOUT_S, tags=version_tags
    )
    client = runs.client()
    version = client.get_model_version(name, version.version)
    if version.status != "READY":
        raise ModelError(f"model {name!r} version {version.version}: registration ended as {version.status}")
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(eval_summary.items())) or "no evaluation logged"
    description = f"Diffusers pipeline from {model_dir} ({digest}), run {run_id}. Evaluation: {summary}."
    client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version)


def _version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        raise ModelError(f"registered model {name!r} has no version {version}: {err.message}") from None


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _download_eval(client: MlflowClient, version: ModelVersion, into: Path) -> Path | None:
    """The ``eval/`` artifacts of the version's run, downloaded into ``into``; None if there are none."""
    if not version.run_id:
        return None
    try:
        local = client.download_artifacts(version.run_id, runs.EVAL_ARTIFACT_DIR, str(into))
    except (MlflowException, OSError):
        return None
    return Path(local) if (Path(local) / "metrics.json").is_file() else None


def _recorded_decision(version: ModelVersion) -> Decision:
    tags = {k: v for k, v in version.tags.items() if k.startswith("promotion.")}
    earlier = tags.get("promotion.reason", "set outside sdpo promote")
    return Decision(True, f"version {version.version} is already the champion ({earlier})", {"recorded": tags})


def _default_compare() -> CompareFn:
    from sdpo.eval.winrate import compare_eval_dirs

    return compare_eval_dirs


def promote(
    name: str,
    version: str | int,
    *,
    candidate_eval: str | Path,
    baseline_eval: str | Path | None = None,
    primary_reward: str,
    min_win_rate_lower: float,
    guards: dict[str, float],
    bootstrap_samples: int = 1000,
    seed: int = 0,
    dry_run: bool = False,
    compare_fn: CompareFn | None = None,
) -> Decision:
    """Decide whether version ``version`` of ``name`` becomes the ``champion``, and move the aliases.

    The baseline is the current champion's logged evaluation if there is a champion, else ``baseline_eval``
    (the base model's evaluation); with neither, the answer is no. ``compare_fn`` defaults to
    ``sdpo.eval.winrate.compare_eval_dirs``. With ``dry_run`` nothing in the registry changes.
    Calling it again with the same inputs gives the same decision and the same aliases.
    """
    candidate_eval = Path(candidate_eval)
    for eval_dir in (candidate_eval, baseline_eval):
        if eval_dir is not None and not (Path(eval_dir) / "metrics.json").is_file():
            raise DataError(f"{eval_dir}: not an evaluation dir (metrics.json missing)")
    client = runs.client()
    candidate = _version(client, name, version)
    champion = _alias(client, name, CHAMPION)
    if champion is not None and champion.version == candidate.version:
        return _recorded_decision(candidate)

    policy = {"primary_reward": primary_reward, "min_win_rate_lower": min_win_rate_lower, "guards": guards}
    with tempfile.TemporaryDirectory(prefix="sdpo-baseline-") as tmp:
        baseline_dir: Path | None
        if champion is not None:
            baseline_label = champion.version
            baseline_dir = _download_eval(client, champion, Path(tmp))
            missing = f"champion version {champion.version} has no logged evaluation (eval/metrics.json in its run)"
        else:
            baseline_label = BASE_LABEL
            baseline_dir = Path(baseline_eval) if baseline_eval is not None else None
            missing = "no champion yet and no baseline evaluation given (--baseline-eval)"
        if baseline_dir is None:
            decision = Decision(False, missing, dict(policy))
        else:
            compare = (compare_fn or _default_compare())(
                str(candidate_eval), str(baseline_dir), bootstrap_samples=bootstrap_samples, seed=seed
            )
            decision = decide(compare, **policy)
    decision.details.update(candidate_version=candidate.version, baseline_version=baseline_label)
    if not dry_run:
        _record(client, candidate, decision, baseline_label)
        _move_aliases(client, name, candidate, champion, decision.promote)
    return decision


def _tag_number(value: Any) -> str:
    return "" if value is None else f"{value:.6g}"


def _record(client: MlflowClient, version: ModelVersion, decision: Decision, baseline_label: str) -> None:
    """Write the decision onto the model version: tags, description and a JSON artifact in its run."""
    word = "promoted" if decision.promote else "refused"
    timestamp = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        "promotion.decision": word,
        "promotion.reason": decision.reason,
        "promotion.primary_reward": str(decision.details.get("primary_reward", "")),
        "promotion.win_rate": _tag_number(decision.details.get("win_rate")),
        "promotion.ci_low": _tag_number(decision.details.get("ci_low")),
        "promotion.baseline_version": baseline_label,
        "promotion.timestamp": timestamp,
    }
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    registration = (version.description or "").split(PROMOTION_MARKER)[0]
    description = f"{registration}{PROMOTION_MARKER}{word} at {timestamp} against {baseline_label}: {decision.reason}"
    client.update_model_version(version.name, version.version, description=description)
    if version.run_id:
        record = {"name": version.name, "version": version.version, "timestamp": timestamp, **decision.to_dict()}
        client.log_text(version.run_id, json.dumps(record, indent=2), f"promotion/v{version.version}.json")


def _move_aliases(
    client: MlflowClient, name: str, candidate: ModelVersion, champion: ModelVersion | None, promoted: bool
) -> None:
    if not promoted:
        client.set_registered_model_alias(name, CHALLENGER, candidate.version)
        return
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion.version)
        client.set_model_version_tag(name, champion.version, "promotion.superseded_by", candidate.version)
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is not None and challenger.version == candidate.version:
        client.delete_registered_model_alias(name, CHALLENGER)
