"""Model registry: register a diffusers pipeline as a pyfunc model version, and gate the ``champion`` alias.

Aliases: ``champion`` (the model to serve), ``previous-champion`` (the one it replaced, kept reachable),
``challenger`` (the latest refused candidate). A registered model holds one version per model digest
(:func:`sdpo.fs.folder_digest`); registering the same model again reuses its version.

Every version carries a decision in its ``promotion.*`` tags: ``pending`` (registered, not decided yet),
``promoted``, ``refused`` or ``error`` (the gate failed; the reason says why), with the reason, the evidence
(evaluation runs, baseline) and a timestamp; the description and ``promotion/v<N>/<time>-<decision>.json`` in the
version's run repeat it (one file per decision, so the history stays). Decisions come from
:mod:`sdpo.tracking.gate` (MLflow records only, checked); registrations and promotions of one model are serialised
by :mod:`sdpo.tracking.lock`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sdpo.config import Config
from sdpo.errors import ModelError
from sdpo.tracking import runs
from sdpo.tracking.gate import (
    EVAL_RUN_TAG,
    MODEL_DIGEST_TAG,
    EvidenceError,
    GateConfig,
    assess,
    champion_baseline,
    find_evaluations,
)
from sdpo.tracking.lock import registry_lock
from sdpo.tracking.policy import Decision
from sdpo.tracking.pyfunc import log_pipeline_model

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
PROMOTION_MARKER = "\n\nPromotion: "
REGISTRATION_TIMEOUT_S = 300
PENDING, PROMOTED, REFUSED, ERROR = "pending", "promoted", "refused", "error"
# what promote() did: the version is / became / stayed ...
ALREADY_CHAMPION = "already-champion"
WOULD_PROMOTE, WOULD_REFUSE = "would-promote", "would-refuse"


def model_dir_digest(model_dir: str | Path) -> str:
    """``sha256:<hex>`` over every file of a model folder: :func:`sdpo.fs.folder_digest`, the one model digest."""
    from sdpo.fs import folder_digest

    return folder_digest(model_dir)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def _aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    return sorted(alias for alias, number in aliases.items() if str(number) == str(version))


def find_version(client: MlflowClient, name: str, digest: str) -> ModelVersion | None:
    """The version of ``name`` that holds the model with ``digest`` (the oldest, if several), or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{MODEL_DIGEST_TAG}` = '{digest}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def _experiment_ids(client: MlflowClient, experiment: str) -> list[str]:
    found = client.get_experiment_by_name(experiment)
    return [found.experiment_id] if found is not None else []


def recorded_decision(version: ModelVersion) -> Decision:
    """The decision recorded on a version's tags (``pending`` when none was made)."""
    tags = version.tags
    word = tags.get("promotion.decision", PENDING)
    reason = tags.get("promotion.reason", "no decision recorded")
    details = {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}
    return Decision(word == PROMOTED, reason, {"recorded": word, **details})


# --- registering --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What :func:`register` did: the version, whether it already existed, and the decision it carries."""

    version: ModelVersion
    reused: bool
    eval_run_id: str
    assessment: Decision | None  # the gate's answer before registering (None for a reused version)
    aliases: list[str] = field(default_factory=list)

    @property
    def decision(self) -> Decision:
        return recorded_decision(self.version)


def _evaluation_of(client: MlflowClient, digest: str, eval_run_id: str | None, experiment_ids: list[str]) -> str:
    """The evaluation run of the model with ``digest``: the given one (checked) or the newest one found."""
    if eval_run_id is not None:
        try:
            run = client.get_run(eval_run_id)
        except MlflowException as err:
            raise ModelError(f"evaluation run {eval_run_id} not found: {err.message}") from None
        evaluated = run.data.tags.get(runs.TAG_MODEL_DIGEST)
        if evaluated != digest:
            raise ModelError(f"evaluation run {eval_run_id} evaluated model {evaluated}, not this one ({digest}): "
                             "a version is only registered with its own evaluation")
        return eval_run_id
    found = find_evaluations(client, experiment_ids, digest, max_results=1)
    if not found:
        raise EvidenceError(f"no finished evaluation run of model {digest} in the experiment: run the evaluate "
                            "stage (`sdpo evaluate --arm ARM`) for this model first")
    return found[0].info.run_id


def register(
    model_dir: str | Path,
    *,
    name: str,
    base_digest: str,
    gate: GateConfig,
    experiment: str = "sdpo",
    eval_run_id: str | None = None,
    data_manifests: dict[str, tuple[str | Path, str]] | None = None,
    tags: dict[str, str] | None = None,
    config: Config | None = None,
    dvc_lock: str | Path | None = "dvc.lock",
    parent_run_id: str | None = None,
    serving: dict[str, Any] | None = None,
) -> Registration:
    """Register ``model_dir`` as a version of ``name``, linked to its evaluation run, with decision ``pending``.

    One version per model: when a version already holds this digest it is returned (``reused``), unchanged but for
    a missing evaluation link. Otherwise the gate is run first (:func:`sdpo.tracking.gate.assess` against the
    current champion or the base, as a dry run): when there is no evaluation run of this model, or nothing
    comparable to judge it against, :class:`EvidenceError` is raised and **no version is created**. The version's
    run logs the pyfunc model, the config, the datasets (``data_manifests``: split -> (manifest path, URI of the
    shards)) and the dvc.lock lineage; ``serving`` (``steps``, ``guidance_scale``) are the served model's default
    params. Registrations and promotions of ``name`` are serialised.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir}: not a diffusers pipeline folder (model_index.json missing)")
    digest = model_dir_digest(model_dir)
    client = runs.client()
    experiment_ids = _experiment_ids(client, experiment)
    with registry_lock(client, name):
        existing = find_version(client, name, digest)
        if existing is not None:
            linked = existing.tags.get(EVAL_RUN_TAG)
            if not linked:
                linked = _evaluation_of(client, digest, eval_run_id, experiment_ids)
                client.set_model_version_tag(name, existing.version, EVAL_RUN_TAG, linked)
            version = client.get_model_version(name, existing.version)
            return Registration(version, True, linked, None, _aliases_of(client, name, version.version))
        linked = _evaluation_of(client, digest, eval_run_id, experiment_ids)
        with tempfile.TemporaryDirectory(prefix="sdpo-gate-") as tmp:
            assessment = assess(client, candidate_digest=digest, eval_run_id=linked,
                                baseline=champion_baseline(_alias(client, name, CHAMPION), base_digest),
                                base_digest=base_digest, gate=gate, experiment_ids=experiment_ids, workdir=Path(tmp))
        version = _create_version(client, model_dir, digest, name=name, eval_run_id=linked, experiment=experiment,
                                  data_manifests=data_manifests, tags=tags, config=config, dvc_lock=dvc_lock,
                                  parent_run_id=parent_run_id, serving=serving or {})
    return Registration(version, False, linked, assessment, [])


def _create_version(client: MlflowClient, model_dir: Path, digest: str, *, name: str, eval_run_id: str,
                    experiment: str, data_manifests: dict[str, tuple[str | Path, str]] | None,
                    tags: dict[str, str] | None, config: Config | None, dvc_lock: str | Path | None,
                    parent_run_id: str | None, serving: dict[str, Any]) -> ModelVersion:
    """Log the model in a new run and register it, tagged with its digest, its evaluation and ``pending``."""
    with runs.start_run(experiment, f"register-{name}", tags=tags, parent_run_id=parent_run_id) as run:
        if config is not None:
            runs.log_config(config)
        if dvc_lock is not None:
            runs.log_lineage(dvc_lock)
        for split, (manifest, source) in sorted((data_manifests or {}).items()):
            runs.log_data_manifest(manifest, name=split, source=source)
        mlflow.set_tags({MODEL_DIGEST_TAG: digest, EVAL_RUN_TAG: eval_run_id})
        info = log_pipeline_model(str(model_dir), name="model", **serving)
        run_id = run.info.run_id
    eval_metrics = client.get_run(eval_run_id).data.metrics
    version_tags = {
        MODEL_DIGEST_TAG: digest,
        "source.run_id": run_id,
        EVAL_RUN_TAG: eval_run_id,
        **{f"eval.{key}": f"{value:.6g}" for key, value in eval_metrics.items()},
        **(tags or {}),
        "promotion.decision": PENDING,
        "promotion.reason": f"registered at {_now()}; no promotion decision yet (run `sdpo promote`)",
    }
    version = mlflow.register_model(info.model_uri, name, await_registration_for=REGISTRATION_TIMEOUT_S,
                                    tags=version_tags)
    version = client.get_model_version(name, version.version)
    if version.status != "READY":
        raise ModelError(f"model {name!r} version {version.version}: registration ended as {version.status}")
    description = (f"Diffusers pipeline {digest} from {model_dir}, run {run_id}; judged by evaluation run "
                   f"{eval_run_id}.")
    client.update_model_version(name, version.version, description=description)
    client.set_tag(eval_run_id, f"registry.{name}.version", version.version)
    return client.get_model_version(name, version.version)


# --- promoting ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did. ``alias``: the alias the version holds afterwards (None: none)."""

    name: str
    version: str
    outcome: str  # promoted | refused | already-champion | would-promote | would-refuse | error
    decision: Decision
    alias: str | None
    champion: str | None  # the champion version afterwards
    changed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "outcome": self.outcome,
                "decision": self.decision.to_dict(), "alias": self.alias, "champion": self.champion,
                "changed": list(self.changed)}


def _main_alias(aliases: list[str]) -> str | None:
    for alias in (CHAMPION, CHALLENGER, PREVIOUS_CHAMPION):
        if alias in aliases:
            return alias
    return aliases[0] if aliases else None


def promote(name: str, version: str | int, *, base_digest: str, gate: GateConfig, experiment: str = "sdpo",
            dry_run: bool = False) -> Promotion:
    """Decide whether version ``version`` of ``name`` becomes the ``champion``, record it and move the aliases.

    The decision is the gate's (:func:`sdpo.tracking.gate.assess`) on the version's linked evaluation run against
    the current champion's evaluation, or the base model's (``base_digest``) when there is no champion. A version
    that is already the champion is left as it is (``already-champion``). Evidence that is missing or cannot be
    compared refuses, with the reason recorded; an unexpected failure records ``error`` and is raised. With
    ``dry_run`` nothing changes and no lock is taken. Runs under the registered model's lock.
    """
    client = runs.client()
    if dry_run:
        return _decide_and_apply(client, name, str(version), base_digest, gate, experiment, dry_run=True)
    _version(client, name, version)  # an unknown version fails before the lock
    with registry_lock(client, name):
        return _decide_and_apply(client, name, str(version), base_digest, gate, experiment, dry_run=False)


def _decide_and_apply(client: MlflowClient, name: str, number: str, base_digest: str, gate: GateConfig,
                      experiment: str, *, dry_run: bool) -> Promotion:
    candidate = _version(client, name, number)
    champion = _alias(client, name, CHAMPION)
    if champion is not None and champion.version == candidate.version:
        decision = recorded_decision(candidate)
        reason = f"version {number} is already the champion ({decision.reason}); nothing changed"
        return Promotion(name, number, ALREADY_CHAMPION, Decision(True, reason, decision.details), CHAMPION,
                         number, [])
    try:
        decision = _assess_version(client, candidate, champion, base_digest, gate, experiment)
    except Exception as err:
        if not dry_run:
            _record(client, candidate, Decision(False, f"promotion failed: {err}", {}), ERROR)
        raise
    if dry_run:
        outcome = WOULD_PROMOTE if decision.promote else WOULD_REFUSE
        aliases = _aliases_of(client, name, number)
        return Promotion(name, number, outcome, decision, _main_alias(aliases),
                         champion.version if champion else None, [])
    if _alias_version(client, name, CHAMPION) != (champion.version if champion else None):
        raise ModelError(f"the champion of {name!r} changed while version {number} was being decided (outside "
                         "sdpo's lock); nothing was recorded; run the promotion again")
    _record(client, candidate, decision, PROMOTED if decision.promote else REFUSED)
    changed = _move_aliases(client, name, candidate, champion, decision.promote)
    aliases = _aliases_of(client, name, number)
    outcome = PROMOTED if decision.promote else REFUSED
    champion_after = _alias_version(client, name, CHAMPION)
    return Promotion(name, number, outcome, decision, _main_alias(aliases), champion_after,
                     [f"tags promotion.* of version {number}", *changed])


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    found = _alias(client, name, alias)
    return found.version if found is not None else None


def _assess_version(client: MlflowClient, candidate: ModelVersion, champion: ModelVersion | None, base_digest: str,
                    gate: GateConfig, experiment: str) -> Decision:
    """The gate's decision on a registered version; missing or incomparable evidence refuses."""
    digest, eval_run_id = candidate.tags.get(MODEL_DIGEST_TAG), candidate.tags.get(EVAL_RUN_TAG)
    baseline_label = champion.version if champion is not None else "base"
    if not digest or not eval_run_id:
        missing = MODEL_DIGEST_TAG if not digest else EVAL_RUN_TAG
        return Decision(False, f"version {candidate.version} has no {missing} tag: it was not registered by "
                        "`sdpo register`, so there is no evaluation to verify", {"baseline_version": baseline_label})
    try:
        with tempfile.TemporaryDirectory(prefix="sdpo-gate-") as tmp:
            return assess(client, candidate_digest=digest, eval_run_id=eval_run_id,
                          baseline=champion_baseline(champion, base_digest), base_digest=base_digest, gate=gate,
                          experiment_ids=_experiment_ids(client, experiment), workdir=Path(tmp))
    except EvidenceError as err:
        return Decision(False, str(err), {"baseline_version": baseline_label, "candidate_eval_run": eval_run_id})


def _tag_number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _record(client: MlflowClient, version: ModelVersion, decision: Decision, word: str) -> None:
    """Write the decision onto the model version: tags, description and a JSON artifact in its run."""
    timestamp = _now()
    details = decision.details
    tags = {
        "promotion.decision": word,
        "promotion.reason": decision.reason[:5000],
        "promotion.primary_reward": str(details.get("primary_reward", "")),
        "promotion.win_rate": _tag_number(details.get("win_rate")),
        "promotion.ci_low": _tag_number(details.get("ci_low")),
        "promotion.baseline_version": str(details.get("baseline_version", "")),
        "promotion.candidate_eval_run": str(details.get("candidate_eval_run", "")),
        "promotion.baseline_eval_run": str(details.get("baseline_eval_run", "")),
        "promotion.timestamp": timestamp,
    }
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    registration = (version.description or "").split(PROMOTION_MARKER)[0]
    baseline = details.get("baseline_version", "?")
    description = f"{registration}{PROMOTION_MARKER}{word} at {timestamp} against {baseline}: {decision.reason}"
    client.update_model_version(version.name, version.version, description=description[:20000])
    if version.run_id:
        record = {"name": version.name, "version": version.version, "timestamp": timestamp, "decision": word,
                  **decision.to_dict()}
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        client.log_text(version.run_id, json.dumps(record, indent=2, default=str),
                        f"promotion/v{version.version}/{stamp}-{word}.json")


def _move_aliases(client: MlflowClient, name: str, candidate: ModelVersion, champion: ModelVersion | None,
                  promoted: bool) -> list[str]:
    """Move the aliases after a decision; returns what changed, in words."""
    number = candidate.version
    if not promoted:
        client.set_registered_model_alias(name, CHALLENGER, number)
        return [f"alias {CHALLENGER} -> version {number}"]
    changed = []
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion.version)
        client.set_model_version_tag(name, champion.version, "promotion.superseded_by", number)
        changed.append(f"alias {PREVIOUS_CHAMPION} -> version {champion.version}")
    client.set_registered_model_alias(name, CHAMPION, number)
    changed.append(f"alias {CHAMPION} -> version {number}")
    if _alias_version(client, name, CHALLENGER) == number:
        client.delete_registered_model_alias(name, CHALLENGER)
        changed.append(f"alias {CHALLENGER} removed")
    return changed
