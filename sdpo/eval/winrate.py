"""Paired win rates between two evaluation folders, with percentile-bootstrap confidence intervals.

The paired unit is one (prompt, seed) image: both models were sampled from the same prompt with the same seed, so
their scores are compared image by image. Win = 1, tie = 0.5, loss = 0; the win rate is the mean over units and
its 95% interval is a percentile bootstrap that resamples units.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from sdpo.errors import DataError

# Settings in manifest.json that must match for two folders to be comparable.
COMPARED_SETTINGS = ("scheduler", "scheduler_class", "num_inference_steps", "guidance_scale", "resolution")
# Bound the memory of one block of bootstrap resamples (indices held at once).
_MAX_RESAMPLE_CELLS = 4_000_000


def bootstrap_ci(values: np.ndarray | list[float], n: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of ``values`` from ``n`` resamples (numpy, seeded)."""
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if n < 1:
        raise ValueError(f"bootstrap_ci needs n >= 1 resamples, got {n}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    block = max(1, _MAX_RESAMPLE_CELLS // data.size)
    for start in range(0, n, block):
        count = min(block, n - start)
        means[start : start + count] = data[rng.integers(0, data.size, size=(count, data.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def win_outcomes(candidate: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per-unit outcome: 1 where candidate > baseline, 0.5 on ties, 0 where it loses."""
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if c.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {c.shape} and {b.shape}")
    if not (np.isfinite(c).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite (found NaN or inf)")
    return (c > b) + 0.5 * (c == b)


def paired_win_rate(
    candidate: np.ndarray | list[float],
    baseline: np.ndarray | list[float],
    *,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Win rate of ``candidate`` over ``baseline`` on paired scores, with a bootstrap interval over units.

    Returns ``win_rate``, ``ci_low``, ``ci_high``, ``wins``, ``ties``, ``losses``, ``mean_candidate``,
    ``mean_baseline`` and ``mean_difference`` (candidate - baseline).
    """
    outcomes = win_outcomes(np.asarray(candidate), np.asarray(baseline))
    if outcomes.size == 0:
        raise ValueError("paired_win_rate needs at least one pair")
    low, high = bootstrap_ci(outcomes, bootstrap_samples, seed, alpha)
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    return {
        "win_rate": float(outcomes.mean()),
        "ci_low": low,
        "ci_high": high,
        "wins": int((outcomes == 1).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0).sum()),
        "mean_candidate": float(c.mean()),
        "mean_baseline": float(b.mean()),
        "mean_difference": float((c - b).mean()),
    }


def per_prompt_win_rates(
    candidate: np.ndarray, baseline: np.ndarray, prompt_indices: np.ndarray, prompts: list[str]
) -> list[dict[str, Any]]:
    """Win rate (mean over seeds) and mean score difference of each prompt."""
    outcomes = win_outcomes(candidate, baseline)
    difference = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    rows = []
    for index in np.unique(prompt_indices):
        mask = prompt_indices == index
        rows.append(
            {
                "prompt_index": int(index),
                "prompt": prompts[int(index)],
                "win_rate": float(outcomes[mask].mean()),
                "mean_difference": float(difference[mask].mean()),
                "n": int(mask.sum()),
            }
        )
    return rows


# --- evaluation folders ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing; {path.parent} is not a finished evaluation folder (run `sdpo evaluate`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def read_scores(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Rows of ``scores.jsonl`` keyed by (prompt_index, seed)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; {path.parent} is not a finished evaluation folder (run `sdpo evaluate`)")
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[(int(row["prompt_index"]), int(row["seed"]))] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: line {line_number} is not a score row ({err})") from err
    return rows


def read_eval_dir(folder: str | Path) -> tuple[dict[str, Any], dict[tuple[int, int], dict[str, Any]], dict[str, Any]]:
    """(manifest, score rows keyed by (prompt_index, seed), metrics) of an evaluation folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: evaluation folder not found")
    return (
        _read_json(folder / "manifest.json"),
        read_scores(folder / "scores.jsonl"),
        _read_json(folder / "metrics.json"),
    )


def check_comparable(candidate: dict[str, Any], baseline: dict[str, Any], names: tuple[str, str]) -> None:
    """Raise :class:`DataError` naming what differs when two manifests did not sample the same units."""
    problems = []
    c_prompts, b_prompts = candidate.get("prompts", []), baseline.get("prompts", [])
    if c_prompts != b_prompts:
        if len(c_prompts) != len(b_prompts):
            problems.append(f"prompts: {len(c_prompts)} != {len(b_prompts)} prompts")
        else:
            i = next(i for i, (c, b) in enumerate(zip(c_prompts, b_prompts, strict=True)) if c != b)
            problems.append(f"prompts: prompt {i} is {c_prompts[i]!r} != {b_prompts[i]!r}")
    if candidate.get("seeds") != baseline.get("seeds"):
        problems.append(f"seeds: {candidate.get('seeds')} != {baseline.get('seeds')}")
    c_settings, b_settings = candidate.get("settings", {}), baseline.get("settings", {})
    for key in COMPARED_SETTINGS:
        if c_settings.get(key) != b_settings.get(key):
            problems.append(f"settings.{key}: {c_settings.get(key)!r} != {b_settings.get(key)!r}")
    if problems:
        raise DataError(f"cannot compare {names[0]} with {names[1]}; they differ in " + "; ".join(problems))


def units_key(manifest: dict[str, Any]) -> str:
    """``sha256:<hex>`` of what makes two evaluations comparable: prompts, seeds and the compared settings.

    Two evaluations with the same key sampled the same (prompt, seed) units the same way; the evaluation stage
    tags its MLflow run with it so that the registry finds a comparable evaluation of another model.
    """
    settings = manifest.get("settings") or {}
    spec = {"prompts": manifest.get("prompts"), "seeds": manifest.get("seeds"),
            "settings": {key: settings.get(key) for key in COMPARED_SETTINGS}}
    return "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def reward_means(rows: dict[tuple[int, int], dict[str, Any]], rewards: list[str]) -> dict[str, float]:
    """Mean score of every reward over the rows (the value ``metrics.json`` reports, re-derived from the scores)."""
    means = {}
    for name in rewards:
        try:
            values = np.array([row["scores"][name] for row in rows.values()], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"score rows: reward {name!r}: {err}") from err
        means[name] = float(values.mean()) if values.size else float("nan")
    return means


def compare_scores(
    candidate: tuple[dict[str, Any], dict[tuple[int, int], dict[str, Any]]],
    baseline: tuple[dict[str, Any], dict[tuple[int, int], dict[str, Any]]],
    names: tuple[str, str],
    *,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired win rates from two (manifest, score rows) pairs, for every reward both scored.

    Refuses (:class:`DataError`) evaluations whose prompts, seeds or generation settings differ. Returns
    ``candidate``, ``baseline`` (the two ``names``), ``n`` and ``rewards`` (per reward the fields of
    :func:`paired_win_rate` plus ``per_prompt``).
    """
    (c_manifest, c_rows), (b_manifest, b_rows) = candidate, baseline
    check_comparable(c_manifest, b_manifest, names)
    if set(c_rows) != set(b_rows):
        missing = sorted(set(c_rows) ^ set(b_rows))[:3]
        raise DataError(
            f"cannot compare {names[0]} with {names[1]}: score rows differ, e.g. (prompt_index, seed) {missing}"
        )
    rewards = [name for name in c_manifest.get("rewards", []) if name in b_manifest.get("rewards", [])]
    if not rewards:
        raise DataError(
            f"cannot compare {names[0]} with {names[1]}: no reward scored in both "
            f"({c_manifest.get('rewards')} vs {b_manifest.get('rewards')})"
        )
    units = sorted(c_rows)
    prompt_indices = np.array([index for index, _ in units])
    result: dict[str, Any] = {"candidate": names[0], "baseline": names[1], "n": len(units), "rewards": {}}
    for name in rewards:
        try:
            c = np.array([c_rows[u]["scores"][name] for u in units], dtype=np.float64)
            b = np.array([b_rows[u]["scores"][name] for u in units], dtype=np.float64)
            summary: dict[str, Any] = paired_win_rate(c, b, bootstrap_samples=bootstrap_samples, seed=seed)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"scores of {names[0]} or {names[1]}: reward {name!r}: {err}") from err
        summary["per_prompt"] = per_prompt_win_rates(c, b, prompt_indices, c_manifest["prompts"])
        result["rewards"][name] = summary
    return result


def compare_eval_dirs(
    candidate_dir: str | Path, baseline_dir: str | Path, *, bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired win rates of the candidate's images over the baseline's, for every reward both folders scored.

    Refuses (:class:`DataError`) folders whose prompts, seeds or generation settings differ. The result is
    :func:`compare_scores`' plus ``metrics_candidate`` and ``metrics_baseline`` (the folders' ``metrics.json``).
    This reads files a person can edit: it is a report; the registry's gate decides from MLflow records
    (:mod:`sdpo.tracking.gate`).
    """
    c_manifest, c_rows, c_metrics = read_eval_dir(candidate_dir)
    b_manifest, b_rows, b_metrics = read_eval_dir(baseline_dir)
    result = compare_scores((c_manifest, c_rows), (b_manifest, b_rows), (str(candidate_dir), str(baseline_dir)),
                            bootstrap_samples=bootstrap_samples, seed=seed)
    result.update(metrics_candidate=c_metrics, metrics_baseline=b_metrics)
    return result
