"""The toy base model of the embedded default: an ordinary SD1.5-family pipeline trained here, on a CPU, in minutes.

It is pretrained (SFT) on every image of the synthetic train shards: the good renders and the bad ones, half and
half, so its renders are sometimes clean and centred, sometimes offset and rough: "imperfect", which is what
preference tuning needs to have something to improve. With the default recipe it does NOT follow its prompts (at
16 px the noise schedule leaves colour and layout readable in x_T, so the base reads them from the noise); the
opt-in ``model.toy`` settings (experiments/colour-following.yaml: a trained text encoder, the pooled prompt, prompt
dropout, high-noise weighting and pyramid noise) make the colour follow at the same cost, not yet the shape
(docs/results.md). The result is cached under a hash of everything that determines it, and the trained VAE
under a hash of its own settings, so recipes that change only the UNet's (every conditioning option) train it once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sdpo.config import Config, ToyBaseConfig

RECIPE_VERSION = "toy-sd15-v2"  # bump when the recipe below changes, so stale caches are not reused
# The settings the VAE stage reads: recipes that differ only in the UNet's (every conditioning option) share one VAE.
VAE_SETTINGS = ("vae_steps", "batch_size", "lr", "seed", "latent_downsample")
VAE_MARKER = "generator_state.npy"  # written last: the VAE folder is complete


def _cache_key(payload: dict) -> str:
    blob = json.dumps({"recipe": RECIPE_VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def toy_base_key(toy: ToyBaseConfig, resolution: int, data_digest: str) -> str:
    """Cache key: the recipe version, the toy settings, the resolution and the training data digest."""
    settings = toy.model_dump(mode="json", exclude={"cache_dir"})
    return _cache_key({"toy": settings, "resolution": resolution, "data": data_digest})


def toy_vae_key(toy: ToyBaseConfig, resolution: int, data_digest: str) -> str:
    """Cache key of the trained toy VAE: what :data:`VAE_SETTINGS` name, the resolution and the training data."""
    settings = {name: getattr(toy, name) for name in VAE_SETTINGS}
    return _cache_key({"vae": settings, "resolution": resolution, "data": data_digest})


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _train_vae(vae, pixels: torch.Tensor, toy: ToyBaseConfig, gen: torch.Generator, log: Callable[[str], None]):
    """Reconstruction + a small KL term; then set ``scaling_factor`` so latents have unit variance, as SD does."""
    opt = torch.optim.AdamW(vae.parameters(), lr=toy.lr)
    vae.train()
    for step in range(1, toy.vae_steps + 1):
        idx = torch.randint(0, pixels.shape[0], (toy.batch_size,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)).sample
        rec = torch.nn.functional.mse_loss(recon, x)
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == toy.vae_steps:
            log(f"  vae step {step}/{toy.vae_steps}: recon mse {rec.item():.4f}")
    vae.eval().requires_grad_(False)
    latents = _latent_means(vae, pixels)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return latents * scaling


def _latent_means(vae, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])


def _cached_vae(vae, pixels: torch.Tensor, toy: ToyBaseConfig, gen: torch.Generator, cache: Path | None,
                log: Callable[[str], None]) -> torch.Tensor:
    """:func:`_train_vae`, or its result from ``cache``: the weights and the generator state it left.

    The UNet stage continues the same random stream, so a base built on a cached VAE is the base built without it.
    A file lock lets recipes built side by side (tests, sweeps) train one VAE and share it.
    """
    if cache is None:
        return _train_vae(vae, pixels, toy, gen, log)
    from diffusers import AutoencoderKL
    from filelock import FileLock

    from sdpo.models._atomic import atomic_directory

    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache}.lock"):
        if not (cache / VAE_MARKER).exists():
            latents = _train_vae(vae, pixels, toy, gen, log)
            with atomic_directory(cache) as tmp:
                vae.save_pretrained(str(tmp / "vae"))
                np.save(tmp / VAE_MARKER, gen.get_state().numpy())
            return latents
    trained = AutoencoderKL.from_pretrained(str(cache / "vae"))
    vae.load_state_dict(trained.state_dict())
    vae.register_to_config(scaling_factor=trained.config.scaling_factor)
    vae.eval().requires_grad_(False)
    gen.set_state(torch.from_numpy(np.load(cache / VAE_MARKER)))
    log(f"  vae: trained one reused from {cache}")
    return _latent_means(vae, pixels) * trained.config.scaling_factor


def _prompt_table(pipe, captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions plus the empty prompt (last), and their token ids."""
    unique = [*sorted(set(captions) - {""}), ""]
    ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return unique, ids


