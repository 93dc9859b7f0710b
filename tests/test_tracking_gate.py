"""The promotion gate against a real MLflow server: it decides from the evaluation stage's MLflow records, checked.

Each tampering case starts from a champion (`good`, promoted over the base) and proves two things: the tampered
candidate is refused for the right reason, and the champion's alias and its version's tags are as they were.
Tampered candidates are copies with their own digest (:meth:`gate_world.World.variant`), so that no other test
sees their evaluation runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gate_world import crown, gate_models, make_world, registry_state  # noqa: F401
from mlflow import MlflowClient

from sdpo import fs, stages
from sdpo.errors import ModelError
from sdpo.tracking import gate, runs

EXPERIMENT = "gate-tampering"


@pytest.fixture(scope="module")
def world(gate_models, mlflow_server, tmp_path_factory):  # noqa: F811
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield make_world(tmp_path_factory.mktemp("gate-root"), gate_models, EXPERIMENT,
                         evaluate=("base", "good", "better"))


def _eval_run(world, arm: str):
    """The newest evaluation run of the arm's model."""
    model = world.models["base"] if arm == "base" else world.root / "models" / arm / "model"
    digest = fs.folder_digest(model)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = gate.find_evaluations(client, [experiment], digest, max_results=1)
    return run


def _champion_intact(name: str, before: dict) -> None:
    after = registry_state(name)
    champion = before["aliases"]["champion"]
    assert after["aliases"]["champion"] == champion
    assert after["versions"][champion] == before["versions"][champion]


def _register_and_promote(world, name: str, arm: str) -> dict:
    ctx = world.ctx(name)
    version = stages.register(ctx, arm)["version"]
    return stages.promote(ctx, version)


