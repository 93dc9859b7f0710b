"""What the step benchmarks run on: a model folder, preference shards and a Trainer set up on them.

Models are built from configs with random weights (nothing is downloaded): the embedded toy base architecture, the
tiny test families, or an SD1.5-shaped UNet (the real block layout and widths) in a pipeline whose VAE and text
encoder are either SD1.5-shaped too (``full_encoders``, for the GPU) or tiny (CPU; only the UNet is timed there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SD15_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}
# SD1.5's UNet cut to its first level (SD1.5's width 320, one resnet per block, no attention, no mid block): the
# stack that fits a CPU step at 64x64 latents, with the real first convolution widths
SD15_UNET_TRUNCATED: dict[str, Any] = {
    **SD15_UNET,
    "block_out_channels": (320,),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",),
    "mid_block_type": None,
}
CLIP_VOCAB_SIZE = 49408  # CLIP's real vocabulary (the embedding table's size; the test tokenizer uses a few ids)
# SDXL base 1.0: UNet, VAE (SD's layout, scaling 0.13025), CLIP ViT-L and OpenCLIP ViT-bigG text encoders
SDXL_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "scaling_factor": 0.13025}
CLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class Workspace:
    """A model folder and train shards for it (images at ``resolution`` px)."""

    root: Path
    model_dir: Path
    shards_dir: Path
    resolution: int
    family: str = "sd15"
    label: str = ""


def make_shards(out: Path, *, pairs: int, resolution: int, seed: int = 0) -> Path:
    """Synthetic pairs ingested into WebDataset shards at ``resolution`` px (JPEG shards from 256 px up).

    From 256 px the images are photo-like 512 px JPEGs (bench_ingest's generator), so decoding costs what real
    Pick-a-Pic data costs; below, the synthetic world's own renders as PNG.
    """
    from sdpo.data.pickapic import ingest
    from sdpo.data.synthetic import make_pairs, write_parquet

    out.mkdir(parents=True, exist_ok=True)
    parquet = out / "pairs.parquet"
    if resolution >= 256:
        from bench.bench_ingest import make_jpeg_parquet

        make_jpeg_parquet(parquet, pairs, seed=seed)
        image_format = "jpg"
    else:
        write_parquet(make_pairs(pairs, seed, resolution=resolution), parquet)
        image_format = "png"
    shards = out / "shards"
    ingest(str(parquet), shards, resolution=resolution, image_format=image_format)
    return shards


def toy_workspace(root: Path, *, pairs: int) -> Workspace:
    """The embedded default: the toy SD1.5-family architecture (random weights) on 16 px synthetic shards."""
    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny import build_toy_sd15

    resolution = 16
    model_dir = Path(build_toy_sd15(str(root / "model"), vocabulary=list(VOCABULARY), resolution=resolution))
    shards = make_shards(root / "data", pairs=pairs, resolution=resolution)
    return Workspace(root, model_dir, shards, resolution, "sd15", "toy (default params, 16 px, 4x16x16 latents)")


def tiny_family_workspace(root: Path, family: str, *, pairs: int, resolution: int = 32) -> Workspace:
    """One of the tiny test pipelines (sd15, sd2, sdxl, sd3) on synthetic shards."""
    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny import build_tiny_pipeline

    model_dir = Path(build_tiny_pipeline(family, str(root / f"model-{family}"), resolution=resolution,
                                         vocabulary=list(VOCABULARY)))
    shards = root / f"data-{resolution}" / "shards"
    if not (shards / "manifest.json").exists():
        shards = make_shards(root / f"data-{resolution}", pairs=pairs, resolution=resolution)
    return Workspace(root, model_dir, shards, resolution, family, f"tiny {family} ({resolution} px)")


def sd15_shaped_pipeline(latent_size: int, *, full_encoders: bool, seed: int = 0):
    """A StableDiffusionPipeline whose UNet has SD1.5's layout and widths (~860M parameters), random weights.

    ``full_encoders``: SD1.5-shaped VAE (8x) and a CLIP ViT-L-shaped text encoder; otherwise a tiny 2x VAE and a
    one-layer 768-wide text encoder (enough to feed the UNet; for timing the UNet alone).
    Returns ``(pipeline, image_resolution)``.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny_text import CLIP_MAX_LENGTH, build_clip_text_encoder, build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(VOCABULARY)
        if full_encoders:
            vae = AutoencoderKL(**SD15_VAE, sample_size=latent_size * 8)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **CLIP_L_TEXT))
        else:
            vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                sample_size=latent_size * 2)
            text_encoder = build_clip_text_encoder(tokenizer, hidden_size=768, num_layers=1)
        unet = UNet2DConditionModel(**SD15_UNET, sample_size=latent_size)
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return pipeline, latent_size * (8 if full_encoders else 2)


