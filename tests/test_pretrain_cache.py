"""The toy base is cached by what the data holds, not where it lies."""

from sdpo.data.pickapic import ingest
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.train.pretrain import data_content_digest


def test_toy_base_cache_key_ignores_where_the_data_was_made(tmp_path):
    table = make_pairs(6, 0)
    for name in ("run-a", "run-b"):
        parquet = write_parquet(table, tmp_path / name / "train.parquet")
        ingest(str(parquet), tmp_path / name / "shards")
    assert data_content_digest(tmp_path / "run-a" / "shards") == data_content_digest(tmp_path / "run-b" / "shards")
    other = write_parquet(make_pairs(6, 1), tmp_path / "run-c" / "train.parquet")
    ingest(str(other), tmp_path / "run-c" / "shards")
    assert data_content_digest(tmp_path / "run-c" / "shards") != data_content_digest(tmp_path / "run-a" / "shards")


def test_pyramid_and_offset_noise_keep_unit_scale_and_add_coarse_structure():
    import torch

    from sdpo.config import ToyBaseConfig
    from sdpo.train.pretrain import _training_noise

    base = torch.randn((256, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    plain = _training_noise(base.clone(), ToyBaseConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(plain, base)  # the default recipe draws nothing more
    pyramid = _training_noise(base.clone(), ToyBaseConfig(multires_noise=0.8), torch.Generator().manual_seed(1))
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(256), atol=1e-4)  # renormalised per sample
    # coarse scales make the per-sample mean (what a 1x1 view of x_T shows) vary far more than white noise's 1/32
    assert pyramid.mean(dim=(2, 3)).std() > 3 * base.mean(dim=(2, 3)).std()
    offset = _training_noise(base.clone(), ToyBaseConfig(noise_offset=0.5), torch.Generator().manual_seed(1))
    shift = offset - base
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # one constant per sample and channel
    assert 0.3 < float(shift[:, :, 0, 0].std()) < 0.7



def _tensors(folder, component: str) -> dict:
    from safetensors.torch import load_file

    (weights,) = (folder / component).glob("*.safetensors")
    return load_file(weights)


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_vae_hands_the_unet_stage_exactly_what_training_it_would(tmp_path):
    """Same VAE weights and scaling, same latents, same generator state: the UNet stage then runs the same steps.

    (Two UNet trainings are not compared bit for bit: CPU kernels round differently with the memory layout, and
    AdamW's first steps turn those last-bit differences into lr-sized ones, with or without a cache.)
    """
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from sdpo.config import ToyBaseConfig
    from sdpo.data import synthetic
    from sdpo.models.tiny import build_toy_sd15
    from sdpo.train.pretrain import VAE_MARKER, _cached_vae, _to_pixels

    build_toy_sd15(str(tmp_path / "init"), vocabulary=list(synthetic.VOCABULARY), resolution=16)
    pixels = _to_pixels(np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    toy = ToyBaseConfig(vae_steps=3, batch_size=4)
    logs: list[str] = []
    results = []
    for _ in range(2):  # trained and stored, then reused
        vae = StableDiffusionPipeline.from_pretrained(str(tmp_path / "init")).vae
        gen = torch.Generator().manual_seed(toy.seed)
        latents = _cached_vae(vae, pixels, toy, gen, tmp_path / "vae", logs.append)
        results.append((latents, gen.get_state(), vae.state_dict(), vae.config.scaling_factor))
    assert (tmp_path / "vae" / VAE_MARKER).is_file()
    assert sum("reused" in line for line in logs) == 1, logs
    (latents_a, state_a, weights_a, scale_a), (latents_b, state_b, weights_b, scale_b) = results
    assert torch.equal(latents_a, latents_b) and torch.equal(state_a, state_b) and scale_a == scale_b
    assert _same(weights_a, weights_b)
    assert not torch.equal(state_a, torch.Generator().manual_seed(toy.seed).get_state())  # training drew from it


def test_recipes_that_differ_in_the_unet_only_share_one_vae(tmp_path):
    from pathlib import Path

    from pipeline_fixtures import make_shards

    from sdpo.config import load_config
    from sdpo.train.pretrain import VAE_MARKER, ensure_toy_base

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    shards = make_shards(tmp_path, pairs=16, seed=0, split="train", resolution=16)
    tiny = ["model.toy.vae_steps=3", "model.toy.unet_steps=2", "model.toy.batch_size=4"]
    logs: list[str] = []

    def build(name: str, *extra: str) -> Path:
        return ensure_toy_base(load_config(params, [*tiny, *extra]), shards, cache_dir=tmp_path / name,
                               vae_cache_dir=tmp_path / "vae", log=logs.append)

    default = build("default")
    assert not any("reused" in line for line in logs), logs  # nothing cached yet: the VAE was trained
    pooled = build("pooled", "model.toy.pooled_text=true")
    assert any("vae: trained one reused" in line for line in logs), logs
    assert _same(_tensors(default, "vae"), _tensors(pooled, "vae"))
    assert not _same(_tensors(default, "unet"), _tensors(pooled, "unet"))
    build("longer-vae", "model.toy.vae_steps=4")  # a VAE setting is part of the key: another VAE is trained
    assert len(list((tmp_path / "vae").glob(f"*/{VAE_MARKER}"))) == 2
