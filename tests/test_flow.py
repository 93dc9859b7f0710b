"""The Metaflow flow end to end through metaflow.Runner, against real servers on 127.0.0.1.

Two runs, module-wide: the local default (local datastore and root), and the cloud shape (Metaflow's S3 datastore,
``data.root`` in a bucket of a local S3 server, an MLflow server whose artifacts live in the same bucket), in which
one train task fails once on purpose and its retry resumes from the checkpoint it left under the root.
"""

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from metaflow import Runner

from sdpo.config import parse_yaml
from sdpo.devstack import mlflow_server as run_mlflow_server

ROOT = Path(__file__).resolve().parents[1]
FLOW = str(ROOT / "flows" / "sdpo_flow.py")
TINY = [
    "data.synthetic.train_pairs=48", "data.synthetic.heldout_pairs=16", "model.toy.vae_steps=5",
    "model.toy.unet_steps=5", "model.toy.batch_size=8", "train.steps=4", "train.batch_size=8",
    "train.heldout_every=4", "train.heldout_pairs=8", "eval.seeds_per_prompt=2", "eval.num_inference_steps=2",
    "eval.prompt_sets.train.seeds_per_prompt=1",
    "eval.bootstrap_samples=50", "eval.preference_model.steps=20",
]
# The two flow runs are two xdist groups: each module fixture runs once, on the one worker that has its tests, and
# the two runs proceed side by side.
ON_LOCAL_RUN = pytest.mark.xdist_group("flow-local")
ON_S3_RUN = pytest.mark.xdist_group("flow-s3")
S3_ARM = "dpo-sdpo"  # the S3 run's only trained arm (the registry's candidate)
STEPS = {"start", "ingest", "join_ingest", "base", "encode", "train", "evaluate", "compare", "register", "end"}


def _run(flow_env: dict, cwd: Path, overrides: list[str], **top_level):
    with Runner(FLOW, env={**os.environ, **flow_env}, cwd=str(cwd), **top_level).run(set=" ".join(overrides)) as run:
        assert run.status == "successful", run.stderr[-4000:]
        return run.run


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, mlflow_server):
    tmp = tmp_path_factory.mktemp("flow-local")
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp / "datastore"), "MLFLOW_TRACKING_URI": mlflow_server,
           "SDPO_NUM_THREADS": "1"}
    overrides = [*TINY, f"data.root={tmp / 'root'}", "registry.model_name=sdpo-flow-local"]
    return _run(env, tmp, overrides), tmp, env


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, s3_server):
    """The flow with Metaflow's S3 datastore, an s3:// root and an MLflow server with S3 artifacts.

    It reads its own parameter file (``--config sdpo_params FILE``): params.yaml with the candidate arm only. The
    local run above compares both arms; here one trained arm is enough to see every kind of output land in the
    bucket, and its train task fail once and resume."""
    tmp = tmp_path_factory.mktemp("flow-s3")
    workdir, scratch = tmp / "cwd", tmp / "scratch"
    workdir.mkdir()
    scratch.mkdir()
    params = parse_yaml((ROOT / "params.yaml").read_text())
    params["train"]["variants"] = {S3_ARM: params["train"]["variants"][S3_ARM]}
    params_file = tmp / "params-one-arm.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    prefix = "flow"
    env = {**s3_server.env(), "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{s3_server.bucket}/{prefix}/metaflow",
           "SDPO_NUM_THREADS": "1", "TMPDIR": str(scratch), "SDPO_INJECT_FAULT": "train-after-checkpoint"}
    with run_mlflow_server(tmp / "mlflow", artifacts=f"s3://{s3_server.bucket}/{prefix}/mlflow",
                           env=s3_server.env()) as tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
        overrides = [*TINY, f"data.root=s3://{s3_server.bucket}/{prefix}/root", "train.checkpoint_every=2",
                     "registry.model_name=sdpo-flow-s3"]
        run = _run(env, workdir, overrides, datastore="s3", config=[("sdpo_params", str(params_file))])
        yield run, tmp, env, prefix


def _loads_by_alias(tracking: str, registration: dict) -> None:
    alias = "champion" if registration["decision"]["promote"] else "challenger"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    version = client.get_model_version_by_alias(registration["name"], alias)
    assert version.version == registration["version"]
    assert version.tags["promotion.decision"] == ("promoted" if alias == "champion" else "refused")
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(f"models:/{registration['name']}@{alias}")
    out = model.predict(pd.DataFrame({"prompt": ["a red square"], "seed": [0]}), params={"num_inference_steps": 2})
    assert len(out) == 1 and isinstance(out["image"][0], str)


