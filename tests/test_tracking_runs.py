"""Run logging helpers against a real MLflow server."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from sdpo.config import load_config
from sdpo.errors import DataError
from sdpo.tracking import runs


def test_tracking_uri_defaults_to_sqlite_in_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert runs.tracking_uri() == "http://mlflow.example:5000"


def test_runs_go_to_their_experiment_and_nest(mlflow_tracking: str) -> None:
    with runs.start_run("sdpo-test-nesting", "outer", tags={"sdpo.stage": "train"}) as outer:
        with runs.start_run("another-experiment", "inner") as inner:
            assert mlflow.active_run().info.run_id == inner.info.run_id
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert mlflow.active_run() is None
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sdpo-test-nesting")
    inner_run = client.get_run(inner.info.run_id)
    assert outer.info.experiment_id == experiment.experiment_id
    assert inner_run.info.experiment_id == experiment.experiment_id  # a child stays with its parent
    assert inner_run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert client.get_run(outer.info.run_id).data.tags["sdpo.stage"] == "train"


def test_resume_run_reopens_a_finished_run(mlflow_tracking: str) -> None:
    with runs.start_run("sdpo-test-resume", "first") as first:
        pass
    with runs.resume_run(first.info.run_id):
        mlflow.set_tag("later", "yes")
        with runs.resume_run(first.info.run_id) as same:  # already active: no error, same run
            assert same.info.run_id == first.info.run_id
    assert MlflowClient().get_run(first.info.run_id).data.tags["later"] == "yes"


def test_log_config_flattens_and_truncates(mlflow_tracking: str) -> None:
    long_modules = [f"module_{i:04d}" for i in range(600)]  # JSON of this list is ~7000 characters
    cfg = load_config(None, ["train.mu=0.5", f"model.lora.target_modules={json.dumps(long_modules)}"])
    with runs.start_run("sdpo-test-config", "config") as run:
        logged = runs.log_config(cfg)
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params == logged
    assert params["train.mu"] == "0.5"
    assert params["registry.guards.heldout_winner_delta"] == "0.002"
    assert params["data.input"] == "null"
    assert len(params["model.lora.target_modules"]) == runs.MAX_PARAM_VALUE_CHARS


def test_log_data_manifest_records_a_dataset_with_its_digest(mlflow_tracking: str, tmp_path: Path) -> None:
    shards_dir = tmp_path / "train"
    shards_dir.mkdir()
    manifest = {
        "schema_version": 1,
        "pairs_written": 12,
        "shards": [
            {"name": "pairs-000000.tar", "pairs": 8, "bytes": 4096, "sha256": "a" * 64},
            {"name": "pairs-000001.tar", "pairs": 4, "bytes": 2048, "sha256": "b" * 64},
        ],
    }
    path = shards_dir / "manifest.json"
    path.write_text(json.dumps(manifest))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    with runs.start_run("sdpo-test-data", "data") as run:
        assert runs.log_data_manifest(path, name="train", source="s3://bucket/run/shards/train") == expected
    logged = MlflowClient().get_run(run.info.run_id)
    assert logged.data.tags["data.manifest_digest"] == expected
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == "train"
    assert json.loads(dataset_input.dataset.source)["uri"] == "s3://bucket/run/shards/train"
    assert dataset_input.dataset.digest == expected[: runs.MAX_DATASET_DIGEST_CHARS]
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 2
    assert [tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context"] == ["training"]
    assert logged.data.tags["data.train.manifest_digest"] == expected
    artifacts = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "data/train")]
    assert artifacts == ["data/train/manifest.json"]


def test_log_data_manifest_rejects_a_file_without_shards(mlflow_tracking: str, tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": 1}))
    with runs.start_run("sdpo-test-data", "bad"), pytest.raises(DataError, match="manifest.json: .*'shards'"):
        runs.log_data_manifest(path, name="train")


def test_log_lineage_tags_dvc_lock_inputs(mlflow_tracking: str, tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\n"
        "stages:\n"
        "  ingest:\n"
        "    cmd: sdpo ingest\n"
        "    deps:\n"
        "    - path: data/raw/pairs.parquet\n"
        "      md5: 0123456789abcdef0123456789abcdef\n"
        "      size: 10\n"
        "    - path: sdpo/data\n"
        "      md5: fedcba9876543210fedcba9876543210.dir\n"
        "    outs:\n"
        "    - path: data/shards\n"
        "      md5: 11111111111111111111111111111111.dir\n"
    )
    with runs.start_run("sdpo-test-lineage", "lineage") as run:
        tags = runs.log_lineage(lock)
        assert runs.log_lineage(tmp_path / "missing.lock") == {}
    assert tags == {
        "lineage.data/raw/pairs.parquet": "0123456789abcdef0123456789abcdef",
        "lineage.sdpo/data": "fedcba9876543210fedcba9876543210.dir",
    }
    logged = MlflowClient().get_run(run.info.run_id).data.tags
    assert {k: v for k, v in logged.items() if k.startswith("lineage.")} == tags


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A real evaluation folder of a tiny pipeline (3 prompts x 2 seeds, 2 steps) and the metrics it returned."""
    from sdpo.config import EvalConfig
    from sdpo.eval.generate import evaluate
    from sdpo.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("log-eval")
    model = build_tiny_pipeline("sd15", str(root / "model"), resolution=16)
    cfg = EvalConfig(seeds_per_prompt=2, num_inference_steps=2, batch_size=6, bootstrap_samples=20,
                     rewards=["synthetic"])
    metrics = evaluate(model, ["a red square", "a blue circle", "a green triangle"], root / "eval", cfg,
                       extra_metrics={"heldout": {"winner_delta": -0.002, "loser_delta": 0.001, "n_pairs": 4}})
    return root / "eval", metrics


