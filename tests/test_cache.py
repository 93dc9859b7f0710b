"""The latent cache and precomputed reference errors: training from them equals live training, loads no encoders
and no reference, and refuses a cache that does not fit."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from sdpo.config import load_config
from sdpo.errors import DataError, TrainingError
from sdpo.models import load_model
from sdpo.models.tiny import build_tiny_pipeline, build_toy_sd15
from sdpo.train.encode import add_reference_errors, encode_dataset
from sdpo.train.noise import draw_pairs
from sdpo.train.trainer import Trainer, train

ENCODERS = (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)
DENOISERS = (UNet2DConditionModel, SD3Transformer2DModel)
# prompt dropout and flips on, so that every per-pair draw is exercised
RUN = ["train.batch_size=4", "train.steps=3", "train.log_every=1", "train.heldout_every=0", "train.beta=500",
       "train.prompt_dropout=0.3", "train.random_flip=true", "train.seed=5"]
# implicit accuracy is left out: at step 1 u is float noise around 0 (policy == reference), so its sign is too
CURVES = ("loss", "lambda_mean", "inside_term", "model_mse_w", "model_mse_l", "winner_delta", "loser_delta")
ATOL = {"inside_term": 1e-4}  # beta / 2 = 250 times the errors' float noise


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The toy-size SD1.5 model on 16 px pairs; tiny SDXL and SD3 on 32 px pairs (12 pairs each)."""
    from pipeline_fixtures import make_shards

    from sdpo.data.synthetic import VOCABULARY

    root = tmp_path_factory.mktemp("cache-worlds")
    shards = {r: make_shards(root / f"px{r}", pairs=12, seed=3, split="train", resolution=r) for r in (16, 32)}
    models = {"sd15": build_toy_sd15(str(root / "sd15"), vocabulary=list(VOCABULARY), resolution=16),
              "sdxl": build_tiny_pipeline("sdxl", str(root / "sdxl"), resolution=32),
              "sd3": build_tiny_pipeline("sd3", str(root / "sd3"), resolution=32)}
    res = {"sd15": 16, "sdxl": 32, "sd3": 32}
    return {f: {"model": Path(models[f]), "shards": shards[res[f]]} for f in models}


def _config(family: str, *extra: str):
    return load_config(None, [*RUN, f"model.family={family}", *extra])


def _encode(world: dict[str, Path], out: Path, cfg, *, reference: bool) -> dict:
    model = load_model(str(world["model"]))
    model.freeze_all_but_denoiser()
    out.mkdir(parents=True)
    manifest = encode_dataset(model, world["shards"], out, cfg.train, model_uri=str(world["model"]),
                              shard_max_pairs=5, source_uri=str(world["shards"]), progress=False)
    if reference:
        manifest = add_reference_errors(model, out, cfg.train, progress=False)
    return manifest


