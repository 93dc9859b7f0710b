"""The family adapter on tiny pipelines: encoding, timesteps, noised inputs and targets, predict, save, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from sdpo.errors import ModelError
from sdpo.models import build_tiny_pipeline, detect_family, load_model

FAMILIES = ("sd15", "sd2", "sdxl", "sd3")
RESOLUTION = 16
LATENT_CHANNELS = {"sd15": 4, "sd2": 4, "sdxl": 4, "sd3": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_pipeline(f, str(root / f), resolution=RESOLUTION) for f in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {f: load_model(folders[f]) for f in FAMILIES}


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_families_and_prediction_types(folders, models):
    expected = {"sd15": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sd3": "flow"}
    for family in FAMILIES:
        assert detect_family(folders[family]) == family
        model = models[family]
        assert (model.family, model.prediction_type, model.source) == (family, expected[family], folders[family])
        assert model.num_train_timesteps == 1000
        assert model.denoiser is (model.pipeline.transformer if family == "sd3" else model.pipeline.unet)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_applies_the_vae_scaling(models, family):
    model = models[family]
    pixels = _pixels()
    latents = model.encode_images(pixels, sample=False)
    assert latents.shape == (2, LATENT_CHANNELS[family], RESOLUTION // 2, RESOLUTION // 2)
    assert not latents.requires_grad

    vae = model.pipeline.vae
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    assert (family == "sd3") == (shift != 0.0)
    torch.testing.assert_close(latents, (mean - shift) * vae.config.scaling_factor)

    first = model.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    again = model.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, latents)  # a posterior sample, reproducible


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_shapes_and_empty_prompt(models, family):
    model = models[family]
    cond = model.encode_prompts(["a red circle", ""])
    expected_keys = {
        "sd15": {"encoder_hidden_states"},
        "sd2": {"encoder_hidden_states"},
        "sdxl": {"encoder_hidden_states", "text_embeds", "time_ids"},
        "sd3": {"encoder_hidden_states", "pooled_projections"},
    }[family]
    assert set(cond) == expected_keys
    for tensor in cond.values():
        assert tensor.shape[0] == 2 and torch.isfinite(tensor).all() and not tensor.requires_grad
    hidden = cond["encoder_hidden_states"]
    assert not torch.equal(hidden[0], hidden[1])  # the prompt reaches the conditioning
    if family == "sdxl":
        assert cond["time_ids"].tolist() == [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 2
        assert model.encode_prompts(["a"], image_size=(24, 40))["time_ids"].tolist() == [[24, 40, 0, 0, 24, 40]]
    if family == "sd3":
        assert hidden.shape[1] == 77 + model.max_sequence_length  # CLIP tokens then T5 tokens


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_unet_noisy_input_and_target_definitions(models, family):
    model = models[family]
    generator = torch.Generator().manual_seed(0)
    timesteps = model.sample_timesteps(64, generator)
    assert timesteps.dtype == torch.long and timesteps.min() >= 0 and timesteps.max() < 1000
    assert torch.equal(timesteps, model.sample_timesteps(64, torch.Generator().manual_seed(0)))

    x0 = torch.randn(64, 4, 8, 8, generator=generator)
    noise = torch.randn(64, 4, 8, 8, generator=generator)
    noisy, target = model.noisy_input_and_target(x0, noise, timesteps)
    alpha_bar = model.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    torch.testing.assert_close(noisy, alpha * x0 + sigma * noise)
    if family == "sd15":
        assert torch.equal(target, noise)
    else:
        torch.testing.assert_close(target, alpha * noise - sigma * x0)


def test_flow_noisy_input_and_target_definitions(models):
    model = models["sd3"]
    timesteps = model.sample_timesteps(64, torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, model.sample_timesteps(64, torch.Generator().manual_seed(0)))
    # timesteps are entries of the scheduler's (shift 3) training table, and sigma = t / 1000 on that table
    table = model.noise_scheduler.timesteps
    indices = (table[None, :] - timesteps[:, None]).abs().argmin(dim=1)
    assert torch.equal(table[indices], timesteps)
    torch.testing.assert_close(model.sigmas(timesteps).flatten(), model.noise_scheduler.sigmas[indices])
    assert timesteps.std() > 50  # not collapsed onto one value

    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 16, 8, 8, generator=generator)
    noise = torch.randn(64, 16, 8, 8, generator=generator)
    noisy, target = model.noisy_input_and_target(x0, noise, timesteps)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(target, noise - x0)


def test_flow_timesteps_survive_pipeline_sampling(models):
    model = models["sd3"]
    before = model.sample_timesteps(8, torch.Generator().manual_seed(5))
    model.pipeline("a cat", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="pt")
    assert torch.equal(before, model.sample_timesteps(8, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_backward_reaches_the_denoiser_only(folders, family):
    model = load_model(folders[family])
    model.freeze_all_but_denoiser()
    modules = [c for c in model.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    others = [c for c in modules if c is not model.denoiser]
    assert others and all(not p.requires_grad for c in others for p in c.parameters())
    assert all(not c.training for c in others)

    generator = torch.Generator().manual_seed(0)
    latents = model.encode_images(_pixels(), generator=generator)
    cond = model.encode_prompts(["a red circle", "a blue square"])
    timesteps = model.sample_timesteps(2, generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy, target = model.noisy_input_and_target(latents, noise, timesteps)
    prediction = model.predict(model.denoiser, noisy, timesteps, cond)
    assert prediction.shape == noisy.shape

    (prediction - target).square().mean().backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    assert all(p.grad is None for c in others for p in c.parameters())


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_save_pipeline_round_trips_with_a_given_denoiser(tmp_path, folders, family):
    model = load_model(folders[family])
    original = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    changed = type(model.denoiser).from_config(model.denoiser.config)
    with torch.no_grad():
        for param in changed.parameters():
            param.add_(0.5)

    model.save_pipeline(str(tmp_path / "changed"), denoiser=changed)
    model.save_pipeline(str(tmp_path / "same"))

    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path / "changed"))
    name = "transformer" if family == "sd3" else "unet"
    saved = getattr(reloaded, name).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in changed.state_dict().items())
    vae = reloaded.vae.state_dict()
    assert all(torch.equal(vae[k], v) for k, v in model.pipeline.vae.state_dict().items())
    assert getattr(model.pipeline, name) is model.denoiser  # the loaded pipeline keeps its own denoiser
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in original.items())

    same = load_model(str(tmp_path / "same"))
    assert same.family == family
    assert all(torch.equal(same.denoiser.state_dict()[k], v) for k, v in original.items())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind


def test_save_pipeline_replaces_an_existing_folder(tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    models["sd15"].save_pipeline(str(out))
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()


def test_load_model_errors_name_the_path_and_problem(tmp_path, folders):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=f"{empty}: no model_index.json"):
        load_model(str(empty))
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "missing" / "folder"))

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd15"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match=f"{broken}: component 'vae' is listed in model_index.json but vae/ is mis"):
        load_model(str(broken))

    unlisted = tmp_path / "unlisted"
    shutil.copytree(folders["sdxl"], unlisted)
    index = json.loads((unlisted / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (unlisted / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="no component 'text_encoder_2', which a sdxl model needs"):
        load_model(str(unlisted))

    with pytest.raises(ModelError, match="model.family is 'sdxl' but the folder holds a sd3 pipeline"):
        load_model(folders["sd3"], family="sdxl")
    with pytest.raises(ModelError, match="unknown"):
        load_model(folders["sd3"], family="flux")

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="'FluxPipeline'"):
        detect_family(str(other))


def test_load_model_offline_hub_id_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="no-such-org/no-such-model: not a local folder"):
        load_model("no-such-org/no-such-model")


def test_sd2_given_as_sd15_keeps_v_prediction(folders):
    model = load_model(folders["sd2"], family="sd15")
    assert (model.family, model.prediction_type) == ("sd15", "v_prediction")


def test_sd3_without_t5_loads_and_encodes(tmp_path, models):
    # diffusers writes text_encoder_3 as [null, null] and then refuses the folder unless it is passed as None again
    pipeline = models["sd3"].pipeline
    type(pipeline).from_pipe(pipeline, text_encoder_3=None, tokenizer_3=None).save_pretrained(tmp_path / "no-t5")
    model = load_model(str(tmp_path / "no-t5"))
    assert model.pipeline.text_encoder_3 is None
    cond = model.encode_prompts(["a red circle"])
    assert cond["encoder_hidden_states"].shape == (1, 77 + model.max_sequence_length, 64)
