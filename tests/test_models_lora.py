"""LoRA through peft: the reference is the same network with adapters off; saved weights load with diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from sdpo.errors import ModelError
from sdpo.models import (
    adapters_disabled,
    add_lora,
    build_tiny_pipeline,
    has_lora,
    load_model,
    lora_state_dict,
    merge_lora,
    save_lora,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RESOLUTION = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_pipeline(f, str(root / f), resolution=RESOLUTION) for f in ("sd15", "sdxl", "sd3")}


def _batch(model):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    latents = model.encode_images(pixels, generator=generator)
    cond = model.encode_prompts(["a red circle", ""])
    timesteps = model.sample_timesteps(2, generator)
    noisy, target = model.noisy_input_and_target(latents, torch.randn(latents.shape, generator=generator), timesteps)
    return noisy, target, timesteps, cond


def _train_steps(model, batch, steps: int = 2) -> None:
    noisy, target, timesteps, cond = batch
    optimizer = torch.optim.SGD([p for p in model.denoiser.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = (model.predict(model.denoiser, noisy, timesteps, cond) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_lora_reference_training_saving_and_merging(tmp_path, folders, family):
    model = load_model(folders[family])
    model.freeze_all_but_denoiser()
    batch = _batch(model)
    noisy, _, timesteps, cond = batch
    with torch.no_grad():
        base = model.predict(model.denoiser, noisy, timesteps, cond)

    add_lora(model.denoiser, rank=4, alpha=8.0, target_modules=TARGETS)
    trainable = {n for n, p in model.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(lora_state_dict(model.denoiser)) and all("lora" in k for k in lora_state_dict(model.denoiser))
    with torch.no_grad():
        assert torch.equal(model.predict(model.denoiser, noisy, timesteps, cond), base)  # lora_B starts at zero

    _train_steps(model, batch)
    with torch.no_grad():
        with adapters_disabled(model.denoiser):
            reference = model.predict(model.denoiser, noisy, timesteps, cond)
        adapted = model.predict(model.denoiser, noisy, timesteps, cond)
    assert torch.equal(reference, base)
    assert (adapted - base).abs().max() > 1e-4
    assert {n for n, p in model.denoiser.named_parameters() if p.requires_grad} == trainable

    save_lora(model.denoiser, str(tmp_path / "lora"))
    pipeline = DiffusionPipeline.from_pretrained(folders[family])
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    loaded_denoiser = pipeline.transformer if family == "sd3" else pipeline.unet
    with torch.no_grad():
        loaded = model.predict(loaded_denoiser, noisy, timesteps, cond)
    torch.testing.assert_close(loaded, adapted)  # alpha/rank scaling restored from the saved metadata

    model.save_pipeline(str(tmp_path / "merged"))  # fuses into a copy
    assert has_lora(model.denoiser)
    merged_model = load_model(str(tmp_path / "merged"))
    assert not has_lora(merged_model.denoiser)
    with torch.no_grad():
        merged = merged_model.predict(merged_model.denoiser, noisy, timesteps, cond)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)

    fused = merge_lora(model.denoiser)
    assert fused is model.denoiser and not has_lora(fused)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(fused, noisy, timesteps, cond), adapted, rtol=1e-4, atol=1e-5)


def test_lora_errors(folders):
    model = load_model(folders["sd15"])
    with pytest.raises(ModelError, match="has no LoRA adapter"), adapters_disabled(model.denoiser):
        pass
    with pytest.raises(ModelError, match=r"model.lora.target_modules \['no_such_layer'\]"):
        add_lora(model.denoiser, rank=2, alpha=2.0, target_modules=["no_such_layer"])
