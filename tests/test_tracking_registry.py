"""Registry and gated promotion against a real MLflow server, with a tiny random-weight pipeline.

Comparisons use ``mlflow_fixtures.paired_compare``, a stand-in with the shape of
``sdpo.eval.winrate.compare_eval_dirs``, on crafted evaluation dirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow_fixtures import TINY_RESOLUTION, paired_compare, write_eval_dir

from sdpo.cli import main
from sdpo.errors import DataError
from sdpo.tracking import registry
from sdpo.tracking.pyfunc import decode_image

POLICY = {"primary_reward": "synthetic", "min_win_rate_lower": 0.5, "guards": {"heldout_winner_delta": 0.002}}
BASE_SCORES = [0.01 * i for i in range(32)]
HELDOUT_OK = {"winner_delta": -0.001, "loser_delta": 0.001}


def _eval(root: Path, name: str, shift: float, heldout: dict | None = HELDOUT_OK) -> Path:
    """An evaluation dir whose scores are the base scores plus ``shift`` (paired: same prompts and seeds)."""
    return write_eval_dir(root / name, [s + shift for s in BASE_SCORES], heldout=heldout)


def _promote(name: str, version: str, candidate: Path, baseline: Path | None = None, **kwargs) -> registry.Decision:
    return registry.promote(
        name, version, candidate_eval=candidate, baseline_eval=baseline, compare_fn=paired_compare,
        bootstrap_samples=200, **POLICY, **kwargs,
    )  # fmt: skip


def _aliases(name: str) -> dict[str, str]:
    return dict(MlflowClient().get_registered_model(name).aliases)


def test_champion_challenger_story(mlflow_tracking: str, tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    name = "sdpo-story"
    base = _eval(tmp_path, "base", 0.0, heldout={"winner_delta": 0.0, "loser_delta": 0.0})
    client = MlflowClient()

    # 1. a candidate that clearly beats the base model becomes the champion
    v1 = registry.register(tiny_pipeline_dir, name=name, eval_dir=_eval(tmp_path, "v1", 1.0), experiment="sdpo-test")
    first = _promote(name, v1.version, tmp_path / "v1", base)
    assert first.promote, first.reason
    assert _aliases(name) == {"champion": v1.version}
    tags = client.get_model_version(name, v1.version).tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.baseline_version"] == "base"
    assert float(tags["promotion.win_rate"]) == 1.0 and float(tags["promotion.ci_low"]) > 0.5
    assert "promoted" in client.get_model_version(name, v1.version).description
    record_path = mlflow.artifacts.download_artifacts(run_id=v1.run_id, artifact_path=f"promotion/v{v1.version}.json")
    assert json.loads(Path(record_path).read_text())["promote"] is True

    # the same call again changes nothing
    again = _promote(name, v1.version, tmp_path / "v1", base)
    assert again.promote and "already the champion" in again.reason
    assert _aliases(name) == {"champion": v1.version}

    # 2. a worse candidate (better than the base, worse than the champion) is compared with the champion's
    #    logged evaluation, not the base one passed in, and becomes the challenger
    v2 = registry.register(tiny_pipeline_dir, name=name, eval_dir=_eval(tmp_path, "v2", 0.5), experiment="sdpo-test")
    second = _promote(name, v2.version, tmp_path / "v2", base)
    assert not second.promote
    assert second.details["baseline_version"] == v1.version
    assert "not confidently above 0.5" in second.reason
    assert _aliases(name) == {"champion": v1.version, "challenger": v2.version}
    tags = client.get_model_version(name, v2.version).tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.reason"] == second.reason
    assert tags["promotion.baseline_version"] == v1.version
    assert _promote(name, v2.version, tmp_path / "v2").reason == second.reason  # idempotent refusal
    assert _aliases(name) == {"champion": v1.version, "challenger": v2.version}

    # 3. a better candidate replaces the champion; the old one stays reachable
    v3 = registry.register(tiny_pipeline_dir, name=name, eval_dir=_eval(tmp_path, "v3", 2.0), experiment="sdpo-test")
    third = _promote(name, v3.version, tmp_path / "v3")
    assert third.promote, third.reason
    assert _aliases(name) == {"champion": v3.version, "previous-champion": v1.version, "challenger": v2.version}
    assert client.get_model_version_by_alias(name, "previous-champion").tags["promotion.superseded_by"] == v3.version


def test_refusals_without_evidence(mlflow_tracking: str, tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    name = "sdpo-refusals"
    client = MlflowClient()
    base = _eval(tmp_path, "base", 0.0, heldout={"winner_delta": 0.0, "loser_delta": 0.0})
    good = _eval(tmp_path, "good", 1.0)
    v1 = registry.register(tiny_pipeline_dir, name=name, experiment="sdpo-test")  # no evaluation logged

    decision = _promote(name, v1.version, good)
    assert not decision.promote and "no champion yet and no baseline evaluation" in decision.reason
    assert _aliases(name) == {"challenger": v1.version}

    no_heldout = _promote(name, v1.version, _eval(tmp_path, "no-heldout", 1.0, heldout=None), base)
    assert not no_heldout.promote
    assert "heldout_winner_delta: missing or not a number in the candidate" in no_heldout.reason

    regressed = _promote(name, v1.version, _eval(tmp_path, "regressed", 1.0, heldout={"winner_delta": 0.01}), base)
    assert not regressed.promote and "guard heldout_winner_delta regressed by 0.01" in regressed.reason
    assert client.get_model_version(name, v1.version).tags["promotion.reason"] == regressed.reason

    dry = _promote(name, v1.version, good, base, dry_run=True)
    assert dry.promote
    assert _aliases(name) == {"challenger": v1.version}
    assert client.get_model_version(name, v1.version).tags["promotion.decision"] == "refused"

    with pytest.raises(DataError, match="nowhere: not an evaluation dir"):
        _promote(name, v1.version, tmp_path / "nowhere", base)
    with pytest.raises(DataError, match="nowhere: not an evaluation dir"):
        _promote(name, v1.version, good, tmp_path / "nowhere")

    # a champion without a logged evaluation cannot be beaten: no comparison, no promotion
    assert _promote(name, v1.version, good, base).promote
    v2 = mlflow.register_model(v1.source, name)  # same model and run: still no evaluation
    blocked = _promote(name, v2.version, good, base)
    assert not blocked.promote and f"champion version {v1.version} has no logged evaluation" in blocked.reason
    assert _aliases(name) == {"champion": v1.version, "challenger": v2.version}


def test_cli_register_promote_and_serve_the_champion(
    mlflow_tracking: str,
    tiny_pipeline_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "_default_compare", lambda: paired_compare)  # until sdpo.eval.winrate exists
    (tmp_path / "params.yaml").write_text("registry:\n  experiment: sdpo-test-cli\n  model_name: sdpo-cli\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: sdpo train\n    deps:\n"
        "    - path: data/shards\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"shards": [{"name": "pairs-000000.tar", "pairs": 4}]}))
    base = _eval(tmp_path, "base", 0.0, heldout={"winner_delta": 0.0, "loser_delta": 0.0})
    good = _eval(tmp_path, "good", 1.0)

    register_args = ["register", "--model", str(tiny_pipeline_dir), "--eval", str(good)]
    register_args += ["--data-manifest", str(shards / "manifest.json"), "--tag", "variant=dpo-sdpo"]
    assert main([*register_args, "--output", "registered.json"]) == 0
    assert "registered sdpo-cli version 1 (run " in capsys.readouterr().out
    record = json.loads((tmp_path / "registered.json").read_text())
    client = MlflowClient()
    version = client.get_model_version("sdpo-cli", record["version"])
    assert version.tags["model.digest"] == registry.model_dir_digest(tiny_pipeline_dir)
    assert version.tags["source.run_id"] == record["run_id"] == version.run_id
    assert float(version.tags["eval.reward.synthetic.mean"]) == pytest.approx(1.155)
    assert version.tags["variant"] == "dpo-sdpo"
    assert "sha256:" in version.description and "reward.synthetic.mean=1.155" in version.description
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "sdpo-test-cli"
    assert run.data.params["registry.model_name"] == "sdpo-cli"
    assert run.data.tags["lineage.data/shards"] == "0123456789abcdef0123456789abcdef.dir"
    assert run.data.tags["model.digest"] == version.tags["model.digest"]
    assert "data.manifest_digest" in run.data.tags

    promote_args = ["promote", "--version", "1", "--candidate-eval", str(good), "--baseline-eval", str(base)]
    assert main([*promote_args, "--dry-run"]) == 0
    assert "would be promoted (dry run" in capsys.readouterr().out
    assert _aliases("sdpo-cli") == {}
    assert main([*promote_args, "--output", "decision.json"]) == 0
    assert "sdpo-cli version 1: promoted to champion" in capsys.readouterr().out
    assert json.loads((tmp_path / "decision.json").read_text())["promote"] is True
    assert main(["promote", "--version", "7", "--candidate-eval", str(good)]) == 2
    assert "registered model 'sdpo-cli' has no version 7" in capsys.readouterr().err

    model = mlflow.pyfunc.load_model("models:/sdpo-cli@champion")
    request = pd.DataFrame({"prompt": ["a red square", "a blue circle", "a red square"], "seed": [3, 4, 3]})
    output = model.predict(request, params={"num_inference_steps": 2})
    assert list(output.columns) == ["prompt", "seed", "image"]
    assert output["seed"].tolist() == [3, 4, 3]
    images = [decode_image(encoded) for encoded in output["image"]]
    assert all(image.format == "PNG" and image.size == (TINY_RESOLUTION, TINY_RESOLUTION) for image in images)
    assert output["image"][0] == output["image"][2]  # same prompt and seed, same image
    assert output["image"][0] != output["image"][1]
    unseeded = model.predict(pd.DataFrame({"prompt": ["a", "b"]}), params={"num_inference_steps": 1})
    assert unseeded["seed"].tolist() == [0, 1]


def test_register_rejects_a_folder_that_is_not_a_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("registry:\n  model_name: sdpo-cli-bad\n")
    assert main(["register", "--model", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a diffusers pipeline folder (model_index.json missing)" in capsys.readouterr().err