def _curves(run_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {name: [row[name] for row in rows] for name in CURVES}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    return {k: v.detach().clone() for k, v in denoiser.state_dict().items()}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_cached_and_precomputed_training_equal_live_training(worlds, tmp_path, family):
    """Loss, lambda and winner/loser error curves: live VAE/text encoders/reference == fp32 cache == cache with
    precomputed reference errors, within float tolerance; so are the trained weights."""
    world = worlds[family]
    cfg = _config(family, "train.cache_dtype=float32")
    manifest = _encode(world, tmp_path / "cache", cfg, reference=True)
    assert manifest["reference"]["shape"] == [12, 1, 2] and manifest["cache"]["flips"] is True
    runs = {
        "live": (cfg, {}),
        "cached": (_config(family, "train.cache_dtype=float32", "train.cache=true"),
                   {"cache_dir": tmp_path / "cache"}),
        "precomputed": (_config(family, "train.cache_dtype=float32", "train.cache=true",
                                "train.precompute_reference=true"), {"cache_dir": tmp_path / "cache"}),
    }
    curves, weights = {}, {}
    for name, (run_cfg, kwargs) in runs.items():
        result = train(run_cfg, shards_dir=world["shards"], base_model=str(world["model"]),
                       output_dir=tmp_path / name, variant="dpo-sdpo", show_progress=False, **kwargs)
        curves[name], weights[name] = _curves(tmp_path / name), _weights(result.model_dir)
    base = _weights(world["model"])
    assert 0 < curves["live"]["lambda_mean"][0] < 1  # the safeguard is active, so lambda is compared for real
    assert abs(curves["live"]["winner_delta"][0]) < 1e-6  # step 1: the policy is the reference
    for name in ("cached", "precomputed"):
        for key in CURVES:
            np.testing.assert_allclose(curves[name][key], curves["live"][key], rtol=1e-4,
                                       atol=ATOL.get(key, 1e-5), err_msg=f"{name} {key}")
        # AdamW's update is nearly sign(grad) * lr where gradients are tiny, so compare the whole update
        live = torch.cat([(weights["live"][k] - base[k]).flatten() for k in base])
        other = torch.cat([(weights[name][k] - base[k]).flatten() for k in base])
        assert float((other - live).norm() / live.norm()) < 1e-2, name  # measured: 2e-5 to 3e-4


def test_fp16_cache_stays_close_to_live_training(worlds, tmp_path):
    world = worlds["sd15"]
    cfg = _config("sd15")
    _encode(world, tmp_path / "cache", cfg, reference=False)
    live = train(cfg, shards_dir=world["shards"], base_model=str(world["model"]), output_dir=tmp_path / "live",
                 variant="dpo-sdpo", show_progress=False)
    cached = train(_config("sd15", "train.cache=true"), shards_dir=world["shards"], base_model=str(world["model"]),
                   output_dir=tmp_path / "cached", variant="dpo-sdpo", cache_dir=tmp_path / "cache",
                   show_progress=False)
    assert live.steps == cached.steps == 3
    a, b = _curves(tmp_path / "live"), _curves(tmp_path / "cached")
    np.testing.assert_allclose(b["model_mse_w"], a["model_mse_w"], rtol=2e-3)
    np.testing.assert_allclose(b["model_mse_l"], a["model_mse_l"], rtol=2e-3)


def _new_instances(before: list, kinds: tuple[type, ...]) -> list:
    seen = {id(o) for o in before}
    return [o for o in gc.get_objects() if isinstance(o, kinds) and id(o) not in seen]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_cached_training_loads_no_encoders_and_precomputed_no_reference(worlds, tmp_path, family):
    world = worlds[family]
    _encode(world, tmp_path / "cache", _config(family, "train.cache=true", "train.precompute_reference=true"),
            reference=True)
    gc.collect()
    before = [o for o in gc.get_objects() if isinstance(o, ENCODERS + DENOISERS)]  # held: ids stay unique
    seen: dict[str, list] = {}

    def look(_row, step) -> None:
        seen[f"encoders-{step}"] = _new_instances(before, ENCODERS)
        seen[f"denoisers-{step}"] = _new_instances(before, DENOISERS)

    for mode, extra in (("cached", []), ("precomputed", ["train.precompute_reference=true"])):
        seen.clear()
        trainer = Trainer(_config(family, "train.cache=true", *extra), shards_dir=world["shards"],
                          base_model=str(world["model"]), output_dir=tmp_path / mode, variant="dpo-sdpo",
                          cache_dir=tmp_path / "cache", on_metrics=look, show_progress=False)
        trainer.run()
        assert trainer.model.pipeline.vae is None and trainer.model.pipeline.text_encoder is None
        assert all(not found for key, found in seen.items() if key.startswith("encoders")), mode
        denoisers = {key: len(found) for key, found in seen.items() if key.startswith("denoisers")}
        # the policy and, with a live reference, its frozen copy; with precomputed errors the policy alone
        assert set(denoisers.values()) == ({2} if mode == "cached" else {1}), (mode, denoisers)
        assert (trainer.reference is None) == (mode == "precomputed")
        # the exported model is still a complete pipeline (the encoders copied from the base folder)
        pipe = DiffusionPipeline.from_pretrained(tmp_path / mode / "model")
        assert pipe.vae is not None and pipe.text_encoder is not None
        del trainer, pipe
        gc.collect()


def test_trainer_refuses_a_cache_of_another_model_or_resolution(worlds, tmp_path):
    world = worlds["sdxl"]
    cfg = _config("sdxl", "train.cache=true")
    _encode(world, tmp_path / "cache", cfg, reference=False)
    other = build_tiny_pipeline("sdxl", str(tmp_path / "other-sdxl"), resolution=32, seed=9)  # other weights
    with pytest.raises(DataError, match=r"refusing this latent cache: .*component\(s\) \[.*'text_encoder'.*'vae'"):
        train(cfg, shards_dir=world["shards"], base_model=other, output_dir=tmp_path / "a", variant="dpo",
              cache_dir=tmp_path / "cache", show_progress=False)
    with pytest.raises(DataError, match=r"encoded at 32 px, the training data is 16 px.*encoded from other shards"):
        train(cfg, shards_dir=worlds["sd15"]["shards"], base_model=str(world["model"]), output_dir=tmp_path / "b",
              variant="dpo", cache_dir=tmp_path / "cache", show_progress=False)
    with pytest.raises(DataError, match="encoded for a sdxl model, training uses a sd3 model"):
        train(_config("sd3", "train.cache=true"), shards_dir=world["shards"], base_model=str(worlds["sd3"]["model"]),
              output_dir=tmp_path / "c", variant="dpo", cache_dir=tmp_path / "cache", show_progress=False)


def test_precomputed_reference_refuses_other_settings_and_too_few_epochs(worlds, tmp_path):
    world = worlds["sd15"]
    cfg = _config("sd15", "train.cache=true", "train.precompute_reference=true")
    _encode(world, tmp_path / "cache", cfg, reference=True)
    common = {"shards_dir": world["shards"], "base_model": str(world["model"]), "cache_dir": tmp_path / "cache",
              "show_progress": False, "variant": "dpo-sdpo"}
    with pytest.raises(TrainingError, match=r"other settings \(seed: cache 5, training 6\)"):
        train(_config("sd15", "train.cache=true", "train.precompute_reference=true", "train.seed=6"),
              output_dir=tmp_path / "a", **common)
    with pytest.raises(TrainingError, match=r"reference errors for 1 epoch\(s\) .* reach 2; set "
                                            r"train.reference_epochs=2"):
        train(_config("sd15", "train.cache=true", "train.precompute_reference=true", "train.steps=4"),
              output_dir=tmp_path / "b", **common)


def test_pair_draws_depend_only_on_seed_epoch_and_key(worlds):
    model = load_model(str(worlds["sd3"]["model"]))
    shape = (16, 16, 16)
    batch = draw_pairs(model, ["a", "b", "c"], [0, 0, 1], seed=1, latent_shape=shape, prompt_dropout=0.5)
    alone = draw_pairs(model, ["c"], [1], seed=1, latent_shape=shape, prompt_dropout=0.5)
    for field in ("keep_prompt", "timesteps", "noise", "posterior_w", "posterior_l"):
        assert torch.equal(getattr(batch, field)[2:], getattr(alone, field)), field
    other_epoch = draw_pairs(model, ["c"], [2], seed=1, latent_shape=shape, prompt_dropout=0.5)
    other_seed = draw_pairs(model, ["c"], [1], seed=2, latent_shape=shape, prompt_dropout=0.5)
    assert not torch.equal(other_epoch.noise, alone.noise) and not torch.equal(other_seed.noise, alone.noise)
    # dropout draws do not move the other draws
    kept = draw_pairs(model, ["c"], [1], seed=1, latent_shape=shape, prompt_dropout=0.0)
    assert torch.equal(kept.noise, alone.noise) and bool(kept.keep_prompt.all())