@ON_LOCAL_RUN
def test_local_flow_runs_every_step_and_registers(local_run, mlflow_server):
    run, tmp, _ = local_run
    assert {s.id for s in run.steps()} == STEPS
    end = run["end"].task
    registration = end["registration"].data
    assert registration["name"] == "sdpo-flow-local"
    assert set(end["comparison"].data) == {"dpo", "dpo-sdpo"}
    for rewards in end["comparison"].data.values():
        stats = rewards["synthetic"]
        assert 0.0 <= stats["ci_low"] <= stats["win_rate"] <= stats["ci_high"] <= 1.0
    metrics = end["arm_metrics"].data
    assert metrics["base"]["heldout"]["winner_delta"] == 0.0
    assert "winner_delta" in metrics["dpo-sdpo"]["heldout"]
    assert (tmp / "root" / "shards" / "train" / "manifest.json").exists()
    assert (tmp / "root" / "models" / "dpo-sdpo" / "model" / "model_index.json").exists()
    for step in run.steps():  # artifacts stay small: URIs and metrics, never weights or images
        for task in step:
            for artifact in task.artifacts:
                assert artifact.size < 1_000_000, (step.id, artifact.id)
    _loads_by_alias(mlflow_server, registration)


@ON_LOCAL_RUN
def test_stage_runs_are_children_of_one_flow_run(local_run, mlflow_server):
    run, _, _ = local_run
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`metaflow.run_id` = '{run.id}' and attributes.run_name = 'flow-{run.id}'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = {child.info.run_name for child in children}
    assert {"ingest-train", "ingest-heldout", "train-dpo", "train-dpo-sdpo", "evaluate-base", "evaluate-dpo",
            "evaluate-dpo-sdpo"} <= names


@ON_LOCAL_RUN
def test_card_has_report(local_run, tmp_path):
    run, tmp, env = local_run
    out = tmp_path / "card.html"
    cmd = [sys.executable, FLOW, "card", "get", f"{run.id}/register", "--id", "report", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=str(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', out.read_text())
    assert match, "card HTML without embedded data"
    data = base64.b64decode(match.group(1)).decode()
    for text in ("Diffusion-SDPO run", "win rate vs base", "Promotion", "dpo-sdpo", "held-out m_w - r_w"):
        assert text in data
    assert '"type": "image"' in data and '"type": "vegaChart"' in data


@ON_S3_RUN
def test_s3_flow_keeps_everything_in_the_bucket(s3_run, s3_server):
    run, tmp, env, prefix = s3_run
    assert {s.id for s in run.steps()} == STEPS
    keys = s3_server.keys(f"{prefix}/root/")
    root = f"{prefix}/root"
    for split in ("train", "heldout"):
        assert f"{root}/shards/{split}/manifest.json" in keys
        assert f"{root}/shards/{split}/pairs-000000.tar" in keys
    assert f"{root}/models/{S3_ARM}/model/model_index.json" in keys
    assert f"{root}/models/{S3_ARM}/training_summary.json" in keys
    assert not [k for k in keys if k.startswith(f"{root}/models/dpo/")]  # the parameter file's arms, no others
    for arm in ("base", S3_ARM):
        assert {f"{root}/evals/{arm}/metrics.json", f"{root}/evals/{arm}/grid.png"} <= set(keys)
    assert not [k for k in keys if "/staging/" in k]  # ingestion parts are removed once merged
    assert s3_server.keys(f"{prefix}/metaflow/SDPOFlow/{run.id}/")  # Metaflow's datastore is in the bucket
    assert s3_server.keys(f"{prefix}/mlflow/")  # and so are MLflow's artifacts
    # Nothing of the run on local disk but Metaflow's own metadata: no data, models or scratch left behind.
    left = sorted(str(p.relative_to(tmp)) for p in (tmp / "cwd").rglob("*")
                  if ".metaflow" not in p.relative_to(tmp / "cwd").parts)
    assert left == []
    assert sorted(p.name for p in (tmp / "scratch").iterdir()) == []


@ON_S3_RUN
def test_a_failed_train_task_resumes_on_retry(s3_run):
    run, _, _, _ = s3_run
    tasks = [task for task in run["train"] if task["arm"].data != "base"]
    assert [task["arm"].data for task in tasks] == [S3_ARM]
    for task in tasks:
        summary = task["summary"].data
        assert summary["resumed_from"] == "step-0000002", summary.get("resumed_from")
        assert summary["steps"] == 4
        assert task.current_attempt == 1  # the first attempt failed on purpose after its first checkpoint


@ON_S3_RUN
def test_s3_registered_model_loads_by_alias(s3_run):
    run, _, env, _ = s3_run
    _loads_by_alias(env["MLFLOW_TRACKING_URI"], run["end"].task["registration"].data)


def test_bad_override_fails_fast_with_the_key(tmp_path):
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
    with Runner(FLOW, env=env, cwd=str(tmp_path)).run(set="train.variants.dpo-sdpo.mu=1.5") as running:
        assert running.status == "failed"
        output = running.stdout + running.stderr
        assert "train.variants.dpo-sdpo.mu" in output and "less than or equal to 1" in output


@pytest.mark.parametrize("spec", ["batch:gpu=1,image=sdpo:latest", "kubernetes:gpu=1,image=sdpo:latest"])
def test_cloud_gpu_execution_is_attached_from_the_command_line(tmp_path, spec):
    """`--with batch/kubernetes` is accepted with no code change; with the local datastore Metaflow refuses it."""
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
    proc = subprocess.run([sys.executable, FLOW, "run", "--with", spec], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"The @{spec.split(':')[0]} decorator requires --datastore=s3" in proc.stdout + proc.stderr
    assert "Step start" not in proc.stdout  # nothing ran locally by mistake
