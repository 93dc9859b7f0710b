"""The rewards stage: the embedded preference reward trained on the train shards and found by the evaluation."""

import json
from pathlib import Path

import mlflow
import pytest

from sdpo import stages
from sdpo.errors import ModelError
from sdpo.eval.rewards.preference import load_train_pairs, pairs_digest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.train_pairs=64", "data.synthetic.heldout_pairs=8", "eval.preference_model.steps=20"]


@pytest.fixture
def ctx(tmp_path, tracking):
    ctx = stages.StageContext.load(ROOT / "params.yaml", [*SMALL, f"data.root={tmp_path / 'root'}"])
    for split in ("train", "heldout"):
        stages.synth(ctx, split)
        stages.ingest(ctx, split)
    return ctx


def test_the_evaluation_refuses_to_score_before_the_reward_is_trained(ctx):
    with pytest.raises(ModelError, match="sdpo rewards"):
        stages.reward_paths(ctx)


def test_the_preference_reward_is_trained_on_the_train_shards_and_published_for_the_evaluation(ctx, tracking):
    (result,) = stages.rewards(ctx).values()
    folder = Path(ctx.layout.reward_model("preference"))
    assert result["uri"] == str(folder) and (folder / "model.safetensors").is_file()
    training = json.loads((folder / "config.json").read_text())["training"]
    shards = Path(ctx.layout.shards("train"))
    assert training["data_digest"] == pairs_digest(*load_train_pairs(shards)) == result["data_digest"]
    assert training["pairs"] == 64 and training["steps"] == 20
    assert stages.reward_paths(ctx) == {"preference": str(folder)}
    run = mlflow.MlflowClient(tracking_uri=tracking).get_run(result["run_id"])
    assert run.data.tags["data_digest"] == result["data_digest"] and run.data.params["preference.steps"] == "20"


def test_configured_weights_are_used_as_they_are(tmp_path, tracking):
    ctx = stages.StageContext.load(ROOT / "params.yaml", [f"data.root={tmp_path}",
                                                          f"eval.reward_paths.preference={tmp_path / 'mine'}"])
    assert stages.rewards(ctx) == {}
    assert stages.reward_paths(ctx) == {"preference": str(tmp_path / "mine")}