def sd15_shaped_workspace(root: Path, *, latent_size: int, full_encoders: bool, pairs: int) -> Workspace:
    """Save :func:`sd15_shaped_pipeline` as a diffusers folder (safetensors) beside shards of its image size."""
    pipeline, resolution = sd15_shaped_pipeline(latent_size, full_encoders=full_encoders)
    model_dir = root / "model-sd15-shaped"
    pipeline.save_pretrained(model_dir)
    del pipeline
    shards = make_shards(root / f"data-{resolution}", pairs=pairs, resolution=resolution)
    encoders = "SD1.5-shaped VAE and CLIP-L text encoder" if full_encoders else "tiny VAE and text encoder"
    label = f"SD1.5-shaped UNet, {latent_size}x{latent_size} latents ({resolution} px), {encoders}"
    return Workspace(root, model_dir, shards, resolution, "sd15", label)


def bench_config(ws: Workspace, *, pairs: int, lora: bool = False, optimizer: str = "adamw",
                 mixed_precision: str = "no", dataloader_workers: int = 0, safeguard: str = "pair"):
    """The default params with this workspace's model and data, and the benchmark's batch and precision."""
    from sdpo.config import validate_config

    raw = {
        "data": {"resolution": ws.resolution},
        "model": {"family": ws.family, "base": str(ws.model_dir), "lora": {"enabled": lora}},
        "train": {
            "method": "dpo",
            "safeguard": safeguard,
            "batch_size": pairs,
            "optimizer": optimizer,
            "mixed_precision": mixed_precision,
            "dataloader_workers": dataloader_workers,
            "heldout_every": 0,
        },
    }
    return validate_config(raw, "bench settings")


def set_up_trainer(ws: Workspace, out_dir: Path, **config: Any):
    """A :class:`sdpo.train.trainer.Trainer` on ``ws`` with its model, reference, optimizer and loader set up."""
    from sdpo.train.trainer import Trainer

    trainer = Trainer(bench_config(ws, **config), shards_dir=ws.shards_dir, base_model=str(ws.model_dir),
                      output_dir=out_dir, show_progress=False)
    trainer._setup()
    return trainer


def release(trainer) -> None:
    """Drop a trainer's models and optimizer state (before setting up the next one on the same device)."""
    import gc

    import torch

    trainer.accelerator.free_memory()
    for name in ("model", "reference", "denoiser", "optimizer", "scheduler", "loader", "state", "probe"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _clip_text_config(tokenizer, **config: Any):
    from transformers import CLIPTextConfig

    from sdpo.models.tiny_text import CLIP_MAX_LENGTH

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **config)


def sd15_encoders_workspace(root: Path, *, pairs: int, unet: str = "truncated", seed: int = 0) -> Workspace:
    """SD1.5's real VAE and CLIP ViT-L text encoder configurations at 512 px (random weights) with its full UNet
    (``unet="full"``, ~860M parameters) or :data:`SD15_UNET_TRUNCATED` (``"truncated"``, what fits a CPU)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny_text import build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(VOCABULARY)
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE, sample_size=512),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer, **CLIP_L_TEXT)).eval(),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**(SD15_UNET if unet == "full" else SD15_UNET_TRUNCATED), sample_size=64),
            scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    model_dir = root / f"model-sd15-512-{unet}"
    pipeline.save_pretrained(model_dir)
    del pipeline
    shards = make_shards(root / "data-512", pairs=pairs, resolution=512)
    what = "full SD1.5 UNet" if unet == "full" else "SD1.5 UNet truncated to its first level (320 wide, no attention)"
    return Workspace(root, model_dir, shards, 512, "sd15",
                     f"SD1.5 VAE + CLIP ViT-L configurations at 512 px (64x64 latents), {what}, random weights")


def sdxl_workspace(root: Path, *, pairs: int, seed: int = 0) -> Workspace:
    """SDXL base 1.0's configurations (UNet ~2.6B parameters, VAE, CLIP ViT-L + OpenCLIP bigG) at 1024 px."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny_text import build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(VOCABULARY)
        tokenizer_2 = build_clip_tokenizer(VOCABULARY, pad_token="!")
        pipeline = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE, sample_size=1024),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer, **CLIP_L_TEXT)).eval(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, **CLIP_BIGG_TEXT)).eval(),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=UNet2DConditionModel(**SDXL_UNET, sample_size=128),
            scheduler=EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    model_dir = root / "model-sdxl-1024"
    pipeline.save_pretrained(model_dir)
    del pipeline
    shards = make_shards(root / "data-1024", pairs=pairs, resolution=1024)
    return Workspace(root, model_dir, shards, 1024, "sdxl",
                     "SDXL base configurations (UNet, VAE, CLIP ViT-L + OpenCLIP bigG) at 1024 px (128x128 latents), "
                     "random weights")
