"""Checkpoints: nothing is unpickled from them, and a resume continues only the run that wrote them.

Every case goes through the train stage (``sdpo.stages.train``, what the CLI and the flow call) unless it checks
the trainer's own guard; each refusal also shows that the checkpoints already there are intact.
"""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from train_world import ACCELERATE_NAMES, context, make_root, plant, snapshot

from sdpo import fs, stages
from sdpo.errors import ModelError, SdpoError, TrainingError
from sdpo.train import checkpoint as ck
from sdpo.train.trainer import train

ARM = "dpo"
CKPT = "models/dpo/checkpoints"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, small_shards, tiny_sd15, tracking_uri) -> Path:
    """A root whose `dpo` run stopped right after its first checkpoint (the stage's fault hook)."""
    root = make_root(tmp_path_factory.mktemp("interrupted") / "root", small_shards, tiny_sd15)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv(stages.FAULT_ENV, "train-after-checkpoint")
        with pytest.raises(TrainingError, match="injected fault"):
            stages.train(context(root), ARM)
    assert ck.complete_checkpoints(root / CKPT) == ["step-0000001"]
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "root"))


def test_checkpoints_hold_only_json_and_safetensors(interrupted):
    files = sorted(p.name for p in (interrupted / CKPT / "step-0000001").iterdir())
    assert files == ["COMPLETE", "denoiser.safetensors", "optimizer.safetensors", "rank-0.json",
                     "rank-0.safetensors", "state.json"]
    state = ck.read_state(interrupted / CKPT / "step-0000001")
    assert state["step"] == 1 and state["identity"]["digest"].startswith("sha256:")
    assert state["config"]["train"]["lr"] == 1e-5  # the config in force is in the checkpoint


def test_planted_pickles_never_run_and_resume_uses_the_safe_files(interrupted, tmp_path, tracking):
    root = _copy(interrupted, tmp_path)
    marker = tmp_path / "code-ran"
    step1 = root / CKPT / "step-0000001"
    for name in ACCELERATE_NAMES:  # every file name accelerate's load_state would open
        plant(step1 / name, marker)
    pickle.loads((step1 / "custom_checkpoint_0.pkl").read_bytes())  # the trap is live: unpickling runs it
    assert marker.exists()
    marker.rmdir()

    summary = stages.train(context(root), ARM, resume=True)

    assert not marker.exists()
    assert summary["steps"] == 3 and summary["resumed_from"] == "step-0000001"
    final = root / CKPT / "step-0000003"
    assert not {p.name for p in final.iterdir()} & set(ACCELERATE_NAMES)  # and none is written


SAFE_FILES = ["state.json", "denoiser.safetensors", "optimizer.safetensors", "rank-0.json", "rank-0.safetensors"]


def test_a_pickle_in_place_of_a_safe_file_is_refused_unrun(interrupted, tmp_path, tiny_sd15, tracking):
    marker = tmp_path / "code-ran"
    for name in SAFE_FILES:
        root = Path(shutil.copytree(interrupted, tmp_path / name))
        step1 = root / CKPT / "step-0000001"
        plant(step1 / name, marker)
        before = snapshot(root / CKPT)
        with pytest.raises(SdpoError, match=rf"{name}: not (JSON|a safetensors file)") as err:
            if name == "state.json":  # the stage reads it before anything is staged
                stages.train(context(root), ARM, resume=True)
            else:  # the trainer reads the rest
                train(context(root).cfg, shards_dir=root / "shards" / "train", base_model=str(tiny_sd15),
                      output_dir=root / "models" / ARM, variant=ARM, resume=True, show_progress=False)
        assert "refusing to load it" in str(err.value)
        assert not marker.exists(), name
        assert snapshot(root / CKPT) == before and not (root / "models" / ARM / "model").exists()


@pytest.mark.parametrize(("change", "named"), [
    ("config", [r"train\.beta 500\.0 -> 100\.0", r"train\.seed 0 -> 5"]),
    ("data", [r"the train data changed \(manifest sha256:"]),
    ("base", [r"the base model changed"]),
    ("schedule", [r"train\.steps 3 -> 5 changes the 'linear' lr schedule"]),
])
def test_resume_of_another_run_is_refused_naming_what_changed(interrupted, tmp_path, tracking, change,
                                                              named):
    root = _copy(interrupted, tmp_path)
    sets: list[str] = []
    if change == "config":
        sets = ["train.beta=100", "train.seed=5"]
    elif change == "data":  # other pairs under the same path
        from pipeline_fixtures import make_shards

        shutil.rmtree(root / "shards" / "train")
        make_shards(tmp_path / "other", pairs=12, seed=4, split="train", resolution=32)
        shutil.copytree(tmp_path / "other" / "train", root / "shards" / "train")
    elif change == "base":  # a base folder with other content
        base = Path(fs.read_json(root / "models" / "base" / "base.json")["uri"])
        shutil.copytree(base, tmp_path / "base2")
        (tmp_path / "base2" / "NOTES.txt").write_text("edited\n")
        fs.write_json(root / "models" / "base" / "base.json", {"uri": str(tmp_path / "base2")})
    else:  # the checkpoint was written under a constant schedule; with a linear one, steps feed the lr
        sets = ["train.lr_schedule=linear", "train.steps=5"]
    before = snapshot(root / CKPT)
    with pytest.raises(TrainingError, match=r"cannot resume .*step-0000001: it is another run") as err:
        stages.train(context(root, *sets), ARM, resume=True)
    for pattern in named:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
    assert snapshot(root / CKPT) == before and not (root / "models" / ARM / "model").exists()