def test_evaluation_run_holds_the_records(world, mlflow_tracking: str) -> None:
    client = MlflowClient()
    run = _eval_run(world, "good")
    tags = run.data.tags
    base_digest = fs.folder_digest(world.models["base"])
    assert run.info.run_name == "evaluate-good"
    assert tags[runs.STAGE_TAG] == "evaluate"
    assert tags[runs.TAG_MODEL_DIGEST] == fs.folder_digest(world.root / "models/good/model")
    assert tags[runs.TAG_REFERENCE_DIGEST] == base_digest
    assert tags[runs.TAG_N_IMAGES] == "8" and tags[runs.TAG_REWARDS] == "synthetic"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/manifest.json", "eval/scores.jsonl", "eval/metrics.json", "eval/grid.png",
            "eval/scores_table.json", "eval/images"} <= files
    images = client.list_artifacts(run.info.run_id, "eval/images")
    assert len(images) == 8 and all(a.path.endswith(".png") for a in images)
    local_scores = (world.root / "evals/good/scores.jsonl").read_bytes()
    assert tags[runs.TAG_SCORES_SHA256] == runs.sha256_hex(local_scores)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, runs.SCORES_TABLE)).read_text())
    assert len(table["data"]) == 8 and "score.synthetic" in table["columns"]
    for key in ("reward.synthetic.mean", "heldout.winner_delta", "heldout.loser_delta"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "heldout"
    # the base's own evaluation: deltas against itself, so it names itself as the reference
    assert _eval_run(world, "base").data.tags[runs.TAG_REFERENCE_DIGEST] == base_digest


def test_edited_metrics_do_not_let_a_noised_model_through(world, mlflow_tracking: str) -> None:
    name = "gate-metrics"
    crown(world, name)
    before = registry_state(name)
    arm = world.variant("noised-metrics", "noised")
    ctx = world.ctx(name)
    logged = stages.evaluate(ctx, arm)["heldout"]["winner_delta"]
    assert logged > 0.01  # the noised UNet's held-out winner error is far above the base's
    # the hostile user: metrics.json edited on disk and in the evaluation run's artifacts
    path = world.root / "evals" / arm / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["heldout"]["winner_delta"] = 0.0
    path.write_text(json.dumps(metrics))
    run_id = _eval_run(world, arm).info.run_id
    MlflowClient().log_artifact(run_id, str(path), "eval")

    result = _register_and_promote(world, name, arm)
    assert result["outcome"] == "refused" and result["alias"] == "challenger"
    guard = result["decision"]["details"]["guards"]["heldout_winner_delta"]
    assert guard["candidate"] == pytest.approx(logged)  # the logged metric, not the edited file
    assert "guard heldout_winner_delta regressed" in result["decision"]["reason"]
    _champion_intact(name, before)

    # the metric itself rewritten in the run: the history shows it, and the gate refuses
    MlflowClient().log_metric(run_id, "heldout.winner_delta", 0.0)
    again = stages.promote(ctx, result["version"])
    assert again["outcome"] == "refused"
    assert "metric heldout.winner_delta was logged 2 times" in again["decision"]["reason"]
    _champion_intact(name, before)


def test_inflated_scores_are_refused(world, mlflow_tracking: str) -> None:
    name = "gate-scores"
    crown(world, name)
    before = registry_state(name)
    arm = world.variant("worse-scores", "worse")
    ctx = world.ctx(name)
    stages.evaluate(ctx, arm)
    path = world.root / "evals" / arm / "scores.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["scores"]["synthetic"] += 5.0
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    # the edited file on disk is not what the gate reads: the true win rate over the champion is 0
    result = _register_and_promote(world, name, arm)
    assert result["outcome"] == "refused"
    assert result["decision"]["details"]["win_rate"] == 0.0
    _champion_intact(name, before)

    # the inflated scores uploaded into the evaluation run, with a matching sha256 tag: re-scoring the logged
    # images exposes them (and the logged mean no longer matches)
    run_id = _eval_run(world, arm).info.run_id
    client = MlflowClient()
    client.log_artifact(run_id, str(path), "eval")
    client.set_tag(run_id, runs.TAG_SCORES_SHA256, runs.sha256_hex(path.read_bytes()))
    again = stages.promote(ctx, result["version"])
    reason = again["decision"]["reason"]
    assert again["outcome"] == "refused"
    assert "re-scored images differ from the logged synthetic scores" in reason
    assert "is not the mean of its per-image scores" in reason
    _champion_intact(name, before)


def test_rescoring_flags_only_scores_that_do_not_match_the_images(world, mlflow_tracking: str,
                                                                  tmp_path: Path) -> None:
    client = MlflowClient()
    config = gate.GateConfig(primary_reward="synthetic", min_win_rate_lower=0.5, guards={}, rescore_samples=3)
    record = gate.load_record(client, _eval_run(world, "better").info.run_id, tmp_path / "ok", ["synthetic"])
    assert record.problems == []
    assert gate.rescore(client, record, config, ["synthetic"]) == []
    sampled = gate.rescore_sample(record, config)
    assert len(sampled) == 3
    untouched = next(unit for unit in sorted(record.rows) if unit not in sampled)
    record.rows[untouched]["scores"]["synthetic"] += 1.0  # outside the sample: not seen
    assert gate.rescore(client, record, config, ["synthetic"]) == []
    record.rows[sampled[1]]["scores"]["synthetic"] += 1e-3  # beyond tolerance
    (problem,) = gate.rescore(client, record, config, ["synthetic"])
    assert "1 of 3 re-scored images differ" in problem


def test_held_out_reference_must_be_the_base_or_the_champion(world, mlflow_tracking: str) -> None:
    name = "gate-reference"
    crown(world, name)
    before = registry_state(name)
    ctx = world.ctx(name)
    # deltas of the noised model against itself are 0 by definition: the guard would pass
    own = world.variant("noised-self", "noised")
    assert stages.evaluate(ctx, own, base=ctx.layout.model(own))["heldout"]["winner_delta"] == 0.0
    result = _register_and_promote(world, name, own)
    assert result["outcome"] == "refused"
    assert "the held-out reference is the candidate itself" in result["decision"]["reason"]
    _champion_intact(name, before)

    other = world.variant("noised-other", "noised")
    stages.evaluate(ctx, other, base=ctx.layout.model("better"))
    result = _register_and_promote(world, name, other)
    assert result["outcome"] == "refused"
    assert "is neither the base model" in result["decision"]["reason"]
    _champion_intact(name, before)


def test_an_evaluation_of_another_model_is_refused(world, mlflow_tracking: str) -> None:
    name = "gate-digest"
    crown(world, name)
    before = registry_state(name)
    ctx = world.ctx(name)
    arm = world.variant("noised-digest", "noised")
    stages.evaluate(ctx, arm)
    better_eval = _eval_run(world, "better").info.run_id  # an evaluation that beats the champion

    # registering with another model's evaluation creates nothing
    with pytest.raises(ModelError, match="a version is only registered with its own evaluation"):
        stages.register(ctx, arm, eval_run=better_eval)
    assert registry_state(name) == before

    # the version linked to `better`'s evaluation after registration: the digests differ, the gate refuses
    version = stages.register(ctx, arm)["version"]
    MlflowClient().set_model_version_tag(name, version, gate.EVAL_RUN_TAG, better_eval)
    result = stages.promote(ctx, version)
    assert result["outcome"] == "refused"
    assert f"evaluation run {better_eval} evaluated model" in result["decision"]["reason"]
    assert "not this version's model" in result["decision"]["reason"]
    assert result["decision"]["details"]["win_rate"] == 1.0  # its scores alone would have promoted it
    _champion_intact(name, before)
