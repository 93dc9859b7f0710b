"""`sdpo experiment`: a tiny experiment (2 seeds x 2 arms, seconds-sized settings) through the CLI, its tables,
plots and intervals, resuming, and the refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sdpo import experiments as ex
from sdpo.cli import main as cli
from sdpo.config import ConfigError, EvalConfig, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dpo", "dpo-sdpo")
NAME = "tiny"


def tiny_params() -> dict[str, Any]:
    """params.yaml with sizes cut so that one seed run takes seconds (as tests/test_dvc.py does)."""
    params = parse_yaml((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"].update(train_pairs=32, heldout_pairs=16)
    params["model"]["toy"].update(vae_steps=5, unet_steps=5, batch_size=8)
    params["train"].update(steps=3, batch_size=4, log_every=1, heldout_every=1, heldout_pairs=8)
    params["eval"].update(seeds_per_prompt=2, num_inference_steps=2, bootstrap_samples=50, heldout_pairs=8)
    params["eval"]["prompt_sets"]["train"]["seeds_per_prompt"] = 1
    params["eval"]["preference_model"]["steps"] = 20
    assert tuple(params["train"]["variants"]) == ARMS, "the test expects the default variants"
    return params


def run(config: Path, *args: str) -> int:
    return cli(["experiment", "--config", str(config), "--name", NAME, *args])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("experiment")
    config = work / "params.yaml"
    params = tiny_params()
    params["train"].update(checkpoint_every=1, keep_checkpoints=0)  # scored at steps 1 and 2 (3 is the model)
    config.write_text(yaml.safe_dump(params, sort_keys=False))
    assert run(config, "--seeds", "0", "1", "--checkpoint-rewards") == 0
    folder = work / "data" / "experiments" / NAME
    return {"config": config, "folder": folder, "summary": json.loads((folder / "experiment.json").read_text())}


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_results_have_one_row_per_arm_and_metric(experiment):
    folder = experiment["folder"]
    rows = read_rows(folder)
    keys = [(r["table"], r["metric"], r["arm"], r["baseline"]) for r in rows]
    assert len(keys) == len(set(keys))
    # the default suite (preference, alignment and the labelling judge) on the headline prompts, then on the
    # default further prompt set (unseen seeds of the train prompts) as <reward>@train
    rewards = [*EvalConfig().rewards, *(f"{name}@train" for name in EvalConfig().rewards)]
    expected = {("reward", name, arm, "") for name in rewards for arm in ("base", *ARMS)}
    expected |= {("heldout", metric, arm, "") for metric in ex.HELDOUT_METRICS for arm in ARMS}
    expected |= {("lambda", metric, "dpo-sdpo", "") for metric in ex.LAMBDA_METRICS}  # dpo has no safeguard
    expected |= {("winrate", name, arm, baseline) for name in rewards
                 for arm, baseline in (("dpo", "base"), ("dpo-sdpo", "base"), ("dpo-sdpo", "dpo"))}
    assert set(keys) == expected

    seed0 = folder / "seed-0"
    scores = {prompt_set: (seed0 / "evals" / "dpo" / folder / "scores.jsonl").read_text().splitlines()
              for prompt_set, folder in (("", "."), ("train", "sets/train"))}
    for row in rows:
        values = [float(v) for v in row["values"].split(";")]
        mean, low, high = float(row["mean"]), float(row["ci_low"]), float(row["ci_high"])
        assert len(values) == 2 and low <= mean <= high, row
        if row["table"] == "winrate":
            assert int(row["n"]) == 2 * len(scores[row["metric"].partition("@")[2]])  # both seeds' images, pooled
            assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == int(row["n"])
        else:
            # two seeds: Student's t with 1 degree of freedom is the Cauchy distribution, whose 0.975 quantile is
            # tan(0.475 pi) = 12.706...; the interval is mean +- t * s / sqrt(2). (A rounded constant is not enough:
            # where the interval's end is near 0, its relative error shows.)
            assert int(row["n"]) == 2 and mean == pytest.approx(np.mean(values))
            half = np.tan(0.475 * np.pi) * np.std(values, ddof=1) / np.sqrt(2)
            assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6, abs=1e-12)
    # the per-seed values are the seed runs' own evaluations
    reward = next(r for r in rows if (r["table"], r["metric"], r["arm"]) == ("reward", "synthetic", "dpo"))
    evaluated = json.loads((seed0 / "evals" / "dpo" / "metrics.json").read_text())
    assert float(reward["values"].split(";")[0]) == pytest.approx(evaluated["rewards"]["synthetic"]["mean"], rel=1e-5)


def test_a_seed_changes_the_world_the_base_and_training(experiment):
    folder, summary = experiment["folder"], experiment["summary"]
    assert summary["seed_values"] == {str(s): {key: s for key in ex.SEED_KEYS} for s in (0, 1)}
    assert (folder / "seed-0" / "raw" / "train.parquet").read_bytes() != \
        (folder / "seed-1" / "raw" / "train.parquet").read_bytes()
    bases = [json.loads((folder / f"seed-{s}" / "models" / "base" / "base.json").read_text())["digest"] for s in (0, 1)]
    assert bases[0] != bases[1]
    assert all(summary["ran"][str(s)] for s in (0, 1))


def test_markdown_and_plots(experiment):
    folder, summary = experiment["folder"], experiment["summary"]
    text = (folder / "results.md").read_text()
    for heading in ("## synthetic (reward)", "### synthetic: paired win rates", "## heldout_winner_delta",
                    "## alignment (reward, prompt set `train`)", "### alignment, prompt set `train`: paired win rates",
                    "## heldout_loser_delta", "## lambda_mean", "## lambda_frac_clipped", "## lambda_frac_nonpositive"):
        assert heading in text
    assert "| dpo-sdpo | dpo  |" in text and "95% t-interval" in text and "95% bootstrap" in text
    plots = [p for p in summary["outputs"] if p.startswith("plots/")]
    groups = {(r["table"], r["metric"]) for r in read_rows(folder)}
    curve_plots = {"plots/curves-heldout.png", "plots/curves-lambda.png", "plots/curves-rewards.png",
                   "plots/curves-rewards-train.png"}
    assert {f"plots/{t}-{m}.png" for t, m in groups} | curve_plots == set(plots)
    for plot in plots:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in text
    curves = list(csv.DictReader((folder / "curves.csv").open()))
    steps = {(c["seed"], c["arm"], c["metric"]): set() for c in curves}
    for c in curves:
        steps[(c["seed"], c["arm"], c["metric"])].add(int(c["step"]))
    assert steps[("1", "dpo", "heldout_winner_delta")] == {1, 2, 3}
    assert ("0", "dpo-sdpo", "lambda_mean") in steps and ("0", "dpo", "lambda_mean") not in steps


def test_every_checkpoint_is_scored_for_reward_curves(experiment):
    """--checkpoint-rewards: each reward at step 0 (the base), at each kept checkpoint and at the last step (the
    arm's model), per seed, prompt set and arm; the checkpoints' evaluations are whole evaluation folders."""
    folder = experiment["folder"]
    curves = list(csv.DictReader((folder / "curves.csv").open()))
    rewards = EvalConfig().rewards
    for seed in (0, 1):
        evals = folder / f"seed-{seed}" / "evals"
        for arm in ARMS:
            scored = folder / f"seed-{seed}" / "evals-over-steps" / arm
            assert sorted(p.name for p in scored.iterdir() if p.is_dir()) == ["step-0000001", "step-0000002"]
            for metric in [*rewards, *(f"{r}@train" for r in rewards)]:
                got = {int(c["step"]): float(c["value"]) for c in curves
                       if (c["seed"], c["arm"], c["metric"]) == (str(seed), arm, metric)}
                assert sorted(got) == [0, 1, 2, 3], (seed, arm, metric)
                reward, _, prompt_set = metric.partition("@")
                where = Path("sets", prompt_set) if prompt_set else Path()
                for step, source in ((0, evals / "base"), (2, scored / "step-0000002"), (3, evals / arm)):
                    stats = json.loads((source / where / "metrics.json").read_text())["rewards"][reward]
                    assert got[step] == pytest.approx(stats["mean"]), (seed, arm, metric, step)
    # a checkpoint's model is not the final one: its images differ
    seed0 = folder / "seed-0"
    assert (seed0 / "evals-over-steps" / "dpo" / "step-0000001" / "scores.jsonl").read_text() != \
        (seed0 / "evals" / "dpo" / "scores.jsonl").read_text()
    text = (folder / "results.md").read_text()
    assert "## Rewards over training (mean over seeds; step 0 is the base)" in text
    assert "## Rewards over training, prompt set `train`" in text


def test_rewards_over_the_steps_are_charted_in_the_training_run(experiment):
    """The checkpoints' and the final model's reward means land in the arm's MLflow training run, one point per
    step, equal to the evaluations' own."""
    from sdpo.tracking.runs import client

    store = client()
    seed1 = experiment["folder"] / "seed-1"
    run_id = json.loads((seed1 / "models" / "dpo-sdpo" / "training_summary.json").read_text())["mlflow_run_id"]
    assert store.get_run(run_id).info.run_name == "train-dpo-sdpo"
    sources = {1: seed1 / "evals-over-steps" / "dpo-sdpo" / "step-0000001",
               2: seed1 / "evals-over-steps" / "dpo-sdpo" / "step-0000002", 3: seed1 / "evals" / "dpo-sdpo"}
    for reward in EvalConfig().rewards:
        for key, where in ((f"eval.{reward}", Path()), (f"eval.train.{reward}", Path("sets", "train"))):
            history = {m.step: m.value for m in store.get_metric_history(run_id, key)}
            expected = {step: json.loads((source / where / "metrics.json").read_text())["rewards"][reward]["mean"]
                        for step, source in sources.items()}
            assert history == pytest.approx(expected), key


def test_checkpoint_rewards_need_every_checkpoint_kept(tmp_path, capsys):
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))  # checkpoints only at the end
    assert run(config, "--seeds", "0", "1", "--checkpoint-rewards") == 2
    err = capsys.readouterr().err
    assert "arm 'dpo' writes checkpoints only at the end" in err and "train.keep_checkpoints=0" in err, err
    assert not (tmp_path / "data").exists()  # refused before any work