def test_trainer_refuses_other_data_itself(interrupted, tmp_path, tiny_sd15):
    """The trainer checks the identity too (a direct `train()` call or a job file bypasses the stage)."""
    from pipeline_fixtures import make_shards

    root = _copy(interrupted, tmp_path)
    other = make_shards(tmp_path / "other", pairs=12, seed=4, split="train", resolution=32)
    before = snapshot(root / CKPT)
    with pytest.raises(TrainingError, match="the train data changed"):
        train(context(root).cfg, shards_dir=other, base_model=str(tiny_sd15), output_dir=root / "models" / ARM,
              variant=ARM, resume=True, show_progress=False)
    assert snapshot(root / CKPT) == before


def test_resume_with_a_lower_lr_applies_it_and_records_it(interrupted, tmp_path, tracking):
    root = _copy(interrupted, tmp_path)
    summary = stages.train(context(root, "train.lr=1e-6", "train.steps=4"), ARM, resume=True)

    assert summary["train"]["lr"] == 1e-6 and summary["config"]["train"]["lr"] == 1e-6  # the config in force
    assert [r["changed"] for r in summary["resumes"]] == [{"train.lr": [1e-5, 1e-6], "train.steps": [3, 4]}]
    rows = fs.read_jsonl(root / "models" / ARM / "metrics.jsonl")
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-5), (2, 1e-6), (3, 1e-6), (4, 1e-6)]
    state = ck.read_state(root / CKPT / "step-0000004")  # what the optimizer and scheduler really used
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-6]
    assert state["scheduler"]["base_lrs"] == [1e-6] and state["history"] == summary["resumes"]


def test_a_fresh_run_never_continues_an_old_one(interrupted, tmp_path, tiny_sd15, tracking):
    root = _copy(interrupted, tmp_path)
    old_run = ck.read_state(root / CKPT / "step-0000001")["run_id"]
    before = snapshot(root / CKPT)
    with pytest.raises(TrainingError, match="holds checkpoints of an earlier run"):  # the trainer's own guard
        train(context(root, "train.seed=5").cfg, shards_dir=root / "shards" / "train", base_model=str(tiny_sd15),
              output_dir=root / "models" / ARM, variant=ARM, show_progress=False)
    assert snapshot(root / CKPT) == before

    # a new run over the old one (--overwrite), killed after its first checkpoint, then resumed: its own weights
    new = context(root, "train.seed=5")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(stages.FAULT_ENV, "train-after-checkpoint")
        with pytest.raises(TrainingError, match="injected fault"):
            stages.train(new, ARM, overwrite=True)
    new_run = ck.read_state(root / CKPT / "step-0000001")["run_id"]
    assert new_run != old_run
    summary = stages.train(new, ARM, resume=True)
    assert summary["run_id"] == new_run and summary["resumed_from"] == "step-0000001"
    assert json.loads((root / "models" / ARM / "training_summary.json").read_text())["config"]["train"]["seed"] == 5


def test_resume_on_an_object_store_root_checks_and_continues_the_mirrored_run(moto_s3, small_shards, tiny_sd15,
                                                                               tmp_path, tracking, monkeypatch):
    """On an s3:// root training works in scratch and mirrors checkpoints; a retry on a fresh machine resumes them."""
    root = f"s3://{moto_s3.bucket}/run"
    fs.publish_dir(small_shards, f"{root}/shards/train", marker="manifest.json")
    fs.write_json(f"{root}/models/base/base.json", {"uri": str(tiny_sd15)})
    monkeypatch.setenv(stages.FAULT_ENV, "train-after-checkpoint")
    with pytest.raises(TrainingError, match="injected fault"):
        stages.train(context(root), ARM)
    monkeypatch.delenv(stages.FAULT_ENV)
    assert ck.complete_checkpoints(f"{root}/{CKPT}") == ["step-0000001"]
    with pytest.raises(TrainingError, match=r"train\.beta 500\.0 -> 100\.0"):  # from the mirrored state.json
        stages.train(context(root, "train.beta=100"), ARM, resume=True)

    summary = stages.train(context(root), ARM, resume=True)
    assert summary["resumed_from"] == "step-0000001" and summary["steps"] == 3
    assert ck.complete_checkpoints(f"{root}/{CKPT}") == ["step-0000002", "step-0000003"]  # keep 2 over both
    assert fs.exists(f"{root}/models/{ARM}/model/model_index.json")

    # Extended with every checkpoint kept: the retry fetches only the one it resumes from, and the store keeps the
    # older one it did not fetch.
    fetched = []
    real_download = fs.download
    monkeypatch.setattr(fs, "download", lambda uri, local: fetched.append(str(uri)) or real_download(uri, local))
    summary = stages.train(context(root, "train.steps=5", "train.keep_checkpoints=0"), ARM, resume=True)
    assert summary["resumed_from"] == "step-0000003" and summary["steps"] == 5
    assert {uri.split("/checkpoints/")[1].split("/")[0] for uri in fetched if "/checkpoints/" in uri} == {
        "step-0000003"}  # its state.json (the identity check), then the folder
    assert ck.complete_checkpoints(f"{root}/{CKPT}") == [f"step-000000{n}" for n in (2, 3, 4, 5)]


def test_a_pickle_planted_in_a_model_folder_does_not_run(tiny_sd15, tmp_path):
    """Model folders (the base, a trained model) load through diffusers: safetensors, or weights-only unpickling."""
    from sdpo.models import load_model

    base = Path(shutil.copytree(tiny_sd15, tmp_path / "base"))
    marker = tmp_path / "code-ran"
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    plant(base / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="Unable to load weights from checkpoint file"):  # weights-only refusal
        load_model(str(base), None)
    assert not marker.exists()
