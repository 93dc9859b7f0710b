"""The run card: charts that carry information and say what they show."""

import json
from pathlib import Path

from sdpo.layout import RunLayout
from sdpo.report import card_components, summary_text

ARMS = ["base", "dpo", "dpo-sdpo"]
METRICS = {arm: {"rewards": {name: {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 8}
                             for name in ("preference", "alignment", "synthetic")},
                 "heldout": {"winner_delta": 0.001, "loser_delta": 0.002}, "prompts": "heldout"} for arm in ARMS}
for entry in METRICS.values():
    entry["prompt_sets"] = {"train": {"prompts": "train", "rewards": entry["rewards"]}}
COMPARISON = {arm: {name: {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7} for name in ("preference", "alignment",
                                                                                        "synthetic")}
              for arm in ("dpo", "dpo-sdpo")}
REGISTRATION = {"name": "sdpo-toy", "version": "1", "decision": {"promote": True, "reason": "beats the base"}}


def _layout(tmp_path) -> RunLayout:
    layout = RunLayout(str(tmp_path))
    for arm in ("dpo", "dpo-sdpo"):
        rows = [{"step": s, "loss": 0.7 - s / 1000, "winner_delta": 0.001 * s, "loser_delta": 0.002 * s,
                 "implicit_acc": 1.0, **({"lambda_mean": 0.4} if arm == "dpo-sdpo" else {})} for s in (10, 20)]
        folder = Path(layout.train_dir(arm))
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "heldout.jsonl").write_text(
            json.dumps({"step": 20, "heldout_winner_delta": 0.001, "heldout_loser_delta": 0.002}) + "\n")
    return layout


def _charts(parts) -> list[dict]:
    from metaflow.cards import VegaChart

    return [json.loads(json.dumps(part._spec)) for part in parts if isinstance(part, VegaChart)]


def test_every_chart_labels_its_axes_and_colours_arms_alike(tmp_path):
    charts = _charts(card_components(_layout(tmp_path), ARMS, METRICS, COMPARISON, REGISTRATION))
    titles = [chart["title"] for chart in charts]
    assert titles == ["held-out error deltas", "training-batch error deltas", "preference loss",
                      "safeguard lambda (per logged window)"]
    for chart in charts:
        encoding = chart["layer"][0]["encoding"] if "layer" in chart else chart["encoding"]
        assert encoding["x"]["title"] and encoding["y"]["title"] and encoding["y"]["title"] != "value"
        assert encoding["color"]["field"] == "arm" and encoding["color"]["scale"]["scheme"] == "category10"
    assert all("implicit" not in json.dumps(chart) for chart in charts)  # saturates at 1.0: no information


def test_the_summary_lists_every_reward_of_every_arm(tmp_path):
    text = summary_text(_layout(tmp_path), ARMS, METRICS, COMPARISON, REGISTRATION, "http://mlflow", run_id="7")
    for arm in ARMS:
        for name in ("preference", "alignment", "synthetic"):
            for prompts in ("heldout", "train"):
                assert any(line.split()[:3] == [arm, prompts, name] for line in text.splitlines()), (arm, name)
    assert "card view 7/register --id report" in text