def test_log_eval_dir_logs_the_records_promotion_reads(mlflow_tracking: str, eval_dir: tuple[Path, dict]) -> None:
    folder, metrics = eval_dir
    reference = runs.Reference(digest="sha256:" + "1" * 64, uri="s3://bucket/base")
    with runs.start_run("sdpo-test-eval", "eval") as run:
        flat = runs.log_eval_dir(folder, metrics=metrics, reference=reference, model_uri="s3://bucket/model")
    client = MlflowClient()
    logged = client.get_run(run.info.run_id).data
    assert logged.metrics == flat
    assert logged.metrics["reward.synthetic.mean"] == pytest.approx(metrics["rewards"]["synthetic"]["mean"])
    assert logged.metrics["heldout.winner_delta"] == pytest.approx(-0.002)
    assert logged.tags[runs.STAGE_TAG] == "evaluate"
    assert logged.tags[runs.TAG_MODEL_DIGEST] == metrics["model_digest"]
    assert logged.tags[runs.TAG_MODEL_URI] == "s3://bucket/model"
    assert logged.tags[runs.TAG_REFERENCE_DIGEST] == reference.digest
    assert logged.tags[runs.TAG_REFERENCE_URI] == reference.uri
    assert logged.tags[runs.TAG_SCORES_SHA256] == hashlib.sha256((folder / "scores.jsonl").read_bytes()).hexdigest()
    assert logged.tags[runs.TAG_N_IMAGES] == "6"
    assert logged.params["eval.num_inference_steps"] == "2" and logged.params["eval.prompts"] == "3"
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval"))
    assert names == ["eval/grid.png", "eval/images", "eval/manifest.json", "eval/metrics.json", "eval/scores.jsonl",
                     "eval/scores_table.json", "eval/summary.json"]
    images = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval/images"))
    assert images == sorted(f"eval/{p.relative_to(folder).as_posix()}" for p in (folder / "images").iterdir())


def test_log_eval_dir_refuses_a_folder_that_differs_from_the_evaluation(mlflow_tracking: str,
                                                                         eval_dir: tuple[Path, dict],
                                                                         tmp_path: Path) -> None:
    import shutil

    folder, metrics = eval_dir
    edited = shutil.copytree(folder, tmp_path / "eval")
    changed = json.loads((edited / "metrics.json").read_text())
    changed["heldout"]["winner_delta"] = 0.0
    (edited / "metrics.json").write_text(json.dumps(changed))
    with runs.start_run("sdpo-test-eval", "edited") as run, \
            pytest.raises(DataError, match="differs from the metrics the evaluation computed"):
        runs.log_eval_dir(edited, metrics=metrics)
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {}  # nothing was logged


def test_log_metrics_history_logs_steps_and_skips_non_finite(mlflow_tracking: str, tmp_path: Path) -> None:
    history = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "loss": 0.69, "lambda_mean": 1.0, "method": "dpo"},
        {"step": 10, "loss": 0.5, "lambda_mean": 0.4},
        {"step": 20, "loss": math.nan, "lambda_mean": 0.3},
    ]
    history.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with runs.start_run("sdpo-test-history", "history") as run:
        assert runs.log_metrics_history(history) == 5
    client = MlflowClient()
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(0, 0.69), (10, 0.5)]
    assert len(client.get_metric_history(run.info.run_id, "lambda_mean")) == 3


def test_log_metrics_history_names_the_bad_line(mlflow_tracking: str, tmp_path: Path) -> None:
    history = tmp_path / "metrics.jsonl"
    history.write_text('{"step": 0, "loss": 1.0}\n{"loss": 2.0}\n')
    with runs.start_run("sdpo-test-history", "bad"), pytest.raises(DataError, match=r"metrics.jsonl:2: .*'step'"):
        runs.log_metrics_history(history)