def _noise_weight(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample loss weight ``clamp(1 / SNR, 1, cap)``: epsilon MSE at low noise, x0 MSE at high noise.

    Plain epsilon MSE weights an x0 error by the SNR, ~0.005 at t = 999: the prompt (colour and shape are decided at
    high noise) then barely moves the loss and the model learns to ignore it. ``cap <= 1`` is plain epsilon MSE.
    """
    inverse_snr = (1 - alphas_cumprod) / alphas_cumprod
    return inverse_snr.clamp(min=1.0, max=max(cap, 1.0)).float()


def _training_noise(noise: torch.Tensor, toy: ToyBaseConfig, gen: torch.Generator) -> torch.Tensor:
    """Offset and pyramid (multi-resolution) noise on top of ``noise``; drawn only when used."""
    if toy.multires_noise > 0:
        side = noise.shape[-1]
        scale = 1.0
        while side > 1:
            side //= 2
            scale *= toy.multires_noise
            coarse = torch.randn((*noise.shape[:2], side, side), generator=gen)
            noise = noise + scale * torch.nn.functional.interpolate(coarse, size=noise.shape[-2:], mode="bilinear")
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True)
    if toy.noise_offset > 0:
        noise = noise + toy.noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=gen)
    return noise


def _train_unet(pipe, scheduler, latents: torch.Tensor, captions: list[str], toy: ToyBaseConfig,
                gen: torch.Generator, log: Callable[[str], None]) -> None:
    """Epsilon-prediction training of the UNet and (``toy.train_text_encoder``) the text encoder with it.

    A ``toy.prompt_dropout`` share of each batch gets the empty prompt, as in classifier-free guidance training, so
    the base also has an unconditional model.
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unique, ids = _prompt_table(pipe, captions)
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = len(unique) - 1
    unet.train().requires_grad_(True)
    params = list(unet.parameters())
    if toy.train_text_encoder:
        text_encoder.train().requires_grad_(True)
        params += list(text_encoder.parameters())
    else:
        text_encoder.eval().requires_grad_(False)
        with torch.no_grad():
            frozen = text_encoder(ids)[0]
    opt = torch.optim.AdamW(params, lr=toy.lr)
    n_train = scheduler.config.num_train_timesteps
    for step in range(1, toy.unet_steps + 1):
        idx = torch.randint(0, latents.shape[0], (toy.batch_size,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (toy.batch_size,), generator=gen)
        noise = _training_noise(noise, toy, gen)
        prompt_idx = caption_ids[idx]
        if toy.prompt_dropout > 0:  # drawn only when used: the default recipe keeps its random stream
            drop = torch.rand(toy.batch_size, generator=gen) < toy.prompt_dropout
            prompt_idx = torch.where(drop, empty, prompt_idx)
        table = text_encoder(ids)[0] if toy.train_text_encoder else frozen
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=table[prompt_idx]).sample
        if toy.high_noise_weight > 1:
            per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            weight = _noise_weight(scheduler.alphas_cumprod[t], toy.high_noise_weight)
            loss = (weight * per_sample).sum() / weight.sum()
        else:
            loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == toy.unet_steps:
            log(f"  unet step {step}/{toy.unet_steps}: eps mse {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def pretrain_toy_base(images: np.ndarray, captions: list[str], out_dir: str | Path, *, toy: ToyBaseConfig,
                      resolution: int, vocabulary: list[str], log: Callable[[str], None] = print,
                      vae_cache: str | Path | None = None) -> Path:
    """Build the toy pipeline (``sdpo.models.tiny.build_toy_sd15``) and train its VAE, then its UNet (and text encoder).

    ``images`` are uint8 ``[N, R, R, 3]`` with one caption each. Writes a diffusers folder to ``out_dir``. With
    ``vae_cache`` (a folder for this VAE's :func:`toy_vae_key`) the trained VAE is reused from there, or stored there.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from sdpo.models._atomic import atomic_directory
    from sdpo.models.tiny import build_toy_sd15

    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(toy.seed)
    with atomic_directory(out_dir) as tmp:
        build_toy_sd15(str(tmp / "init"), vocabulary=vocabulary, resolution=resolution, seed=toy.seed,
                       pooled_text=toy.pooled_text, full_resolution_attention=toy.full_resolution_attention,
                       latent_downsample=toy.latent_downsample)
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp / "init"))
        shutil.rmtree(tmp / "init")
        pixels = _to_pixels(images)
        tic = time.perf_counter()
        latents = _cached_vae(pipe.vae, pixels, toy, gen, Path(vae_cache) if vae_cache else None, log)
        log(f"  vae trained in {time.perf_counter() - tic:.0f}s (scaling_factor {pipe.vae.config.scaling_factor:.3f})")
        tic = time.perf_counter()
        _train_unet(pipe, DDPMScheduler.from_config(pipe.scheduler.config), latents, captions, toy, gen, log)
        log(f"  unet trained in {time.perf_counter() - tic:.0f}s")
        pipe.save_pretrained(str(tmp))
    return out_dir


def data_content_digest(shards_dir: str | Path) -> str:
    """Digest of what the shards hold, independent of where they were made.

    The manifest and the shards name their source files (paths differ from run to run), so the key uses the input
    files' sha256, the ingestion settings and the pair count instead.
    """
    from sdpo.data.shards import read_manifest

    manifest = read_manifest(shards_dir)
    blob = json.dumps({"inputs": sorted(i["sha256"] for i in manifest["inputs"]), "config": manifest["config"],
                       "pairs": manifest["pairs_written"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def ensure_toy_base(cfg: Config, shards_dir: str | Path, *, cache_dir: str | Path | None = None,
                    vae_cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The toy base for the train shards in ``shards_dir``: reused from the cache when its key matches.

    Trained VAEs are kept under ``vae_cache_dir`` (default ``CACHE/vae``), so recipes that change only the UNet's
    settings train the VAE once.
    """
    from sdpo.data import synthetic
    from sdpo.data.loader import load_pairs_arrays
    toy = cfg.model.toy
    digest = data_content_digest(shards_dir)
    cache = Path(cache_dir or toy.cache_dir)
    target = cache / toy_base_key(toy, cfg.data.resolution, digest)
    if (target / "model_index.json").exists():
        log(f"toy base: cached at {target}")
        return target
    log(f"toy base: training into {target} (cached afterwards)")
    pairs = load_pairs_arrays(shards_dir)
    images = np.concatenate([pairs["win"], pairs["lose"]])
    captions = list(pairs["caption"]) * 2
    vae_cache = Path(vae_cache_dir or cache / "vae") / toy_vae_key(toy, cfg.data.resolution, digest)
    return pretrain_toy_base(images, captions, target, toy=toy, resolution=cfg.data.resolution,
                             vocabulary=list(synthetic.VOCABULARY), log=log, vae_cache=vae_cache)
