"""The promotion gate: decide from the records the evaluation stage wrote to MLflow, after checking them.

Nothing here reads a path a caller passes. The candidate's evaluation is the run its model version names
(``eval.run_id``); the baseline's is the champion's (or, with no champion, the base model's) finished evaluation
run with the same prompts, seeds and settings, found by its model digest. Before the policy (:func:`decide`)
sees any number, the gate checks:

- the evaluated model: the run's ``eval.model_digest`` (and its manifest's) equals the version's ``model.digest``
  (both :func:`sdpo.fs.folder_digest`), and the candidate is not the base model itself;
- the held-out reference: the run's ``eval.reference_digest`` is the base or the current champion, never the
  candidate itself; the baseline's deltas are taken against the same reference;
- the records are as logged: ``scores.jsonl`` has the sha256 the run was tagged with, its rows name the manifest's
  prompts and seeds, every metric the policy reads was logged once, and the logged reward means equal the means of
  the per-image scores;
- the scores are true: a seeded sample of the logged images of both runs is re-scored with the configured reward
  and must match the logged scores within tolerance.

The win rate and the reward guards are re-derived from the per-image scores; the held-out guards come from the
run's metrics (the evaluation stage logs them from what it computed). What cannot be checked at all (no
evaluation run, runs that cannot be compared) raises :class:`EvidenceError`; what fails a check refuses, with
every problem named in the decision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow.artifacts
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sdpo.errors import DataError
from sdpo.tracking import runs
from sdpo.tracking.policy import Decision, decide

EVAL_RUN_TAG = "eval.run_id"  # model version tag: the evaluation run the version is judged by
MODEL_DIGEST_TAG = "model.digest"
RESCORE_SAMPLES = 32
SCORE_ATOL = 1e-4
SCORE_RTOL = 1e-3

RewardLoader = Callable[[str], Any]


class EvidenceError(DataError):
    """The records a decision needs are missing or cannot be compared: nothing can be decided."""


def default_reward_loader(name: str) -> Any:
    """A reward by name with no weights configured (enough for ``synthetic``)."""
    from sdpo.eval.rewards import load_reward

    return load_reward(name)


@dataclass(frozen=True)
class GateConfig:
    """The promotion policy and how the gate checks the evidence."""

    primary_reward: str
    min_win_rate_lower: float
    guards: dict[str, float]
    bootstrap_samples: int = 1000
    seed: int = 0
    rescore_samples: int = RESCORE_SAMPLES
    score_atol: float = SCORE_ATOL
    score_rtol: float = SCORE_RTOL
    reward_loader: RewardLoader = default_reward_loader

    @classmethod
    def from_config(cls, cfg: Any) -> GateConfig:
        """From a :class:`sdpo.config.Config`: ``registry.*`` policy, ``eval.*`` bootstrap, seed and reward weights."""
        from sdpo.eval.rewards import load_reward

        ev, reg = cfg.eval, cfg.registry

        def loader(name: str) -> Any:
            return load_reward(name, ev.reward_paths.get(name), ev.reward_sha256.get(name))

        return cls(primary_reward=reg.primary_reward, min_win_rate_lower=reg.min_win_rate_lower,
                   guards=dict(reg.guards), bootstrap_samples=ev.bootstrap_samples, seed=ev.seed,
                   reward_loader=loader)

    def checked_rewards(self) -> list[str]:
        """The rewards the decision reads: the primary one and those of ``reward_<name>_mean`` guards."""
        names = [self.primary_reward]
        for guard in self.guards:
            if guard.startswith("reward_") and guard.endswith("_mean"):
                names.append(guard.removeprefix("reward_").removesuffix("_mean"))
        return list(dict.fromkeys(names))


@dataclass
class EvalRecord:
    """An evaluation run's records, downloaded and checked for consistency (``problems``)."""

    run_id: str
    experiment_id: str
    model_digest: str
    reference_digest: str | None
    units_key: str
    manifest: dict[str, Any]
    rows: dict[tuple[int, int], dict[str, Any]]
    heldout: dict[str, float]
    logged_means: dict[str, float]
    folder: Path
    artifact_uri: str  # the run's artifact root: its files are read from there, with no lookup of the run per file
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"evaluation run {self.run_id}"


def _is_evaluation(run: Run) -> bool:
    return run.data.tags.get(runs.STAGE_TAG) == runs.EVAL_STAGE and run.info.status == "FINISHED"


