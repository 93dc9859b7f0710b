"""The promotion rule on crafted comparisons (pure: no MLflow)."""

from __future__ import annotations

import copy
import math

import pytest

from sdpo.tracking.policy import decide, guard_value

POLICY = {"primary_reward": "synthetic", "min_win_rate_lower": 0.5, "guards": {"heldout_winner_delta": 0.002}}


def _compare(ci_low: float = 0.62, winner_delta: float = -0.004, baseline_winner_delta: float = -0.003) -> dict:
    reward = {"win_rate": 0.7, "ci_low": ci_low, "ci_high": 0.78, "wins": 45, "ties": 0, "losses": 19}
    return {
        "candidate": "eval/dpo-sdpo",
        "baseline": "eval/base",
        "n": 64,
        "rewards": {"synthetic": {**reward, "mean_candidate": -1.9, "mean_baseline": -2.3}},
        "metrics_candidate": {
            "rewards": {"synthetic": {"mean": -1.9, "ci_low": -2.0, "ci_high": -1.8, "n": 64}},
            "heldout": {"winner_delta": winner_delta, "loser_delta": 0.001, "n_pairs": 64},
        },
        "metrics_baseline": {
            "rewards": {"synthetic": {"mean": -2.3, "ci_low": -2.4, "ci_high": -2.2, "n": 64}},
            "heldout": {"winner_delta": baseline_winner_delta, "loser_delta": 0.0, "n_pairs": 64},
        },
    }


def test_clear_win_within_guards_promotes() -> None:
    decision = decide(_compare(), **POLICY)
    assert decision.promote
    assert "0.620" in decision.reason
    assert decision.details["ci_low"] == 0.62
    assert decision.details["guards"]["heldout_winner_delta"]["regression"] == pytest.approx(-0.001)


@pytest.mark.parametrize("ci_low", [0.5, 0.49, 0.0])
def test_lower_bound_at_or_below_threshold_does_not_promote(ci_low: float) -> None:
    decision = decide(_compare(ci_low=ci_low), **POLICY)
    assert not decision.promote
    assert "not confidently above 0.5" in decision.reason


def test_lower_bound_just_above_threshold_promotes() -> None:
    assert decide(_compare(ci_low=0.5000001), **POLICY).promote


@pytest.mark.parametrize("compare", [{}, None])
def test_empty_comparison_never_promotes(compare: dict | None) -> None:
    decision = decide(compare, **POLICY)
    assert not decision.promote
    assert "empty comparison" in decision.reason


def test_missing_primary_reward_names_it_and_what_exists() -> None:
    decision = decide(_compare(), **{**POLICY, "primary_reward": "pickscore"})
    assert not decision.promote
    assert "'pickscore' missing" in decision.reason
    assert "synthetic" in decision.reason


@pytest.mark.parametrize("field", ["win_rate", "ci_low"])
@pytest.mark.parametrize("bad", [math.nan, None, "0.7"])
def test_non_numeric_primary_never_promotes(field: str, bad: object) -> None:
    compare = _compare()
    compare["rewards"]["synthetic"][field] = bad
    decision = decide(compare, **POLICY)
    assert not decision.promote
    assert "missing or not a number" in decision.reason


@pytest.mark.parametrize("side", ["metrics_candidate", "metrics_baseline"])
def test_missing_guard_metric_never_promotes(side: str) -> None:
    compare = _compare()
    del compare[side]["heldout"]
    decision = decide(compare, **POLICY)
    assert not decision.promote
    assert f"heldout_winner_delta: missing or not a number in the {side.split('_')[1]}" in decision.reason


def test_nan_guard_metric_never_promotes() -> None:
    decision = decide(_compare(winner_delta=math.nan), **POLICY)
    assert not decision.promote
    assert "heldout_winner_delta" in decision.reason


def test_guard_regression_beyond_tolerance_blocks_and_says_by_how_much() -> None:
    # lower is better for held-out error deltas: +0.001 -> +0.004 is a 0.003 regression (> 0.002)
    decision = decide(_compare(winner_delta=0.004, baseline_winner_delta=0.001), **POLICY)
    assert not decision.promote
    assert "guard heldout_winner_delta regressed by 0.003" in decision.reason
    assert decision.details["guards"]["heldout_winner_delta"]["regression"] == pytest.approx(0.003)


def test_guard_regression_within_tolerance_passes() -> None:
    assert decide(_compare(winner_delta=0.0025, baseline_winner_delta=0.001), **POLICY).promote


def test_reward_guard_is_higher_is_better() -> None:
    guards = {"reward_synthetic_mean": 0.1}
    compare = _compare()
    assert decide(compare, **{**POLICY, "guards": guards}).promote  # -1.9 vs -2.3: better
    worse = copy.deepcopy(compare)
    worse["metrics_candidate"]["rewards"]["synthetic"]["mean"] = -2.5  # 0.2 worse than the baseline
    decision = decide(worse, **{**POLICY, "guards": guards})
    assert not decision.promote
    assert "reward_synthetic_mean regressed by 0.2" in decision.reason


def test_every_failure_is_reported() -> None:
    decision = decide(_compare(ci_low=0.3, winner_delta=0.01), **POLICY)
    assert not decision.promote
    assert "not confidently above" in decision.reason and "regressed" in decision.reason


def test_unknown_guard_name_never_promotes() -> None:
    decision = decide(_compare(), **{**POLICY, "guards": {"fid": 1.0}})
    assert not decision.promote
    assert "unknown guard 'fid'" in decision.reason


def test_guard_value_reads_flat_names() -> None:
    metrics = _compare()["metrics_candidate"]
    assert guard_value(metrics, "heldout_loser_delta") == (0.001, True)
    assert guard_value(metrics, "reward_synthetic_mean") == (-1.9, False)
    assert guard_value(metrics, "reward_pickscore_mean") == (None, False)