def test_rerun_skips_complete_seeds_and_redoes_only_what_is_missing(experiment):
    import shutil

    config, folder = experiment["config"], experiment["folder"]
    before = (folder / "results.csv").read_text()
    assert run(config, "--seeds", "0", "1", "--checkpoint-rewards") == 0
    summary = json.loads((folder / "experiment.json").read_text())
    assert summary["ran"] == {"0": [], "1": []}
    assert (folder / "results.csv").read_text() == before

    shutil.rmtree(folder / "seed-1" / "evals" / "dpo")
    shutil.rmtree(folder / "seed-0" / "evals-over-steps" / "dpo-sdpo" / "step-0000002")
    assert run(config, "--seeds", "0", "1", "--checkpoint-rewards") == 0
    summary = json.loads((folder / "experiment.json").read_text())
    assert summary["ran"] == {"0": ["evaluate:dpo-sdpo@2"], "1": ["evaluate:dpo", "compare:dpo"]}
    assert (folder / "results.csv").read_text() == before  # the same models, sampled on the same seeds


def test_other_settings_under_the_same_name_are_refused(experiment, capsys):
    config, folder = experiment["config"], experiment["folder"]
    record = (folder / "seed-0" / ex.SEED_RECORD).read_text()
    assert run(config, "--seeds", "0", "1", "--set", "train.steps=4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.steps (3 -> 4)" in err
    assert (folder / "seed-0" / ex.SEED_RECORD).read_text() == record


def test_a_bad_arm_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    assert run(config, "--arm", "dpo", "--arm", "nope") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--arm nope" in err and "'dpo-sdpo'" in err
    assert not (tmp_path / "data").exists()


def test_seeds_are_checked():
    for seeds in ([0], [1, 1], [-1, 2]):
        with pytest.raises(ConfigError):
            ex.check_seeds(seeds)
    assert ex.check_seeds([3, 1, 2]) == [3, 1, 2]


def test_t_interval_and_lambda_summary():
    mean, low, high = ex.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (low, high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377))
    assert ex.t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        ex.t_interval([1.0])
    rows = [{"step": 10, "lambda_mean": 1.0, "lambda_frac_clipped": 0.0},
            {"step": 20, "lambda_mean": 0.5, "lambda_frac_clipped": 0.0},
            {"step": 25, "lambda_mean": 0.0, "lambda_frac_clipped": 1.0}]  # the last row covers 5 steps
    assert ex.lambda_summary(rows) == pytest.approx({"lambda_mean": 0.6, "lambda_frac_clipped": 0.2})
    assert ex.lambda_summary([{"step": 10, "loss": 0.7}]) == {}


