"""The registry against a real MLflow server: serialised promotions, nothing half-registered, one version per model,
and commands that say what they did. Every case checks that the champion it started from is intact.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from gate_world import crown, gate_models, make_world, registry_state  # noqa: F401
from mlflow import MlflowClient

from sdpo import stages
from sdpo.cli import main
from sdpo.errors import DataError
from sdpo.eval import winrate
from sdpo.report import summary_text
from sdpo.tracking import lock, registry, runs
from sdpo.tracking.gate import EvidenceError
from sdpo.tracking.pyfunc import decode_image

EXPERIMENT = "registry"


@pytest.fixture(scope="module")
def world(gate_models, mlflow_server, tmp_path_factory):  # noqa: F811
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield make_world(tmp_path_factory.mktemp("registry-root"), gate_models, EXPERIMENT,
                         evaluate=("base", "good", "better", "best", "worse"))


def _decisions(name: str) -> dict[str, str | None]:
    return {number: tags.get("promotion.decision") for number, tags in registry_state(name)["versions"].items()}


def test_concurrent_promotions_are_serialised(world, mlflow_tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "registry-concurrent"
    old = crown(world, name)
    ctx = world.ctx(name)
    versions = {arm: stages.register(ctx, arm)["version"] for arm in ("better", "best")}
    # the first promotion to get the lock waits inside it until the other one has found the lock held
    contended = threading.Event()
    monkeypatch.setattr(lock, "on_busy", lambda lock_name, owner: contended.set())
    decide_and_apply, first = registry._decide_and_apply, []

    def holding(*args, **kwargs):
        if not first:
            first.append(args[2])
            assert contended.wait(timeout=300), "the other promotion never met the lock"
        return decide_and_apply(*args, **kwargs)

    monkeypatch.setattr(registry, "_decide_and_apply", holding)
    results: dict[str, dict] = {}

    def promote(arm: str) -> None:
        try:
            results[arm] = stages.promote(world.ctx(name), versions[arm])
        except Exception as err:  # reported below, with the thread's arm
            results[arm] = {"error": repr(err)}

    threads = [threading.Thread(target=promote, args=(arm,)) for arm in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert contended.is_set()
    assert all("error" not in result for result in results.values()), results
    first_arm = next(arm for arm, number in versions.items() if number == first[0])
    second_arm = next(arm for arm in versions if arm != first_arm)
    # the first was judged against the old champion, the second against the first's outcome
    assert results[first_arm]["outcome"] == "promoted"
    assert results[first_arm]["decision"]["details"]["baseline_version"] == old
    assert results[second_arm]["decision"]["details"]["baseline_version"] == versions[first_arm]
    state = registry_state(name)
    assert state["aliases"]["champion"] == versions["best"]  # best beats both, whichever order
    assert state["versions"][old]["promotion.superseded_by"] == versions[first_arm]
    if second_arm == "best":
        assert results["best"]["outcome"] == "promoted"
        assert state["aliases"]["previous-champion"] == versions["better"]
    else:
        assert results["better"]["outcome"] == "refused"
        assert state["aliases"] == {"champion": versions["best"], "previous-champion": old,
                                    "challenger": versions["better"]}
    assert set(_decisions(name).values()) <= {"promoted", "refused"}
    assert MlflowClient().search_registered_models(f"name = '{lock.lock_name(name)}'") == []


def test_a_failed_comparison_leaves_no_version_without_a_decision(world, mlflow_tracking: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name = "registry-crash"
    crown(world, name)
    before = registry_state(name)
    ctx = world.ctx(name)
    compare = winrate.compare_scores

    def crashing(*args, **kwargs):
        raise RuntimeError("comparison crashed")

    # the comparison fails before registration: no version is created
    monkeypatch.setattr(winrate, "compare_scores", crashing)
    with pytest.raises(RuntimeError, match="comparison crashed"):
        stages.register(ctx, "better")
    assert registry_state(name) == before

    # it fails after registration, in promote: the version records the failure, the champion stays
    monkeypatch.setattr(winrate, "compare_scores", compare)
    version = stages.register(ctx, "better")["version"]
    monkeypatch.setattr(winrate, "compare_scores", crashing)
    with pytest.raises(RuntimeError, match="comparison crashed"):
        stages.promote(ctx, version)
    tags = registry_state(name)["versions"][version]
    assert tags["promotion.decision"] == "error"
    assert "promotion failed: comparison crashed" in tags["promotion.reason"]
    assert registry_state(name)["aliases"] == before["aliases"]
    assert registry_state(name)["versions"][before["aliases"]["champion"]] == \
        before["versions"][before["aliases"]["champion"]]

    # the re-run reuses the version and decides it
    monkeypatch.setattr(winrate, "compare_scores", compare)
    again = stages.register(ctx, "better")
    assert again["reused"] and again["version"] == version
    assert stages.promote(ctx, version)["outcome"] == "promoted"
    assert set(_decisions(name).values()) == {"promoted"}


def test_no_comparable_champion_evaluation_registers_nothing(world, mlflow_tracking: str) -> None:
    name = "registry-seeds"
    champion = crown(world, name)  # evaluated with 2 seeds per prompt
    before = registry_state(name)
    ctx = world.ctx(name, "eval.seeds_per_prompt=1")
    arm = world.variant("better-1seed", "better")
    stages.evaluate(ctx, arm)
    with pytest.raises(EvidenceError, match=f"no finished evaluation run of champion version {champion}"):
        stages.register(ctx, arm)
    assert registry_state(name) == before


def test_a_repeated_run_reuses_the_version_and_the_summary_names_its_alias(world, mlflow_tracking: str) -> None:
    name = "registry-rerun"
    ctx = world.ctx(name)

    def run_once(arm: str) -> dict:
        return {**stages.register(ctx, arm), **stages.promote(ctx)}

    def load_line(registration: dict) -> str:
        text = summary_text(ctx.layout, [arm], {}, {}, registration, "http://mlflow")
        return next(line for line in text.splitlines() if line.startswith("load it:"))

    arm = "good"
    first = run_once(arm)
    assert not first["reused"] and first["outcome"] == "promoted"
    state = registry_state(name)
    again = run_once(arm)  # the same model again, e.g. after Ctrl-C
    assert again["reused"] and again["version"] == first["version"] and again["aliases"] == ["champion"]
    assert again["outcome"] == "already-champion" and again["changed"] == []
    assert registry_state(name) == state
    assert load_line(again) == f"load it: mlflow.pyfunc.load_model('models:/{name}@champion')"

    arm = "worse"
    refused = run_once(arm)
    assert refused["outcome"] == "refused" and refused["alias"] == "challenger"
    again = run_once(arm)
    assert again["reused"] and again["version"] == refused["version"]
    assert again["outcome"] == "refused" and again["alias"] == "challenger"
    assert load_line(again) == f"load it: mlflow.pyfunc.load_model('models:/{name}@challenger')"
    assert _decisions(name) == {first["version"]: "promoted", refused["version"]: "refused"}
    assert registry_state(name)["aliases"] == {"champion": first["version"], "challenger": refused["version"]}

    # a run interrupted between register and promote leaves a pending version that the next run decides
    arm = "better"
    pending = stages.register(ctx, arm)
    tags = registry_state(name)["versions"][pending["version"]]
    assert tags["promotion.decision"] == "pending" and "no promotion decision yet" in tags["promotion.reason"]
    resumed = run_once(arm)
    assert resumed["reused"] and resumed["version"] == pending["version"] and resumed["outcome"] == "promoted"
    assert len(registry_state(name)["versions"]) == 3


def _params(world, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({
        "data": {"root": str(world.root)},
        "model": {"base": str(world.models["base"])},
        "eval": {"seeds_per_prompt": 2, "num_inference_steps": 2, "batch_size": 8, "bootstrap_samples": 100,
                 "heldout_pairs": 8, "rewards": ["synthetic"]},  # as gate_world.EVAL_SETTINGS
        "registry": {"experiment": EXPERIMENT, "model_name": name, "primary_reward": "synthetic"},
    }))
    return path


def test_cli_says_what_it_did_and_serves_the_champion(world, mlflow_tracking: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    name = "registry-cli"
    config = str(_params(world, tmp_path, name))
    assert main(["register", "--config", config, "--arm", "good"]) == 0
    assert f"registered {name} version 1 (run " in capsys.readouterr().out
    assert main(["promote", "--config", config]) == 0
    assert f"{name} version 1: promoted to champion (" in capsys.readouterr().out
    assert main(["register", "--config", config, "--arm", "better"]) == 0
    assert "decision pending" in capsys.readouterr().out

    before = registry_state(name)
    assert main(["promote", "--config", config, "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{name} version 1: version 1 is already the champion (" in out and "nothing changed" in out
    assert registry_state(name) == before
    assert main(["promote", "--config", config, "--version", "2", "--dry-run"]) == 0
    assert "version 2: would be promoted (dry run, nothing changed)" in capsys.readouterr().out
    assert registry_state(name) == before

    assert main(["promote", "--config", config, "--version", "2"]) == 0
    out = capsys.readouterr().out
    assert "version 2: promoted to champion (" in out
    assert "alias previous-champion -> version 1; alias champion -> version 2" in out
    assert registry_state(name)["aliases"] == {"champion": "2", "previous-champion": "1"}
    assert json.loads((world.root / "reports/promotion.json").read_text())["outcome"] == "promoted"
    summary = json.loads((world.root / "reports/promotion_summary.json").read_text())  # what DVC shows
    assert summary["version"] == 2 and summary["champion"] is True and summary["win_rate_lower"] > 0.5

    assert main(["register", "--config", config, "--arm", "good"]) == 0
    out = capsys.readouterr().out
    assert f"{name} version 1 already holds this model" in out and "reused it, nothing registered" in out
    assert "recorded decision: promoted (previous-champion)" in out
    assert main(["promote", "--config", config, "--version", "7"]) == 2
    assert f"registered model '{name}' has no version 7" in capsys.readouterr().err
    assert main(["register", "--config", config, "--arm", "missing"]) == 2
    assert "no model_index.json" in capsys.readouterr().err

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    request = pd.DataFrame({"prompt": ["a red square", "a blue circle", "a red square"], "seed": [3, 4, 3]})
    output = model.predict(request, params={"num_inference_steps": 2})
    assert output["seed"].tolist() == [3, 4, 3]
    images = [decode_image(encoded) for encoded in output["image"]]
    assert all(image.format == "PNG" and image.size == (16, 16) for image in images)
    assert output["image"][0] == output["image"][2] and output["image"][0] != output["image"][1]


def test_one_dataset_name_per_split(world, mlflow_tracking: str, tmp_path: Path) -> None:
    name = "registry-datasets"
    crown(world, name)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    digests: dict[str, set[str]] = {}
    for run in client.search_runs([experiment], max_results=500):
        for dataset_input in run.inputs.dataset_inputs:
            digests.setdefault(dataset_input.dataset.name, set()).add(dataset_input.dataset.digest)
    assert set(digests) == {"train", "heldout"}
    assert all(len(found) == 1 for found in digests.values()), digests
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": []}))
    with runs.start_run(EXPERIMENT, "bad-name"), pytest.raises(DataError, match="use the split's name"):
        runs.log_data_manifest(tmp_path / "manifest.json", name="shards")


def test_a_refusal_names_the_champion_version_whatever_its_type() -> None:
    from sdpo.commands.promote import verdict

    result = {"name": "m", "version": "3", "outcome": "refused", "alias": "challenger", "champion": 2,
              "decision": {"reason": "win rate lower bound 0.41 < 0.5"}}
    assert verdict(result) == ("m version 3: refused, now challenger; champion stays version 2: "
                               "win rate lower bound 0.41 < 0.5")
    assert verdict({**result, "champion": None}).endswith("champion stays unset: win rate lower bound 0.41 < 0.5")