def find_evaluations(client: MlflowClient, experiment_ids: list[str], model_digest: str,
                     units_key: str | None = None, max_results: int = 10) -> list[Run]:
    """Finished evaluation runs of the model with ``model_digest`` (and ``units_key``), newest first."""
    if not experiment_ids:
        return []
    query = (f"tags.`{runs.STAGE_TAG}` = '{runs.EVAL_STAGE}' and tags.`{runs.TAG_MODEL_DIGEST}` = '{model_digest}'"
             " and attributes.status = 'FINISHED'")
    if units_key is not None:
        query += f" and tags.`{runs.TAG_UNITS_KEY}` = '{units_key}'"
    return client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def _download(client: MlflowClient, run_id: str, artifact_uri: str, path: str, into: Path) -> Path:
    """One artifact of run ``run_id`` into ``into``, read from the run's artifact root ``artifact_uri``
    (``client.download_artifacts(run_id, ...)`` would fetch the run and search its logged models for every file)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{path}", dst_path=str(into),
                                                        tracking_uri=client.tracking_uri))
    except (MlflowException, OSError) as err:
        raise EvidenceError(f"evaluation run {run_id}: artifact {path} cannot be read ({err})") from None


def _check_rows(record: EvalRecord) -> None:
    prompts, seeds = record.manifest.get("prompts") or [], set(record.manifest.get("seeds") or [])
    images = set()
    for (index, seed), row in record.rows.items():
        image = PurePosixPath(str(row.get("image", "")))
        if not (0 <= index < len(prompts)) or row.get("prompt") != prompts[index] or seed not in seeds:
            record.problems.append(f"{record.label}: score row {(index, seed)} names a prompt or seed that its "
                                   "manifest does not have")
            return
        if image.parts[:1] != ("images",) or ".." in image.parts or image in images:
            record.problems.append(f"{record.label}: score row {(index, seed)} names image {str(image)!r}")
            return
        images.add(image)
    expected = len(prompts) * len(seeds)
    if len(record.rows) != expected or record.manifest.get("n_images") != expected:
        record.problems.append(f"{record.label}: {len(record.rows)} score rows for {expected} (prompt, seed) units")


def _check_metrics(client: MlflowClient, run: Run, record: EvalRecord, rewards: list[str]) -> None:
    """Every metric the decision reads was logged once, and the logged means are the scores' means."""
    from sdpo.eval.winrate import reward_means

    keys = [k for k in run.data.metrics if k.startswith("heldout.")] + [f"reward.{n}.mean" for n in rewards]
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        if len(history) > 1:
            record.problems.append(f"{record.label}: metric {key} was logged {len(history)} times (it was rewritten "
                                   "after the evaluation)")
    try:
        means = reward_means(record.rows, rewards)
    except DataError as err:
        record.problems.append(f"{record.label}: {err}")
        return
    for name, mean in means.items():
        logged = record.logged_means.get(name)
        if logged is None or not math.isclose(logged, mean, rel_tol=1e-9, abs_tol=1e-9):
            record.problems.append(f"{record.label}: logged reward.{name}.mean {logged} is not the mean of its "
                                   f"per-image scores ({mean:.6g})")


def load_record(client: MlflowClient, run_id: str, into: Path, rewards: list[str]) -> EvalRecord:
    """Download an evaluation run's manifest and scores into ``into`` and check them against the run's tags."""
    from sdpo.eval.winrate import read_scores, units_key

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise EvidenceError(f"evaluation run {run_id} not found ({err.message})") from None
    if not _is_evaluation(run):
        raise EvidenceError(f"run {run_id} is not a finished evaluation run ({runs.STAGE_TAG}="
                            f"{run.data.tags.get(runs.STAGE_TAG)!r}, status {run.info.status})")
    tags, metrics = run.data.tags, run.data.metrics
    into.mkdir(parents=True, exist_ok=True)
    root = run.info.artifact_uri
    manifest_path = _download(client, run_id, root, f"{runs.EVAL_ARTIFACT_DIR}/manifest.json", into)
    scores_path = _download(client, run_id, root, f"{runs.EVAL_ARTIFACT_DIR}/scores.jsonl", into)
    try:
        manifest = json.loads(manifest_path.read_text())
        rows = read_scores(scores_path)
    except (json.JSONDecodeError, DataError) as err:
        raise EvidenceError(f"evaluation run {run_id}: {err}") from None
    record = EvalRecord(
        run_id=run_id, experiment_id=run.info.experiment_id, model_digest=tags.get(runs.TAG_MODEL_DIGEST, ""),
        reference_digest=tags.get(runs.TAG_REFERENCE_DIGEST), units_key=tags.get(runs.TAG_UNITS_KEY, ""),
        manifest=manifest, rows=rows, folder=into, artifact_uri=root,
        heldout={k.removeprefix("heldout."): v for k, v in metrics.items() if k.startswith("heldout.")},
        logged_means={k.split(".")[1]: v for k, v in metrics.items()
                      if k.startswith("reward.") and k.endswith(".mean") and k.count(".") == 2},
    )
    if runs.sha256_hex(scores_path.read_bytes()) != tags.get(runs.TAG_SCORES_SHA256):
        record.problems.append(f"{record.label}: scores.jsonl is not the file the evaluation logged (its sha256 "
                               f"differs from the run's {runs.TAG_SCORES_SHA256} tag)")
    if manifest.get("model_digest") != record.model_digest:
        record.problems.append(f"{record.label}: its manifest names model {manifest.get('model_digest')}, its "
                               f"{runs.TAG_MODEL_DIGEST} tag {record.model_digest}")
    if units_key(manifest) != record.units_key:
        record.problems.append(f"{record.label}: its manifest's prompts, seeds or settings differ from its tags")
    _check_rows(record)
    _check_metrics(client, run, record, [n for n in rewards if n in manifest.get("rewards", [])])
    return record


