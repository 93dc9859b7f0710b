"""What a run shows a person: the Metaflow card (grids, curves, reward table, decision) and the closing summary."""

from __future__ import annotations

from typing import Any

from sdpo import fs
from sdpo.layout import BASE_ARM, RunLayout


def comparison_summary(result: dict[str, Any]) -> dict[str, Any]:
    """A compare stage result as the run keeps it: per reward the win rate and its interval (no per-prompt rows),
    for the headline prompt set and, under ``prompt_sets``, for each further set."""
    def win_rates(rewards: dict[str, dict]) -> dict[str, dict]:
        return {reward: {k: v for k, v in stats.items() if k != "per_prompt"} for reward, stats in rewards.items()}

    return {**win_rates(result["rewards"]),
            "prompt_sets": {name: win_rates(entry["rewards"]) for name, entry in result.get("prompt_sets", {}).items()}}


def reward_rows(arm_metrics: dict[str, dict], comparison: dict[str, dict]) -> list[list[str]]:
    """Rows: arm, prompts, reward, mean [95% CI], win rate vs base [95% CI], held-out winner / loser deltas.

    The headline prompt set first (``metrics["rewards"]``, ``comparison[arm][reward]``), then each further set
    (``metrics["prompt_sets"][name]``, ``comparison[arm]["prompt_sets"][name]``); the held-out deltas, which do not
    depend on prompts, are on the headline rows only.
    """
    rows = []
    for arm in sorted(arm_metrics):
        metrics = arm_metrics[arm]
        heldout = metrics.get("heldout") or {}
        sets = [(str(metrics.get("prompts", "eval")), metrics.get("rewards", {}), comparison.get(arm, {}), heldout)]
        sets += [(name, entry.get("rewards", {}), comparison.get(arm, {}).get("prompt_sets", {}).get(name, {}), {})
                 for name, entry in sorted((metrics.get("prompt_sets") or {}).items())]
        for label, rewards, versus, deltas in sets:
            for reward, stats in sorted(rewards.items()):
                vs = versus.get(reward)
                win = f"{vs['win_rate']:.3f} [{vs['ci_low']:.3f}, {vs['ci_high']:.3f}]" if vs else "(baseline)"
                rows.append([
                    arm,
                    label,
                    reward,
                    f"{stats['mean']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]",
                    win,
                    _fmt(deltas.get("winner_delta")),
                    _fmt(deltas.get("loser_delta")),
                ])
    return rows


REWARD_HEADERS = ["arm", "prompts", "reward", "mean [95% CI]", "win rate vs base [95% CI]", "held-out m_w - r_w",
                  "held-out m_l - r_l"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:+.5f}"


ARM_COLOURS = "category10"  # one distinct hue per arm, the same in every chart of the card
_VEGA = "https://vega.github.io/schema/vega-lite/v5.json"
_LEGEND = {"labelFontSize": 12, "titleFontSize": 12, "orient": "right"}


def _line_chart(rows: list[dict[str, Any]], fields: dict[str, str], title: str, y_title: str) -> dict[str, Any]:
    """Lines over training steps: colour = arm, dash = series (``fields`` maps metric -> series label), y = 0 ruled."""
    values = [{"step": r["step"], "arm": r["arm"], "series": label, "value": r[f]}
              for r in rows for f, label in fields.items() if f in r]
    line: dict[str, Any] = {
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "step", "type": "quantitative", "title": "training step"},
            "y": {"field": "value", "type": "quantitative", "title": y_title},
            "color": {"field": "arm", "type": "nominal", "scale": {"scheme": ARM_COLOURS},
                      "legend": {"title": "arm", **_LEGEND}},
        },
    }
    if len(fields) > 1:
        line["encoding"]["strokeDash"] = {"field": "series", "type": "nominal", "legend": {"title": None, **_LEGEND}}
    zero = {"mark": {"type": "rule", "color": "gray", "strokeDash": [2, 2]}, "encoding": {"y": {"datum": 0}}}
    return {"$schema": _VEGA, "title": title, "width": 480, "height": 240, "data": {"values": values},
            "layer": [line, zero]}


def _histogram(values: list[dict[str, Any]], title: str) -> dict[str, Any]:
    return {
        "$schema": _VEGA,
        "title": title,
        "width": 480,
        "height": 200,
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "x": {"field": "lambda", "bin": {"maxbins": 20, "extent": [0, 1]}, "type": "quantitative",
                  "title": "lambda (scale of the loser's gradient; 1 = plain objective)",
                  "axis": {"labelAngle": 0, "format": ".1f", "tickCount": 6}},
            "y": {"aggregate": "count", "type": "quantitative", "title": "logged windows"},
            "color": {"field": "arm", "type": "nominal", "scale": {"scheme": ARM_COLOURS},
                      "legend": {"title": "arm", **_LEGEND}},
        },
    }


