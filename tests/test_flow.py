"""The Metaflow flow end to end through metaflow.Runner, in an isolated datastore, against a real MLflow server."""

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from metaflow import Runner

ROOT = Path(__file__).resolve().parents[1]
TINY = " ".join([
    "data.synthetic.train_pairs=48", "data.synthetic.heldout_pairs=16", "model.toy.vae_steps=5",
    "model.toy.unet_steps=5", "model.toy.batch_size=8", "train.steps=3", "train.batch_size=8",
    "train.heldout_every=3", "train.heldout_pairs=8", "eval.seeds_per_prompt=2", "eval.num_inference_steps=2",
    "eval.bootstrap_samples=50", "registry.model_name=sdpo-flow-test",
])


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, mlflow_server):
    tmp = tmp_path_factory.mktemp("flow")
    env = {
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp / "datastore"),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "SDPO_NUM_THREADS": "1",
    }
    overrides = f"{TINY} model.toy.cache_dir={tmp / 'toy-cache'}"
    with Runner(str(ROOT / "flows" / "sdpo_flow.py"), env={**os.environ, **env}, cwd=str(tmp)).run(
        set=overrides, run_dir=str(tmp / "run")
    ) as running:
        assert running.status == "successful", running.stderr[-4000:]
        yield running.run, tmp, env


def test_flow_runs_every_step_and_registers(flow_run, mlflow_server):
    run, tmp, _ = flow_run
    steps = {s.id for s in run.steps()}
    assert steps == {"start", "ingest", "join_ingest", "base", "train", "evaluate", "compare", "register", "end"}
    end = run["end"].task
    registration = end["registration"].data
    assert registration["name"] == "sdpo-flow-test"
    assert set(end["comparison"].data) == {"dpo", "dpo-sdpo"}
    for rewards in end["comparison"].data.values():
        stats = rewards["synthetic"]
        assert 0.0 <= stats["ci_low"] <= stats["win_rate"] <= stats["ci_high"] <= 1.0
    metrics = end["arm_metrics"].data
    assert metrics["base"]["heldout"]["winner_delta"] == 0.0
    assert "winner_delta" in metrics["dpo-sdpo"]["heldout"]
    assert (tmp / "run" / "shards" / "train" / "manifest.json").exists()
    # artifacts stay small: paths and metrics, never weights or images
    for step in run.steps():
        for task in step:
            for artifact in task.artifacts:
                assert artifact.size < 1_000_000, (step.id, artifact.id)


def test_registered_model_loads_by_alias_and_generates(flow_run, mlflow_server):
    run, _, _ = flow_run
    registration = run["end"].task["registration"].data
    alias = "champion" if registration["decision"]["promote"] else "challenger"
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(registration["name"], alias)
    assert version.version == registration["version"]
    assert version.tags["promotion.decision"] == ("promoted" if alias == "champion" else "refused")
    model = mlflow.pyfunc.load_model(f"models:/{registration['name']}@{alias}")
    import pandas as pd

    out = model.predict(pd.DataFrame({"prompt": ["a red square"], "seed": [0]}), params={"num_inference_steps": 2})
    assert len(out) == 1 and isinstance(out["image"][0], str)


def test_card_has_report(flow_run, tmp_path):
    run, tmp, env = flow_run
    out = tmp_path / "card.html"
    cmd = [sys.executable, str(ROOT / "flows" / "sdpo_flow.py"), "card", "get", f"{run.id}/register", "--id", "report",
           str(out)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=str(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', out.read_text())
    assert match, "card HTML without embedded data"
    data = base64.b64decode(match.group(1)).decode()
    for text in ("Diffusion-SDPO run", "win rate vs base", "Promotion", "dpo-sdpo", "held-out m_w - r_w"):
        assert text in data
    assert '"type": "image"' in data and '"type": "vegaChart"' in data


def test_bad_override_fails_fast_with_the_key(tmp_path):
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
    with Runner(str(ROOT / "flows" / "sdpo_flow.py"), env=env, cwd=str(tmp_path)).run(set="train.mu=1.5") as running:
        assert running.status == "failed"
        output = running.stdout + running.stderr
        assert "train.mu" in output and "less than or equal to 1" in output


@pytest.mark.parametrize(("spec", "message"), [
    ("batch:gpu=1,image=sdpo:latest", "The @batch decorator requires --datastore=s3"),
    ("kubernetes:gpu=1,image=sdpo:latest", "The @kubernetes decorator requires --datastore=s3"),
])
def test_cloud_gpu_execution_is_attached_from_the_command_line(tmp_path, spec, message):
    """`--with batch/kubernetes` is accepted with no code change; offline, Metaflow stops at its datastore check."""
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "sdpo_flow.py"), "run", "--with", spec],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Step start" not in proc.stdout  # nothing ran locally by mistake