def _close(logged: float, rescored: float, gate: GateConfig) -> bool:
    return math.isfinite(logged) and abs(logged - rescored) <= gate.score_atol + gate.score_rtol * abs(rescored)


def rescore_sample(record: EvalRecord, gate: GateConfig) -> list[tuple[int, int]]:
    """The (prompt_index, seed) units whose images are re-scored: ``gate.rescore_samples`` drawn with ``gate.seed``."""
    units = sorted(record.rows)
    rng = np.random.default_rng(gate.seed)
    picked = rng.choice(len(units), size=min(gate.rescore_samples, len(units)), replace=False) if units else []
    return [units[i] for i in sorted(picked)]


def rescore(client: MlflowClient, record: EvalRecord, gate: GateConfig, rewards: list[str]) -> list[str]:
    """Re-score a seeded sample of the run's logged images; the problems found (none when all match)."""
    from PIL import Image

    rewards = [n for n in rewards if n in record.manifest.get("rewards", [])]
    sample = rescore_sample(record, gate)
    if not sample or not rewards:
        return []
    images, prompts = [], []
    for unit in sample:
        row = record.rows[unit]
        path = _download(client, record.run_id, record.artifact_uri, f"{runs.EVAL_ARTIFACT_DIR}/{row['image']}",
                         record.folder / "sample")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
        prompts.append(record.manifest["prompts"][unit[0]])
    problems = []
    for name in rewards:
        scores = np.asarray(gate.reward_loader(name).score(images, prompts), dtype=np.float64)
        bad = [(unit, float(record.rows[unit]["scores"].get(name, float("nan"))), float(value))
               for unit, value in zip(sample, scores, strict=True)
               if not _close(float(record.rows[unit]["scores"].get(name, float("nan"))), float(value), gate)]
        if bad:
            unit, logged, fresh = bad[0]
            problems.append(f"{record.label}: {len(bad)} of {len(sample)} re-scored images differ from the logged "
                            f"{name} scores (e.g. {record.rows[unit]['image']}: logged {logged:.6g}, re-scored "
                            f"{fresh:.6g})")
    return problems


@dataclass(frozen=True)
class Baseline:
    """What the candidate is compared with: the champion version, or the base model."""

    label: str  # a version number, or "base"
    digest: str
    eval_run_id: str | None = None  # the run linked to the champion version, tried first


def champion_baseline(champion: ModelVersion | None, base_digest: str) -> Baseline:
    """The baseline of a promotion: the champion if there is one, else the base model."""
    if champion is None:
        return Baseline("base", base_digest)
    digest = champion.tags.get(MODEL_DIGEST_TAG)
    if not digest:
        raise EvidenceError(f"champion version {champion.version} has no {MODEL_DIGEST_TAG} tag (it was not "
                            "registered by sdpo): there is nothing to verify it against")
    return Baseline(champion.version, digest, champion.tags.get(EVAL_RUN_TAG))


def _baseline_run(client: MlflowClient, baseline: Baseline, units_key: str, experiment_ids: list[str]) -> str:
    if baseline.eval_run_id:
        try:
            run = client.get_run(baseline.eval_run_id)
        except MlflowException:
            run = None
        if run is not None and _is_evaluation(run) and run.data.tags.get(runs.TAG_UNITS_KEY) == units_key \
                and run.data.tags.get(runs.TAG_MODEL_DIGEST) == baseline.digest:
            return run.info.run_id
    found = find_evaluations(client, experiment_ids, baseline.digest, units_key, max_results=1)
    if not found:
        what = "the base model" if baseline.label == "base" else f"champion version {baseline.label}"
        raise EvidenceError(f"no finished evaluation run of {what} ({baseline.digest}) with the candidate's prompts, "
                            f"seeds and settings ({runs.TAG_UNITS_KEY} {units_key}): evaluate it with the same eval "
                            "settings first")
    return found[0].info.run_id