def test_long_horizon_recipe():
    cfg = load_config(ROOT / "experiments" / "long-horizon.yaml")
    default = load_config(ROOT / "params.yaml")
    assert 10 * default.train.steps <= cfg.train.steps <= 20 * default.train.steps  # the long horizon: 20x
    arms = {name: cfg.train.for_variant(name) for name in cfg.train.variants}
    got = {name: (t.method, t.safeguard, t.beta, t.mu if t.safeguard != "off" else None) for name, t in arms.items()}
    assert got == {
        "dpo": ("dpo", "off", 5000.0, None),
        "dpo-sdpo-mu05": ("dpo", "pair", 5000.0, 0.5),
        "dpo-sdpo-mu09": ("dpo", "pair", 5000.0, 0.9),
        "dspo": ("dspo", "off", 0.001, None),
        "dspo-sdpo": ("dspo", "pair", 0.001, 0.2),
        "dmpo": ("dmpo", "off", 2000.0, None),
        "dmpo-sdpo": ("dmpo", "pair", 2000.0, 0.9),
    }
    assert cfg.train.alpha == 0.01 and cfg.train.checkpoint_every and cfg.train.heldout_every
    assert (ROOT / "experiments" / cfg.data.root).resolve() == ROOT / "data"  # the project's own data folder


