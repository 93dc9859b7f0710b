"""The trainer: every family x method, exact resume, the NaN guard, LoRA mode, two processes."""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from sdpo.cli import main as cli
from sdpo.config import load_config
from sdpo.errors import TrainingError
from sdpo.models.tiny import build_tiny_pipeline
from sdpo.train.trainer import parameter_digest, train

TINY = ["train.batch_size=4", "train.log_every=1", "train.heldout_every=0", "train.beta=500"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: Path(build_tiny_pipeline(f, str(root / f), resolution=32)) for f in ("sd15", "sd2", "sdxl", "sd3")}


METHODS = [("sft", "off"), ("dpo", "pair"), ("dspo", "batch"), ("dmpo", "pair")]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3"])
@pytest.mark.parametrize(("method", "safeguard"), METHODS)
def test_each_family_trains_each_method(tiny_models, small_shards, tmp_path, family, method, safeguard):
    cfg = load_config(None, [*TINY, "train.steps=2", f"train.variants.dpo-sdpo.method={method}",
                             f"train.variants.dpo-sdpo.safeguard={safeguard}"])
    result = train(cfg, shards_dir=small_shards, base_model=str(tiny_models[family]), output_dir=tmp_path,
                   variant="dpo-sdpo", show_progress=False)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_metrics["loss"]))
    if method != "sft":
        assert 0.0 <= result.final_metrics["lambda_mean"] <= 1.0
        assert "winner_delta" in result.final_metrics
    pipe = DiffusionPipeline.from_pretrained(result.model_dir)
    base = DiffusionPipeline.from_pretrained(tiny_models[family])
    name = "transformer" if family == "sd3" else "unet"
    assert parameter_digest(getattr(pipe, name)) != parameter_digest(getattr(base, name))  # it really trained
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["data_manifest_digest"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_trained_model_samples_with_plain_diffusers(tiny_models, small_shards, tmp_path):
    cfg = load_config(None, [*TINY, "train.steps=1"])
    result = train(cfg, shards_dir=small_shards, base_model=str(tiny_models["sd15"]), output_dir=tmp_path,
                   show_progress=False)
    pipe = DiffusionPipeline.from_pretrained(result.model_dir)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_resume_equals_uninterrupted_run(tiny_models, small_shards, tmp_path):
    overrides = [*TINY, "train.steps=6", "train.checkpoint_every=2", "train.seed=7", "train.prompt_dropout=0.3",
                 "train.random_flip=true"]
    cfg = load_config(None, overrides)
    base = str(tiny_models["sd15"])
    full = train(cfg, shards_dir=small_shards, base_model=base, output_dir=tmp_path / "full", show_progress=False)
    part = train(cfg, shards_dir=small_shards, base_model=base, output_dir=tmp_path / "split", stop_after=3,
                 show_progress=False)
    assert part.steps == 3 and not (tmp_path / "split" / "model").exists()
    resumed = train(cfg, shards_dir=small_shards, base_model=base, output_dir=tmp_path / "split", resume=True,
                    show_progress=False)
    assert resumed.steps == 6
    a = DiffusionPipeline.from_pretrained(full.model_dir).unet
    b = DiffusionPipeline.from_pretrained(resumed.model_dir).unet
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_non_finite_training_stops_with_the_step_and_writes_no_bad_checkpoint(tiny_models, small_shards, tmp_path):
    """lr 1e30: the weights after step 1 are useless, so no checkpoint of them may be written or named good."""
    cfg = load_config(None, [*TINY, "train.steps=6", "train.checkpoint_every=1", "train.lr=1e30",
                             "train.max_grad_norm=0"])
    with pytest.raises(TrainingError, match=r"non-finite training at step 1 ") as err:
        train(cfg, shards_dir=small_shards, base_model=str(tiny_models["sd15"]), output_dir=tmp_path,
              show_progress=False)
    assert "no checkpoint passed the check" in str(err.value) and "--overwrite --set train.lr=1e-05" in str(err.value)
    assert not [k for k in (tmp_path / "checkpoints").glob("step-*") if (k / "COMPLETE").exists()]


def test_lora_mode_saves_adapter_and_merged_pipeline(tiny_models, small_shards, tmp_path):
    cfg = load_config(None, [*TINY, "train.steps=2", "model.lora.enabled=true", "train.lr=1e-2"])
    result = train(cfg, shards_dir=small_shards, base_model=str(tiny_models["sd15"]), output_dir=tmp_path,
                   show_progress=False)
    # the reference is the base network with adapters off: at step 1 the policy equals it, so deltas start at 0
    assert (tmp_path / "lora").is_dir()
    pipe = DiffusionPipeline.from_pretrained(result.model_dir)
    base = DiffusionPipeline.from_pretrained(tiny_models["sd15"])
    assert parameter_digest(pipe.unet) != parameter_digest(base.unet)
    base.load_lora_weights(str(tmp_path / "lora"))


@pytest.mark.parametrize(("lora", "keep"), [(False, 0), (True, 1)])
def test_a_checkpoint_exports_the_model_of_its_step(tiny_models, small_shards, tmp_path, lora, keep):
    """`train.keep_checkpoints` (0: every one) and :func:`export_model`: the last checkpoint, exported, is the model
    training wrote (LoRA: adapters fused the same way); an earlier one is another model."""
    from sdpo.train import checkpoint as ck

    cfg = load_config(None, [*TINY, "train.steps=2", "train.checkpoint_every=1", f"train.keep_checkpoints={keep}",
                             f"model.lora.enabled={str(lora).lower()}", "train.lr=1e-2"])
    result = train(cfg, shards_dir=small_shards, base_model=str(tiny_models["sd15"]), output_dir=tmp_path,
                   show_progress=False)
    kept = ck.complete_checkpoints(tmp_path / "checkpoints")
    assert kept == ["step-0000001", "step-0000002"][-keep if keep else 0:]
    ck.export_model(tmp_path / "checkpoints" / "step-0000002", str(tiny_models["sd15"]), tmp_path / "at-2")
    trained = parameter_digest(DiffusionPipeline.from_pretrained(result.model_dir).unet)
    assert parameter_digest(DiffusionPipeline.from_pretrained(tmp_path / "at-2").unet) == trained
    if not keep:
        ck.export_model(tmp_path / "checkpoints" / "step-0000001", str(tiny_models["sd15"]), tmp_path / "at-1")
        assert parameter_digest(DiffusionPipeline.from_pretrained(tmp_path / "at-1").unet) != trained


def test_cli_train_writes_model_under_the_layout(tiny_models, small_shards, tmp_path, monkeypatch):
    """`sdpo train --variant` reads ROOT/shards/train and the recorded base, writes ROOT/models/VARIANT."""
    import shutil

    from sdpo import fs

    root = tmp_path / "root"
    shutil.copytree(small_shards, root / "shards" / "train")
    fs.write_json(root / "models" / "base" / "base.json", {"uri": str(tiny_models["sd15"])})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["train", "--config", "params.yaml", "--variant", "dpo-sdpo", "--set", f"data.root={root}",
            "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "train.heldout_every=0",
            "--set", "train.cache=false"]
    assert cli(args) == 0 and (root / "models" / "dpo-sdpo" / "model" / "model_index.json").exists()
    assert cli(args) == 2  # a second run would silently discard the first one's checkpoints
    assert cli([*args, "--overwrite"]) == 0


def test_two_process_run_keeps_ranks_in_sync(tiny_models, small_shards, tmp_path):
    """train.accelerate_config makes the train stage run every rank under `accelerate launch` (gloo on CPU)."""
    import shutil

    import yaml

    from sdpo import fs, stages

    root = tmp_path / "root"
    shutil.copytree(small_shards, root / "shards" / "train")
    fs.write_json(root / "models" / "base" / "base.json", {"uri": str(tiny_models["sd15"])})
    launcher = tmp_path / "two_cpu_processes.yaml"
    launcher.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                                        "num_processes": 2, "num_machines": 1, "mixed_precision": "no",
                                        "dynamo_config": {}, "use_cpu": False, "main_training_function": "main"}))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = stages.StageContext.load(Path(__file__).resolve().parents[1] / "params.yaml", [
        f"data.root={root}", "train.steps=2", "train.batch_size=2", "train.heldout_every=0", "train.cache=false",
        "train.variants.dpo-sdpo.safeguard=batch", f"train.accelerate_config={launcher}"])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        summary = stages.train(ctx, "dpo-sdpo")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert summary["num_processes"] == 2 and summary["ranks_in_sync"] is True
