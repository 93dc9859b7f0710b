"""The promotion rule, as a pure function of a comparison (``sdpo.eval.winrate.compare_eval_dirs`` output).

Promote only when the evidence checked out (``problems`` empty: see :mod:`sdpo.tracking.gate`), the primary
reward's paired win rate is confidently above the threshold (its bootstrap ``ci_low`` strictly greater) and no
guard metric regresses beyond its tolerance. Anything missing or not a number refuses: the registry never promotes
on incomplete evidence.

Guard names are flat keys over an evaluation ``metrics.json``:

- ``heldout_<field>_delta`` -> ``metrics["heldout"]["<field>_delta"]``, lower is better (error deltas against
  the reference model, e.g. ``heldout_winner_delta``, ``heldout_loser_delta``);
- ``reward_<name>_mean`` -> ``metrics["rewards"]["<name>"]["mean"]``, higher is better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Decision:
    """Outcome of the promotion rule; ``details`` holds the numbers behind ``reason``."""

    promote: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when missing, not numeric or NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def guard_value(metrics: dict[str, Any] | None, guard: str) -> tuple[float | None, bool]:
    """Read guard metric ``guard`` from a ``metrics.json`` dict: (value or None, lower_is_better).

    Raises ValueError for a guard name that follows neither naming pattern.
    """
    metrics = metrics or {}
    if guard.startswith("heldout_") and guard.endswith("_delta"):
        heldout = metrics.get("heldout")
        key = guard.removeprefix("heldout_")
        return _number(heldout.get(key) if isinstance(heldout, dict) else None), True
    if guard.startswith("reward_") and guard.endswith("_mean"):
        rewards = metrics.get("rewards")
        name = guard.removeprefix("reward_").removesuffix("_mean")
        entry = rewards.get(name) if isinstance(rewards, dict) else None
        return _number(entry.get("mean") if isinstance(entry, dict) else None), False
    raise ValueError(f"unknown guard {guard!r}: expected heldout_<field>_delta or reward_<name>_mean")


def _check_guard(compare: dict[str, Any], guard: str, tolerance: float) -> tuple[dict[str, Any], str | None]:
    """Details of one guard and the refusal reason it gives (None when it passes)."""
    try:
        candidate, lower_is_better = guard_value(compare.get("metrics_candidate"), guard)
        baseline, _ = guard_value(compare.get("metrics_baseline"), guard)
    except ValueError as err:
        return {"tolerance": tolerance}, str(err)
    detail: dict[str, Any] = {"candidate": candidate, "baseline": baseline, "tolerance": tolerance}
    if candidate is None or baseline is None:
        side = "candidate" if candidate is None else "baseline"
        return detail, f"guard {guard}: missing or not a number in the {side} metrics"
    regression = candidate - baseline if lower_is_better else baseline - candidate
    detail.update(regression=regression, lower_is_better=lower_is_better)
    if regression > tolerance:
        return detail, (
            f"guard {guard} regressed by {regression:.4g} (> tolerance {tolerance:g}): "
            f"candidate {candidate:.4g} vs baseline {baseline:.4g}"
        )
    return detail, None


def decide(
    compare: dict[str, Any] | None,
    *,
    primary_reward: str,
    min_win_rate_lower: float,
    guards: dict[str, float],
    problems: list[str] | tuple[str, ...] = (),
) -> Decision:
    """Apply the promotion rule to a comparison of candidate vs baseline evaluations (pure; no I/O).

    ``problems`` are what the evidence checks found wrong; each one refuses and is reported first.
    """
    details: dict[str, Any] = {"primary_reward": primary_reward, "min_win_rate_lower": min_win_rate_lower,
                               "problems": list(problems)}
    if not compare:
        return Decision(False, "; ".join([*problems, "empty comparison: nothing to decide on"]), details)
    details.update(candidate=compare.get("candidate"), baseline=compare.get("baseline"), n=compare.get("n"))
    reasons: list[str] = [f"evidence: {problem}" for problem in problems]

    rewards = compare.get("rewards")
    primary = rewards.get(primary_reward) if isinstance(rewards, dict) else None
    if not isinstance(primary, dict):
        available = sorted(rewards) if isinstance(rewards, dict) else []
        reasons.append(f"primary reward {primary_reward!r} missing from the comparison (available: {available})")
    else:
        win_rate, ci_low = _number(primary.get("win_rate")), _number(primary.get("ci_low"))
        details.update(win_rate=win_rate, ci_low=ci_low, ci_high=_number(primary.get("ci_high")))
        if win_rate is None or ci_low is None:
            reasons.append(f"primary reward {primary_reward!r}: win_rate or ci_low missing or not a number")
        elif ci_low <= min_win_rate_lower:
            reasons.append(
                f"{primary_reward} win rate {win_rate:.3f} (CI low {ci_low:.3f}) "
                f"is not confidently above {min_win_rate_lower:g}"
            )

    details["guards"] = {}
    for guard, tolerance in sorted(guards.items()):
        details["guards"][guard], reason = _check_guard(compare, guard, tolerance)
        if reason:
            reasons.append(reason)

    if reasons:
        return Decision(False, "; ".join(reasons), details)
    return Decision(
        True,
        f"{primary_reward} win rate {details['win_rate']:.3f} (CI low {details['ci_low']:.3f}) "
        f"> {min_win_rate_lower:g}; guards within tolerance",
        details,
    )
