"""dvc.yaml end to end: a real `dvc repro` through the `sdpo` CLI in a temporary git repository, with tiny params.

The repository's dvc.yaml, .dvcignore, .gitignore and .dvc/config are copied into a fresh git repo whose params.yaml
is the project's own, shrunk to seconds-sized settings. MLflow (the register stage) uses a SQLite store in tmp.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdpo.config import load_config, parse_yaml
from sdpo.devstack import CREDENTIALS
from sdpo.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("dpo", "dpo-sdpo")
CANDIDATE = "dpo-sdpo"
ALL_STAGES = {
    "synth", "ingest", "base", "encode", "rewards", "evaluate-base", "register",
    *(f"{stage}@{variant}" for stage in ("train", "evaluate", "compare") for variant in VARIANTS),
}
# Stages that depend on the candidate variant's own training settings, and nothing else.
CANDIDATE_STAGES = {f"train@{CANDIDATE}", f"evaluate@{CANDIDATE}", f"compare@{CANDIDATE}", "register"}


def tiny_params(cache_dir: Path) -> dict[str, Any]:
    """The project's params.yaml with sizes cut down so every stage takes seconds."""
    params = parse_yaml((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"].update(train_pairs=32, heldout_pairs=16)
    params["model"]["toy"].update(vae_steps=5, unet_steps=5, batch_size=8, cache_dir=str(cache_dir))
    params["train"].update(steps=2, batch_size=4, log_every=1, heldout_every=1, heldout_pairs=8)
    assert set(params["train"]["variants"]) == set(VARIANTS), "the test expects the default variants"
    params["train"]["variants"][CANDIDATE]["mu"] = 0.9  # explicit, so `-S` can change it for this variant only
    params["eval"].update(seeds_per_prompt=1, num_inference_steps=2, bootstrap_samples=20, heldout_pairs=8)
    params["eval"]["preference_model"]["steps"] = 20
    return params


def dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    """Run ``dvc ARGS`` in ``repo`` (with this venv's ``sdpo`` and ``python`` on PATH); return its output."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ)
    env.update(
        CREDENTIALS,
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{repo.parent / 'mlflow.db'}",
        # One thread per process: on a shared 2-core machine torch's default thread pool thrashes (20x slower).
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [os.path.join(bin_dir, "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def skipped_stages(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def dvc_repo(work: Path, *extra: str) -> Path:
    """A new git repo ``work/repo`` holding the project's DVC files (and ``extra`` files of the project)."""
    repo = work / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", *extra):
        shutil.copy(ROOT / name, repo / name)
    # Keep DVC's per-repo site cache (normally under /var/tmp/dvc) inside tmp as well.
    (repo / ".dvc" / "config.local").write_text(f"[core]\n    site_cache_dir = {work / 'dvc-site-cache'}\n")
    git(repo, "init", "-q")
    return repo


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Any]:
    """A git repo with the project's DVC pipeline and tiny params, after one full `dvc repro` (committed)."""
    work = tmp_path_factory.mktemp("dvc")
    repo = dvc_repo(work)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(work / "toy-cache"), sort_keys=False))
    git(repo, "config", "user.name", "sdpo test")
    git(repo, "config", "user.email", "sdpo-test@example.invalid")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline with tiny params")

    output = dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first repro")
    return {"repo": repo, "output": output}


def test_dry_repro_on_a_fresh_clone_matches_the_committed_lock(tmp_path):
    """What a fresh clone holds (dvc.yaml, params.yaml, the reference run's dvc.lock, no data): `dvc repro --dry
    --allow-missing` works and finds every stage as the lock recorded it. A default changed in params.yaml without
    a new reference run fails here. (Without --allow-missing DVC stops at the first stage whose upstream outputs are
    missing, even in a dry run.)"""
    repo = dvc_repo(tmp_path, "dvc.lock", "params.yaml")
    output = dvc(repo, "repro", "--dry", "--allow-missing")
    assert skipped_stages(output) == ALL_STAGES, output[-3000:]
    assert ran_stages(output) == set(), output[-3000:]


def test_train_stage_declares_every_shared_training_key():
    """A key of params.yaml's train section missing here would not rerun training when it changes."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = set(stages["train"]["do"]["params"])
    shared = {f"train.{key}" for key in parse_yaml((ROOT / "params.yaml").read_text())["train"] if key != "variants"}
    assert shared - declared == set()
    assert declared - shared - {"train.variants.${key}", "model.family", "model.lora"} == set()
    assert "train.variants.${key}" in declared and "train.variants" not in declared


def test_top_level_plots_name_every_variant():
    """Top-level plots cannot loop over train.variants, so each default variant is listed by hand."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    sources = {path for plot in plots for spec in plot.values() for path in spec["y"]}
    for variant in parse_yaml((ROOT / "params.yaml").read_text())["train"]["variants"]:
        assert f"${{data.root}}/models/{variant}/train_curve.json" in sources


