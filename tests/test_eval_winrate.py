"""Win-rate and bootstrap math on crafted inputs, and comparison of crafted evaluation folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sdpo.errors import DataError
from sdpo.eval.winrate import bootstrap_ci, compare_eval_dirs, paired_win_rate, per_prompt_win_rates


def test_all_wins_is_one_with_degenerate_interval() -> None:
    result = paired_win_rate([2.0, 3.0, 4.0], [1.0, 1.0, 1.0], bootstrap_samples=200)
    assert result["win_rate"] == 1.0
    assert (result["ci_low"], result["ci_high"]) == (1.0, 1.0)
    assert (result["wins"], result["ties"], result["losses"]) == (3, 0, 0)


def test_identical_scores_are_all_ties() -> None:
    scores = np.linspace(-1, 1, 7)
    result = paired_win_rate(scores, scores.copy(), bootstrap_samples=200)
    assert result["win_rate"] == 0.5
    assert (result["ci_low"], result["ci_high"]) == (0.5, 0.5)
    assert (result["wins"], result["ties"], result["losses"]) == (0, 7, 0)
    assert result["mean_difference"] == 0.0


def test_crafted_mix_of_wins_ties_losses() -> None:
    result = paired_win_rate([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], bootstrap_samples=500, seed=1)
    assert result["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["mean_candidate"] == pytest.approx(2.0)
    assert result["mean_baseline"] == pytest.approx(1.25)
    assert result["mean_difference"] == pytest.approx(0.75)
    assert 0.0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1.0


def test_bootstrap_matches_exact_bootstrap_distribution() -> None:
    # Resampling [0, 0, 1, 1, 1] gives mean = K / 5 with K ~ Binomial(5, 0.6), computed here independently.
    cdf = np.cumsum([math.comb(5, k) * 0.6**k * 0.4 ** (5 - k) for k in range(6)])
    exact_low = np.searchsorted(cdf, 0.025) / 5  # first K whose cdf reaches 2.5%
    exact_high = np.searchsorted(cdf, 0.975) / 5
    assert (exact_low, exact_high) == (0.2, 1.0)
    assert bootstrap_ci([0, 0, 1, 1, 1], n=20000, seed=3) == (exact_low, exact_high)


def test_bootstrap_agrees_with_normal_approximation_for_many_units() -> None:
    values = np.random.default_rng(7).normal(size=2000)
    low, high = bootstrap_ci(values, n=2000, seed=0)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half_width, abs=0.15 * half_width)
    assert high == pytest.approx(values.mean() + half_width, abs=0.15 * half_width)


def test_bootstrap_is_seeded_and_alpha_controls_width() -> None:
    values = np.arange(50.0)
    assert bootstrap_ci(values, 300, seed=5) == bootstrap_ci(values, 300, seed=5)
    assert bootstrap_ci(values, 300, seed=5) != bootstrap_ci(values, 300, seed=6)
    wide, narrow = bootstrap_ci(values, 2000, 0, alpha=0.01), bootstrap_ci(values, 2000, 0, alpha=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        paired_win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_win_rate([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([], 10, 0)


def test_per_prompt_rates_average_over_seeds() -> None:
    rows = per_prompt_win_rates(
        np.array([1.0, 1.0, 0.0, 5.0]), np.array([0.0, 1.0, 1.0, 1.0]), np.array([0, 0, 1, 1]), ["p0", "p1"]
    )
    assert rows == [
        {"prompt_index": 0, "prompt": "p0", "win_rate": 0.75, "mean_difference": 0.5, "n": 2},
        {"prompt_index": 1, "prompt": "p1", "win_rate": 0.5, "mean_difference": 1.5, "n": 2},
    ]


SETTINGS = {"scheduler": "ddim", "scheduler_class": "DDIMScheduler", "num_inference_steps": 2, "guidance_scale": 1.0}


def write_eval_dir(folder: Path, scores: list[float], *, prompts=("p0", "p1"), seeds=(1, 2), **settings) -> Path:
    """A minimal evaluation folder as `sdpo evaluate` writes it (images are not needed to compare)."""
    folder.mkdir(parents=True)
    manifest = {
        "prompts": list(prompts),
        "seeds": list(seeds),
        "settings": {**SETTINGS, "resolution": 16, **settings},
        "rewards": ["synthetic"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    units = [(i, s) for i in range(len(prompts)) for s in seeds]
    rows = [
        {"prompt": prompts[i], "prompt_index": i, "seed": s, "image": "x.png", "scores": {"synthetic": v}}
        for (i, s), v in zip(units, scores, strict=True)
    ]
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.json").write_text(json.dumps({"rewards": {"synthetic": {"mean": float(np.mean(scores))}}}))
    return folder


def test_compare_crafted_folders(tmp_path: Path) -> None:
    a = write_eval_dir(tmp_path / "a", [1.0, 2.0, 3.0, 0.0])
    b = write_eval_dir(tmp_path / "b", [0.0, 2.0, 4.0, -1.0])
    result = compare_eval_dirs(a, b, bootstrap_samples=100)
    assert result["n"] == 4 and result["candidate"] == str(a) and result["baseline"] == str(b)
    synthetic = result["rewards"]["synthetic"]
    assert synthetic["win_rate"] == pytest.approx(2.5 / 4)
    assert (synthetic["wins"], synthetic["ties"], synthetic["losses"]) == (2, 1, 1)
    assert [p["win_rate"] for p in synthetic["per_prompt"]] == [0.75, 0.5]
    assert result["metrics_candidate"]["rewards"]["synthetic"]["mean"] == 1.5
    assert result["metrics_baseline"]["rewards"]["synthetic"]["mean"] == 1.25


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seeds": (1, 3)}, r"seeds: \[1, 2\] != \[1, 3\]"),
        ({"prompts": ("p0", "other")}, r"prompts: prompt 1 is 'p1' != 'other'"),
        ({"prompts": ("p0",)}, r"prompts: 2 != 1 prompts"),
        ({"num_inference_steps": 3}, r"settings.num_inference_steps: 2 != 3"),
        ({"guidance_scale": 7.5}, r"settings.guidance_scale: 1.0 != 7.5"),
        ({"scheduler": "euler"}, r"settings.scheduler: 'ddim' != 'euler'"),
    ],
)
def test_compare_refuses_different_units(tmp_path: Path, changes: dict, message: str) -> None:
    a = write_eval_dir(tmp_path / "a", [1.0, 2.0, 3.0, 0.0])
    n = len(changes.get("prompts", "ab")) * len(changes.get("seeds", "ab"))
    b = write_eval_dir(tmp_path / "b", [0.0] * n, **changes)
    with pytest.raises(DataError, match=message):
        compare_eval_dirs(a, b)


def test_compare_refuses_unfinished_folder(tmp_path: Path) -> None:
    a = write_eval_dir(tmp_path / "a", [1.0, 2.0, 3.0, 0.0])
    b = write_eval_dir(tmp_path / "b", [1.0, 2.0, 3.0, 0.0])
    (b / "metrics.json").unlink()
    with pytest.raises(DataError, match=r"metrics.json: missing"):
        compare_eval_dirs(a, b)
    with pytest.raises(DataError, match="evaluation folder not found"):
        compare_eval_dirs(a, tmp_path / "nowhere")