def _reference_problems(candidate: EvalRecord, digest: str, base_digest: str, champion_digest: str | None) -> list[str]:
    if not candidate.heldout:
        return []  # no held-out deltas: a held-out guard refuses on its own
    reference = candidate.reference_digest
    if reference is None:
        return [f"{candidate.label}: held-out deltas without a recorded reference ({runs.TAG_REFERENCE_DIGEST})"]
    if reference == digest:
        return [f"{candidate.label}: the held-out reference is the candidate itself (its deltas are 0 by "
                "definition)"]
    if reference not in {base_digest, champion_digest}:
        return [f"{candidate.label}: the held-out reference {reference} is neither the base model ({base_digest}) "
                f"nor the champion ({champion_digest})"]
    return []


def _baseline_heldout(candidate: EvalRecord, baseline: EvalRecord) -> tuple[dict[str, float], list[str]]:
    """The baseline's held-out deltas against the candidate's reference: 0 when the baseline is the reference."""
    reference = candidate.reference_digest
    if reference is not None and reference == baseline.model_digest:
        return {key: 0.0 for key in candidate.heldout if key != "n_pairs"}, []
    if baseline.heldout and baseline.reference_digest != reference:
        return {}, [f"the held-out deltas of {candidate.label} (against {reference}) and {baseline.label} (against "
                    f"{baseline.reference_digest}) are not against the same reference"]
    return dict(baseline.heldout), []


def assess(client: MlflowClient, *, candidate_digest: str, eval_run_id: str, baseline: Baseline, base_digest: str,
           gate: GateConfig, experiment_ids: list[str], workdir: Path) -> Decision:
    """Check the evidence of a candidate against ``baseline`` and apply the promotion policy to it (reads only)."""
    from sdpo.eval.winrate import compare_scores, reward_means

    rewards = gate.checked_rewards()
    candidate = load_record(client, eval_run_id, workdir / "candidate", rewards)
    problems = list(candidate.problems)
    if candidate.model_digest != candidate_digest:
        problems.append(f"{candidate.label} evaluated model {candidate.model_digest}, not this version's model "
                        f"({MODEL_DIGEST_TAG} {candidate_digest})")
    if candidate_digest == base_digest:
        problems.append(f"the candidate is the base model itself ({base_digest})")
    champion_digest = baseline.digest if baseline.label != "base" else None
    problems += _reference_problems(candidate, candidate_digest, base_digest, champion_digest)
    experiments = list(dict.fromkeys([*experiment_ids, candidate.experiment_id]))
    base_run = _baseline_run(client, baseline, candidate.units_key, experiments)
    reference = load_record(client, base_run, workdir / "baseline", rewards)
    problems += reference.problems
    baseline_heldout, mismatch = _baseline_heldout(candidate, reference)
    problems += mismatch
    problems += rescore(client, candidate, gate, rewards) + rescore(client, reference, gate, rewards)
    names = (f"{candidate.label} (candidate)", f"{reference.label} ({baseline.label})")
    try:
        compare = compare_scores((candidate.manifest, candidate.rows), (reference.manifest, reference.rows), names,
                                 bootstrap_samples=gate.bootstrap_samples, seed=gate.seed)
        scored = [n for n in candidate.manifest.get("rewards", []) if n in reference.manifest.get("rewards", [])]
        compare["metrics_candidate"] = {
            "rewards": {n: {"mean": m} for n, m in reward_means(candidate.rows, scored).items()},
            "heldout": candidate.heldout}
        compare["metrics_baseline"] = {
            "rewards": {n: {"mean": m} for n, m in reward_means(reference.rows, scored).items()},
            "heldout": baseline_heldout}
    except DataError as err:
        raise EvidenceError(str(err)) from None
    decision = decide(compare, primary_reward=gate.primary_reward, min_win_rate_lower=gate.min_win_rate_lower,
                      guards=gate.guards, problems=problems)
    decision.details.update(candidate_eval_run=candidate.run_id, baseline_eval_run=reference.run_id,
                            baseline_version=baseline.label, baseline_digest=baseline.digest,
                            reference_digest=candidate.reference_digest, base_digest=base_digest,
                            rescored=min(gate.rescore_samples, len(candidate.rows)))
    return decision
