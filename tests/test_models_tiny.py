"""Tiny offline pipelines: complete diffusers folders that load with plain from_pretrained and sample on a CPU."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from sdpo.cli import main
from sdpo.models import build_tiny_pipeline, build_toy_sd15, detect_family, load_model

PIPELINE_CLASS = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
}


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", sorted(PIPELINE_CLASS))
def test_tiny_pipeline_loads_with_diffusers_and_samples(tmp_path, family):
    folder = build_tiny_pipeline(family, str(tmp_path / family), seed=1)

    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert type(pipeline).__name__ == PIPELINE_CLASS[family]
    images = pipeline(
        "a red circle",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all()
    assert detect_family(folder) == family
    assert load_model(folder).family == family


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    first = load_model(build_tiny_pipeline("sd15", str(tmp_path / "a"), seed=3)).denoiser.state_dict()
    again = load_model(build_tiny_pipeline("sd15", str(tmp_path / "b"), seed=3)).denoiser.state_dict()
    other = load_model(build_tiny_pipeline("sd15", str(tmp_path / "c"), seed=4)).denoiser.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_clip_tokenizer_keeps_words_and_spells_unknown_text(tmp_path):
    folder = build_tiny_pipeline("sdxl", str(tmp_path / "sdxl"), vocabulary=["crimson", "zebra"])
    for subfolder in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=subfolder)
        assert tokenizer.model_max_length == 77
        tokens = tokenizer.tokenize("A crimson Zebra")
        assert tokens == ["a</w>", "crimson</w>", "zebra</w>"]  # lower-cased, one token per known word
        ids = tokenizer("an unknown wordé, 42!").input_ids
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids[1:-1]).replace(" ", "") == "anunknownwordé,42!"
        assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_t5_tokenizer_keeps_words_and_spells_unknown_text(tmp_path):
    folder = build_tiny_pipeline("sd3", str(tmp_path / "sd3"), vocabulary=["crimson", "zebra"])
    tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3")
    assert tokenizer.model_max_length == 256
    assert tokenizer.tokenize("a crimson Zebra") == ["▁a", "▁crimson", "▁Zebra"]
    ids = tokenizer("Quixotic jump, 42!").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Quixotic jump, 42!"


def test_sd2_is_v_prediction_and_sd3_vae_has_shift(tmp_path):
    sd2 = build_tiny_pipeline("sd2", str(tmp_path / "sd2"))
    sd3 = build_tiny_pipeline("sd3", str(tmp_path / "sd3"))
    scheduler = json.loads((tmp_path / "sd2/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    vae = json.loads((tmp_path / "sd3/vae/config.json").read_text())
    assert vae["shift_factor"] and vae["scaling_factor"]
    assert load_model(sd2).prediction_type == "v_prediction"
    assert load_model(sd3).prediction_type == "flow"


def test_resolution_sets_default_image_size(tmp_path):
    model = load_model(build_tiny_pipeline("sd3", str(tmp_path / "sd3"), resolution=24))
    assert model.default_resolution == 24


def test_toy_sd15_architecture(tmp_path):
    vocabulary = ["a", "red", "green", "blue", "yellow", "circle", "square"]
    folder = build_toy_sd15(str(tmp_path / "toy"), vocabulary=vocabulary, resolution=16)
    pipeline = DiffusionPipeline.from_pretrained(folder)

    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.vae_scale_factor == 1  # the VAE does not downsample: latents are 4 x 16 x 16
    assert 100_000 <= _n_params(pipeline.vae) <= 200_000
    assert 500_000 <= _n_params(pipeline.unet) <= 1_000_000
    assert _n_params(pipeline.text_encoder) <= 100_000
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.unet.config.addition_embed_type is None  # pooled_text=False: the prompt enters by cross-attention
    scheduler = pipeline.scheduler.config
    assert (scheduler.prediction_type, scheduler.beta_schedule, scheduler.num_train_timesteps) == (
        "epsilon",
        "scaled_linear",
        1000,
    )
    assert pipeline.tokenizer.tokenize("a green square") == ["a</w>", "green</w>", "square</w>"]

    images = pipeline("a red circle", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)
    model = load_model(folder)
    assert model.family == "sd15"
    latents = model.encode_images(torch.zeros(2, 3, 16, 16))
    assert latents.shape == (2, 4, 16, 16)


def test_toy_sd15_pooled_text_adds_the_prompt_to_the_time_embedding(tmp_path):
    folder = build_toy_sd15(str(tmp_path / "toy"), vocabulary=["a", "red", "square"], resolution=16, pooled_text=True)
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert pipeline.unet.config.addition_embed_type == "text"
    assert _n_params(pipeline.unet) <= 1_000_000
    assert pipeline("a red square", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)

def test_toy_sd15_full_resolution_attention_adds_cross_attention_at_16x16(tmp_path):
    folder = build_toy_sd15(str(tmp_path / "toy"), vocabulary=["a", "red", "square"], resolution=16,
                            full_resolution_attention=True)
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert pipeline.unet.config.down_block_types == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert pipeline.unet.config.up_block_types == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert pipeline("a red square", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("downsample", [2, 4])
def test_toy_sd15_latent_downsample_shrinks_the_latents_not_the_images(tmp_path, downsample):
    folder = build_toy_sd15(str(tmp_path / "toy"), vocabulary=["a", "red", "square"], resolution=16,
                            latent_downsample=downsample)
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert pipeline.vae_scale_factor == downsample
    assert pipeline.unet.config.sample_size == 16 // downsample
    assert pipeline("a red square", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)
    model = load_model(folder)
    assert model.default_resolution == 16
    assert model.encode_images(torch.zeros(2, 3, 16, 16)).shape == (2, 4, 16 // downsample, 16 // downsample)


def test_toy_sd15_latent_downsample_that_does_not_fit_the_resolution_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="latent_downsample 4 .* resolution 8"):
        build_toy_sd15(str(tmp_path / "toy"), vocabulary=["a"], resolution=8, latent_downsample=4)
    with pytest.raises(ValueError, match="latent_downsample 3"):
        build_toy_sd15(str(tmp_path / "toy"), vocabulary=["a"], resolution=16, latent_downsample=3)


def test_cli_tiny_writes_a_loadable_sd3_pipeline(tmp_path, capsys):
    out = tmp_path / "cli-sd3"
    assert main(["tiny", "--family", "sd3", "--out", str(out), "--seed", "2", "--resolution", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert detect_family(str(out)) == "sd3"
    model = load_model(str(out))
    assert model.default_resolution == 16


def test_cli_tiny_rejects_a_bad_resolution(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", "--family", "sd15", "--out", str(tmp_path / "x"), "--resolution", "30"])
    assert exit_info.value.code == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
