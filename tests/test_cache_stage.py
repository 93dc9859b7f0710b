"""The encode stage through the stage layer and the CLI, on a local root and on an s3:// root (moto in process)."""

import json
from pathlib import Path

import pytest

from sdpo import fs, stages
from sdpo.cli import main as cli
from sdpo.models.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=2", "train.batch_size=4", "train.heldout_every=0", "train.random_flip=true",
         "train.prompt_dropout=0.2", "data.resolution=32"]


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> str:
    return build_tiny_pipeline("sd15", str(tmp_path_factory.mktemp("tiny") / "sd15"), resolution=32)


def test_cli_encode_then_train_from_the_cache(tiny_sd15, small_shards, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(small_shards, root / "shards" / "train")
    fs.write_json(root / "models" / "base" / "base.json", {"uri": tiny_sd15})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = [f"data.root={root}", *SMALL, "train.cache=true", "train.precompute_reference=true"]
    args = [arg for item in sets for arg in ("--set", item)]
    assert cli(["encode", "--config", str(ROOT / "params.yaml"), *args]) == 0
    cache = root / "cache" / "encoded" / "train"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["cache"]["model"] == tiny_sd15 and manifest["cache"]["family"] == "sd15"
    assert set(manifest["cache"]["components"]) == {"vae", "text_encoder", "tokenizer"}
    assert manifest["cache"]["dtype"] == "float16" and manifest["resolution"] == 32
    assert manifest["reference"]["settings"]["prompt_dropout"] == 0.2
    # both arms of the experiment train from the one reference pass
    for arm in ("dpo", "dpo-sdpo"):
        assert cli(["train", "--config", str(ROOT / "params.yaml"), "--variant", arm, *args]) == 0
        assert (root / "models" / arm / "model" / "model_index.json").is_file()
    off = ["--set", f"data.root={root}", "--set", "train.cache=false"]
    assert cli(["encode", "--config", str(ROOT / "params.yaml"), *off]) == 2  # nothing to encode with the cache off


def test_encode_and_train_on_an_s3_root(tiny_sd15, small_shards, tmp_path, monkeypatch):
    from s3fs import S3FileSystem

    from sdpo.devstack import local_s3

    with local_s3("sdpo-cache-test") as s3:
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        S3FileSystem.clear_instance_cache()  # an earlier test's client may point at another endpoint
        try:
            ctx = stages.StageContext.load(ROOT / "params.yaml", [f"data.root=s3://{s3.bucket}/run", *SMALL,
                                                                  "train.cache=true"])
            fs.publish_dir(small_shards, ctx.layout.shards("train"), marker="manifest.json")
            fs.write_json(ctx.layout.base_record(), {"uri": tiny_sd15})
            result = stages.encode(ctx, "train")
            assert result["uri"] == f"s3://{s3.bucket}/run/cache/encoded/train" and result["pairs"] == 12
            keys = s3.keys("run/cache/encoded/train/")
            assert {"run/cache/encoded/train/manifest.json",
                    "run/cache/encoded/train/empty_prompt.safetensors"} <= set(keys)
            assert any(k.endswith(".tar") for k in keys) and result["flips"] is True

            downloaded: list[str] = []
            real_download = fs.download
            monkeypatch.setattr(fs, "download", lambda uri, local: downloaded.append(str(uri))
                                or real_download(uri, local))
            summary = stages.train(ctx, "dpo-sdpo")
            assert summary["steps"] == 2 and fs.exists(fs.join(ctx.layout.model("dpo-sdpo"), "model_index.json"))
            train_shards = ctx.layout.shards("train")
            assert f"{train_shards}/manifest.json" in downloaded  # the images of the shards are never fetched
            assert not any(uri.startswith(train_shards) and uri.endswith(".tar") for uri in downloaded)
            assert train_shards not in downloaded
        finally:
            S3FileSystem.clear_instance_cache()


def test_a_cache_of_the_same_inputs_is_reused_and_any_change_encodes_again(tiny_sd15, small_shards, tmp_path,
                                                                            monkeypatch, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(small_shards, root / "shards" / "train")
    fs.write_json(root / "models" / "base" / "base.json", {"uri": tiny_sd15})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    manifest = root / "cache" / "encoded" / "train" / "manifest.json"

    def encode(*extra: str) -> str:
        ctx = stages.StageContext.load(ROOT / "params.yaml", [f"data.root={root}", *SMALL, "train.cache=true",
                                                              *extra])
        capsys.readouterr()
        stages.encode(ctx, "train")
        return capsys.readouterr().out

    assert "(there is none yet)" in encode()
    first = manifest.read_bytes()
    assert "is up to date" in encode() and manifest.read_bytes() == first  # nothing written the second time
    assert "other cache settings" in encode("train.cache_dtype=float32")
    assert json.loads(manifest.read_text())["cache"]["dtype"] == "float32"
    assert "holds no reference errors" in encode("train.cache_dtype=float32", "train.precompute_reference=true")
    assert "is up to date" in encode("train.cache_dtype=float32", "train.precompute_reference=true")
    assert "another number of epochs" in encode("train.cache_dtype=float32", "train.precompute_reference=true",
                                                 "train.steps=20")
    assert "is up to date" in encode("train.cache_dtype=float32")  # reference errors it does not need do no harm

    other = build_tiny_pipeline("sd15", str(tmp_path / "other-base"), resolution=32, seed=1)
    fs.write_json(root / "models" / "base" / "base.json", {"uri": other})
    assert "VAE or text encoders differ" in encode("train.cache_dtype=float32")
    assert json.loads(manifest.read_text())["cache"]["model"] == other
