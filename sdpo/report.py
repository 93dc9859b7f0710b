"""What a run shows a person: the Metaflow card (grids, curves, reward table, decision) and the closing summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; empty when the file does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reward_rows(arm_metrics: dict[str, dict], comparison: dict[str, dict]) -> list[list[str]]:
    """Rows: arm, reward, mean [95% CI], win rate vs base [95% CI], held-out winner / loser deltas."""
    rows = []
    for arm in sorted(arm_metrics):
        metrics = arm_metrics[arm]
        heldout = metrics.get("heldout") or {}
        for reward, stats in sorted(metrics.get("rewards", {}).items()):
            vs = comparison.get(arm, {}).get(reward)
            win = f"{vs['win_rate']:.3f} [{vs['ci_low']:.3f}, {vs['ci_high']:.3f}]" if vs else "(baseline)"
            rows.append([
                arm,
                reward,
                f"{stats['mean']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]",
                win,
                _fmt(heldout.get("winner_delta")),
                _fmt(heldout.get("loser_delta")),
            ])
    return rows


REWARD_HEADERS = ["arm", "reward", "mean [95% CI]", "win rate vs base [95% CI]", "held-out m_w - r_w",
                  "held-out m_l - r_l"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:+.5f}"


def _line_chart(rows: list[dict[str, Any]], fields: list[str], title: str) -> dict[str, Any]:
    values = [{"step": r["step"], "series": f"{r['arm']}: {f}", "value": r[f]} for r in rows for f in fields if f in r]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title,
        "width": 420,
        "height": 220,
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "step", "type": "quantitative"},
            "y": {"field": "value", "type": "quantitative"},
            "color": {"field": "series", "type": "nominal"},
        },
    }


def _histogram(values: list[dict[str, Any]], title: str) -> dict[str, Any]:
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title,
        "width": 420,
        "height": 200,
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "x": {"field": "lambda", "bin": {"maxbins": 20}, "type": "quantitative"},
            "y": {"aggregate": "count", "type": "quantitative"},
            "color": {"field": "arm", "type": "nominal"},
        },
    }


def decision_text(registration: dict[str, Any]) -> str:
    decision = registration["decision"]
    verdict = "promoted to **champion**" if decision["promote"] else "kept as **challenger**"
    return f"`{registration['name']}` version {registration['version']}: {verdict}. Reason: {decision['reason']}"


def card_components(root: str, model_dirs: dict[str, str], eval_dirs: dict[str, str], arm_metrics: dict[str, dict],
                    comparison: dict[str, dict], registration: dict[str, Any]) -> list[Any]:
    """Metaflow card components for the run report."""
    from metaflow.cards import Image, Markdown, Table, VegaChart

    parts: list[Any] = [Markdown("# Diffusion-SDPO run"), Markdown(f"Run folder: `{root}`")]
    parts.append(Markdown("## Rewards and held-out error deltas"))
    parts.append(Table(reward_rows(arm_metrics, comparison), headers=REWARD_HEADERS))
    parts.append(Markdown("## Promotion\n" + decision_text(registration)))
    curves, heldout, lambdas = [], [], []
    for arm, model_dir in sorted(model_dirs.items()):
        run_dir = Path(model_dir).parent
        curves += [{"arm": arm, **r} for r in read_jsonl(run_dir / "metrics.jsonl")]
        heldout += [{"arm": arm, **r} for r in read_jsonl(run_dir / "heldout.jsonl")]
        lambdas += [{"arm": arm, "lambda": r["lambda_mean"]} for r in read_jsonl(run_dir / "metrics.jsonl")
                    if "lambda_mean" in r]
    if heldout:
        parts.append(Markdown("## Held-out winner / loser error vs the reference (below 0 = better)"))
        parts.append(VegaChart(_line_chart(heldout, ["heldout_winner_delta", "heldout_loser_delta"],
                                           "held-out deltas")))
    if curves:
        parts.append(Markdown("## Training curves"))
        parts.append(VegaChart(_line_chart(curves, ["winner_delta", "loser_delta"], "batch winner/loser deltas")))
        parts.append(VegaChart(_line_chart(curves, ["implicit_acc"], "implicit accuracy")))
    if lambdas:
        parts.append(VegaChart(_histogram(lambdas, "safeguard lambda (per logged window)")))
    parts.append(Markdown("## Samples (rows: prompts, columns: seeds)"))
    for arm, path in sorted(eval_dirs.items()):
        grid = Path(path) / "grid.png"
        if grid.exists():
            parts.append(Markdown(f"### {arm}"))
            parts.append(Image(src=grid.read_bytes(), label=arm))
    return parts


def summary_text(root: str, model_dirs: dict[str, str], arm_metrics: dict[str, dict], comparison: dict[str, dict],
                 registration: dict[str, Any], tracking_uri: str, elapsed: float | None = None) -> str:
    """The few lines a run ends with: where things are, the reward table, the registry decision."""
    rows = reward_rows(arm_metrics, comparison)
    widths = [max(len(str(c)) for c in col) for col in zip(REWARD_HEADERS, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    out = [
        "",
        "=== Diffusion-SDPO run ===",
        f"data and evaluations: {root}",
        *[f"model {arm}: {path}" for arm, path in sorted(model_dirs.items())],
        f"MLflow: {tracking_uri}  (UI: make mlflow-ui, then http://127.0.0.1:5000)",
        f"registry: {decision_text(registration).replace('**', '')}",
        f"load it: mlflow.pyfunc.load_model('models:/{registration['name']}@"
        f"{'champion' if registration['decision']['promote'] else 'challenger'}')",
        "",
        line(REWARD_HEADERS),
        *[line(r) for r in rows],
    ]
    if elapsed is not None:
        out.append(f"\nwall time: {elapsed:.0f}s")
    return "\n".join(out)