def test_repro_runs_every_stage_and_writes_the_outputs(pipeline):
    repo = pipeline["repo"]
    assert ran_stages(pipeline["output"]) == ALL_STAGES

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == ALL_STAGES
    assert lock[f"train@{CANDIDATE}"]["params"]["params.yaml"][f"train.variants.{CANDIDATE}"]["mu"] == 0.9
    assert "train.variants.dpo" not in lock[f"train@{CANDIDATE}"]["params"]["params.yaml"]

    layout = RunLayout.resolve("data", repo)
    for split in ("train", "heldout"):
        assert Path(layout.raw(split)).is_file()
        assert json.loads(Path(layout.manifest(split)).read_text())["pairs_written"] > 0
    assert (Path(layout.model("base")) / "model_index.json").is_file()
    for variant in VARIANTS:
        assert (Path(layout.model(variant)) / "model_index.json").is_file()
        curve = json.loads(Path(layout.training_file(variant, "train_curve.json")).read_text())
        assert [row["step"] for row in curve] == [1, 2]
        assert Path(layout.compare_report(variant)).is_file()
    for name in ("base", *VARIANTS):
        metrics = json.loads((Path(layout.evals(name)) / "metrics.json").read_text())
        assert metrics["rewards"]["synthetic"]["n"] == 4  # 4 held-out prompts x 1 seed
        assert "winner_delta" in metrics["heldout"]
    registration = json.loads(Path(layout.report("registry.json")).read_text())
    assert registration["name"] == "sdpo-toy" and int(registration["version"]) >= 1
    assert isinstance(json.loads(Path(layout.report("promotion.json")).read_text())["decision"]["promote"], bool)


def test_second_repro_has_nothing_to_do(pipeline):
    output = dvc(pipeline["repo"], "repro")
    assert ran_stages(output) == set()
    assert "Data and pipelines are up to date." in output


def test_variant_param_reruns_only_that_variant(pipeline):
    repo = pipeline["repo"]
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["variants"][CANDIDATE]["mu"] = 0.5
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(dvc(repo, "status", "--json"))
    assert set(changed) == {f"train@{CANDIDATE}"}, changed
    params_file.write_text(original)

    output = dvc(repo, "exp", "run", "-S", f"train.variants.{CANDIDATE}.mu=0.5")
    assert ran_stages(output) == CANDIDATE_STAGES
    assert skipped_stages(output) == ALL_STAGES - CANDIDATE_STAGES

    diff = json.loads(dvc(repo, "params", "diff", "--json"))["params.yaml"]
    assert diff == {f"train.variants.{CANDIDATE}.mu": {"old": 0.9, "new": 0.5, "diff": pytest.approx(-0.4)}}
    # DVC rewrote params.yaml (YAML 1.2, `off` unquoted): the sdpo schema must still read it the same way.
    cfg = load_config(params_file)
    assert cfg.train.for_variant("dpo").safeguard == "off"
    assert cfg.train.for_variant(CANDIDATE).mu == 0.5
    assert int(json.loads((repo / "data/reports/registry.json").read_text())["version"]) >= 2

    experiments = json.loads(dvc(repo, "exp", "show", "--json"))
    assert any(exp["name"] for commit in experiments for exp in commit.get("experiments") or [])


def test_metrics_and_plots_render(pipeline):
    repo = pipeline["repo"]
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))[""]["data"]
    for name in ("base", *VARIANTS):
        summary = shown[f"data/evals/{name}/summary.json"]["data"]
        assert isinstance(summary["synthetic"], float)
        assert isinstance(summary["winner_delta"], float) and (name != "base" or summary["winner_delta"] == 0.0)
    assert isinstance(shown["data/reports/promotion_summary.json"]["data"]["champion"], bool)
    table = dvc(repo, "metrics", "show")
    assert max(len(line) for line in table.splitlines()) <= 160, table  # one table, every file, a wide terminal

    plots = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not plots.get("errors"), plots.get("errors")
    for name, fields in {
        "loss": ["loss"],
            "heldout_error_deltas": ["heldout_winner_delta", "heldout_loser_delta"],
        "safeguard_lambda": ["lambda_mean"],
    }.items():
        (plot,) = plots["data"][name]
        values = plot["content"]["data"]["values"]
        assert {row["step"] for row in values} == {1, 2}, name
        for field in fields:
            assert all(isinstance(row[field], float) for row in values), (name, field)
        if name != "safeguard_lambda":  # one curve per variant, labelled by its file
            sources = {row.get("filename") or row["filename::field"] for row in values}
            named = {part for source in sources for part in source.split("/") if part in VARIANTS}
            assert named == set(VARIANTS), (name, sources)

    out = repo.parent / "plots-html"
    dvc(repo, "plots", "show", "-o", str(out))
    assert "vega" in (out / "index.html").read_text()


def test_push_and_pull_through_an_s3_remote(pipeline, s3_server):
    """`dvc push` to an S3 remote (dvc-s3) on the local S3 server, then a clean workspace is restored by `dvc pull`."""
    repo = pipeline["repo"]
    remote = f"s3://{s3_server.bucket}/dvc-remote"
    dvc(repo, "remote", "add", "--local", "-f", "store", remote)
    dvc(repo, "remote", "modify", "--local", "store", "endpointurl", s3_server.endpoint)
    dvc(repo, "push", "-r", "store")
    assert any(key.startswith("dvc-remote/files/md5/") for key in s3_server.keys("dvc-remote/"))

    manifest = Path(RunLayout.resolve("data", repo).manifest("train"))
    expected = manifest.read_bytes()
    shutil.rmtree(repo / "data" / "shards")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull", "-r", "store")
    assert manifest.read_bytes() == expected
    assert "Data and pipelines are up to date." in dvc(repo, "repro")
