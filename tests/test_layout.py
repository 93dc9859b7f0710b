"""dvc.yaml, the flow and the stages share one run layout: every path dvc.yaml names is one the layout defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sdpo.config import load_config
from sdpo.layout import BASE_ARM, SPLITS, RunLayout

ROOT = Path(__file__).resolve().parents[1]


def _paths(entries) -> list[str]:
    out = []
    for entry in entries or []:
        out += list(entry) if isinstance(entry, dict) else [entry]
    return out


def _render(text: str, params: dict, key: str | None) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "key":
            return key
        node = params
        for part in name.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def dvc_paths() -> set[str]:
    """Every dependency, output, metric and plot path of dvc.yaml, with params and foreach keys filled in."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = load_config(ROOT / "params.yaml").model_dump(mode="json")
    found: set[str] = set()
    for stage in spec["stages"].values():
        keys = list(params["train"]["variants"]) if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for key in keys:
            for section in ("deps", "outs", "metrics", "plots"):
                found |= {_render(p, params, key) for p in _paths(body.get(section))}
    for plot in spec.get("plots", []):
        for definition in plot.values():
            found |= {_render(p, params, None) for p in definition["y"]}
    return found


def layout_paths(layout: RunLayout, arms: list[str]) -> set[str]:
    """Every path the layout defines for these arms (and what dvc.yaml may name inside them)."""
    paths = {layout.reports(), layout.report("registry.json"), layout.report("promotion.json"), layout.base_dir(),
             layout.report("promotion_summary.json"), layout.reward_model("preference")}
    for split in SPLITS:
        paths |= {layout.raw(split), layout.shards(split), layout.manifest(split), layout.cache(split)}
    for arm in [*arms, BASE_ARM]:
        evals = layout.evals(arm)
        paths |= {layout.model(arm), layout.checkpoints(arm), layout.compare_report(arm), layout.eval_sets(arm),
                  *(f"{evals}/{name}" for name in ("images", "scores.jsonl", "manifest.json", "grid.png",
                                                   "summary.json", "metrics.json")),
                  *(layout.training_file(arm, name) for name in ("metrics.jsonl", "heldout.jsonl",
                                                                 "training_summary.json", "train_curve.json",
                                                                 "heldout_curve.json"))}
    return paths


def test_every_dvc_path_is_a_layout_path():
    cfg = load_config(ROOT / "params.yaml")
    layout = RunLayout(cfg.data.root)  # dvc.yaml paths are relative to the project, like data.root
    unknown = dvc_paths() - layout_paths(layout, list(cfg.train.variants))
    assert unknown == set(), f"dvc.yaml names paths the run layout does not define: {sorted(unknown)}"


def test_dvc_tracks_what_each_stage_publishes():
    cfg = load_config(ROOT / "params.yaml")
    layout = RunLayout(cfg.data.root)
    found = dvc_paths()
    expected = {layout.raw("train"), layout.shards("heldout"), layout.base_dir(), layout.report("promotion.json"),
                layout.report("promotion_summary.json"),
                layout.cache("train"), layout.cache("heldout"), layout.reward_model("preference")}
    for arm in cfg.train.variants:
        expected |= {layout.model(arm), layout.checkpoints(arm), f"{layout.evals(arm)}/metrics.json",
                     f"{layout.evals(arm)}/summary.json",
                     layout.compare_report(arm), layout.training_file(arm, "train_curve.json")}
    assert expected - found == set()


@pytest.mark.parametrize("root", ["s3://bucket/prefix", "/abs/root"])
def test_layout_paths_stay_under_the_root(root):
    layout = RunLayout.resolve(root)
    assert layout.model("dpo") == f"{root}/models/dpo/model"
    assert layout.shards("train") == f"{root}/shards/train"
    with pytest.raises(ValueError, match="folder name"):
        layout.model("../escape")


def test_relative_root_is_relative_to_the_project(tmp_path):
    assert RunLayout.resolve("data", tmp_path).root == str(tmp_path / "data")