def test_colour_following_preset_changes_only_the_toy_recipe():
    cfg = load_config(ROOT / "experiments" / "colour-following.yaml")
    default = load_config(ROOT / "params.yaml")
    toy = cfg.model.toy
    assert (toy.pooled_text, toy.train_text_encoder, toy.prompt_dropout, toy.high_noise_weight,
            toy.multires_noise, toy.latent_downsample) == (True, True, 0.1, 20.0, 0.8, 2)  # measured in docs/results.md
    assert toy.unet_steps == default.model.toy.unet_steps  # the default's number of steps, on 8x8 latents
    assert cfg.train == default.train and cfg.eval == default.eval
    assert (ROOT / "experiments" / cfg.data.root).resolve() == ROOT / "data"


def test_rewards_for_a_run_in_another_tracking_store_are_not_logged_and_say_so(tmp_path, capsys):
    from sdpo import fs, stages

    ctx = stages.StageContext.from_config(load_config(ROOT / "params.yaml"), tmp_path)
    summary_uri = ctx.layout.training_file("dpo", "training_summary.json")
    fs.write_json(summary_uri, {"steps": 3, "mlflow_run_id": "0" * 32})
    metrics = {"rewards": {"alignment": {"mean": 0.5}}, "prompt_sets": {}}
    stages._log_rewards_at_step(ctx, "dpo", metrics)  # the evaluation is not lost over it
    assert f"{summary_uri}: its MLflow run {'0' * 32} is not in this tracking store" in capsys.readouterr().out