def decision_text(registration: dict[str, Any]) -> str:
    decision = registration["decision"]
    verdict = "promoted to **champion**" if decision["promote"] else "kept as **challenger**"
    return f"`{registration['name']}` version {registration['version']}: {verdict}. Reason: {decision['reason']}"


def card_components(layout: RunLayout, arms: list[str], arm_metrics: dict[str, dict],
                    comparison: dict[str, dict], registration: dict[str, Any]) -> list[Any]:
    """Metaflow card components for the run report (curves and sample grids read from the layout's root)."""
    from metaflow.cards import Image, Markdown, Table, VegaChart

    parts: list[Any] = [Markdown("# Diffusion-SDPO run"), Markdown(f"Run root: `{layout.root}`")]
    parts.append(Markdown("## Rewards and held-out error deltas"))
    parts.append(Table(reward_rows(arm_metrics, comparison), headers=REWARD_HEADERS))
    parts.append(Markdown("## Promotion\n" + decision_text(registration)))
    curves, heldout, lambdas = [], [], []
    for arm in sorted(a for a in arms if a != BASE_ARM):
        rows = fs.read_jsonl(layout.training_file(arm, "metrics.jsonl"))
        curves += [{"arm": arm, **r} for r in rows]
        heldout += [{"arm": arm, **r} for r in fs.read_jsonl(layout.training_file(arm, "heldout.jsonl"))]
        lambdas += [{"arm": arm, "lambda": r["lambda_mean"]} for r in rows if "lambda_mean" in r]
    deltas = {"heldout_winner_delta": "winner (m_w - r_w)", "heldout_loser_delta": "loser (m_l - r_l)"}
    if heldout:
        parts.append(Markdown("## Held-out winner / loser error vs the reference (below 0 = better)"))
        parts.append(VegaChart(_line_chart(heldout, deltas, "held-out error deltas", "error - reference error")))
    if curves:
        # the implicit accuracy is left out: it saturates at 1.0 within a few steps and then says nothing
        parts.append(Markdown("## Training curves"))
        batch = {"winner_delta": "winner (m_w - r_w)", "loser_delta": "loser (m_l - r_l)"}
        parts.append(VegaChart(_line_chart(curves, batch, "training-batch error deltas", "error - reference error")))
        parts.append(VegaChart(_line_chart(curves, {"loss": "loss"}, "preference loss", "loss")))
    if lambdas:
        parts.append(VegaChart(_histogram(lambdas, "safeguard lambda (per logged window)")))
    parts.append(Markdown("## Samples (rows: prompts, columns: sampling seeds)"))
    for arm in sorted(arms):
        grids = [("", fs.join(layout.evals(arm), "grid.png"))]
        grids += [(f", prompt set {name}", fs.join(layout.eval_set(arm, name), "grid.png"))
                  for name in sorted(arm_metrics.get(arm, {}).get("prompt_sets") or {})]
        for suffix, grid in grids:
            if fs.exists(grid):
                parts.append(Markdown(f"### {arm}{suffix}"))
                parts.append(Image(src=fs.read_bytes(grid), label=f"{arm}{suffix}"))
    return parts


def summary_text(layout: RunLayout, arms: list[str], arm_metrics: dict[str, dict], comparison: dict[str, dict],
                 registration: dict[str, Any], tracking_uri: str, *, run_id: str | None = None,
                 elapsed: float | None = None) -> str:
    """The few lines a run ends with: where things are, the reward table, the registry decision."""
    from tabulate import tabulate

    alias = "champion" if registration["decision"]["promote"] else "challenger"
    out = [
        "",
        "=== Diffusion-SDPO run ===",
        f"run root: {layout.root}",
        *[f"model {arm}: {layout.model(arm)}" for arm in sorted(arms) if arm != BASE_ARM],
        f"MLflow: {tracking_uri}  (UI: make mlflow-ui, then http://127.0.0.1:5000)",
        f"registry: {decision_text(registration).replace('**', '')}",
        f"load it: mlflow.pyfunc.load_model('models:/{registration['name']}@{alias}')",
    ]
    if run_id is not None:
        out.append(f"report card: python flows/sdpo_flow.py card view {run_id}/register --id report")
    out += ["", tabulate(reward_rows(arm_metrics, comparison), headers=REWARD_HEADERS, disable_numparse=True)]
    if elapsed is not None:
        out.append(f"\nwall time: {elapsed:.0f}s")
    return "\n".join(out)
