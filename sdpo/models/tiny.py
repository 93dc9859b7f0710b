"""Tiny diffusers pipelines with random weights, built offline from configs.

Every builder writes a complete diffusers folder (``model_index.json`` plus one folder per component) that plain
``DiffusionPipeline.from_pretrained(dir)`` loads and samples from on a CPU. They stand in for SD1.5, SD2, SDXL and SD3
in tests, and :func:`build_toy_sd15` is the architecture of the embedded toy base model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from sdpo.config import toy_resolution_multiple
from sdpo.models._atomic import atomic_directory
from sdpo.models.tiny_text import (
    DEFAULT_VOCABULARY,
    build_clip_text_encoder,
    build_clip_text_encoder_with_projection,
    build_clip_tokenizer,
    build_t5_encoder,
    build_t5_tokenizer,
)

TINY_FAMILIES = ("sd15", "sd2", "sdxl", "sd3")

# The scheduler configs of the real models (only the sizes of the networks are tiny).
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_SD_DDIM = {**_SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
_TEXT_HIDDEN = 32
_VAE_CHANNELS = (16, 32)  # two blocks: one 2x downsampling, as a real VAE (8x) only less


def _tiny_vae(resolution: int, *, latent_channels: int = 4, **config: object) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=_VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=resolution,
        **config,
    )


def _latent_size(resolution: int) -> int:
    factor = 2 ** (len(_VAE_CHANNELS) - 1)
    if resolution % (2 * factor):
        raise ValueError(f"resolution {resolution} must be a multiple of {2 * factor}")
    return resolution // factor


def _tiny_unet(resolution: int, **config: object) -> UNet2DConditionModel:
    base: dict[str, object] = {
        "sample_size": _latent_size(resolution),
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": _TEXT_HIDDEN,
        "attention_head_dim": 8,
    }
    return UNet2DConditionModel(**{**base, **config})


def _sd15(resolution: int, vocabulary: Sequence[str]) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(vocabulary)
    return StableDiffusionPipeline(
        vae=_tiny_vae(resolution),
        text_encoder=build_clip_text_encoder(tokenizer, hidden_size=_TEXT_HIDDEN),
        tokenizer=tokenizer,
        unet=_tiny_unet(resolution),
        scheduler=PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd2(resolution: int, vocabulary: Sequence[str]) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(vocabulary, pad_token="!")  # OpenCLIP pads with "!"
    return StableDiffusionPipeline(
        vae=_tiny_vae(resolution),
        text_encoder=build_clip_text_encoder(tokenizer, hidden_size=_TEXT_HIDDEN, hidden_act="gelu"),
        tokenizer=tokenizer,
        unet=_tiny_unet(resolution, use_linear_projection=True, attention_head_dim=(4, 8)),
        scheduler=DDIMScheduler(**_SD_DDIM, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(resolution: int, vocabulary: Sequence[str]) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(vocabulary)
    tokenizer_2 = build_clip_tokenizer(vocabulary, pad_token="!")
    text_encoder_2 = build_clip_text_encoder_with_projection(tokenizer_2, hidden_size=_TEXT_HIDDEN, projection_dim=32)
    time_embed_dim = 8
    unet = _tiny_unet(
        resolution,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _TEXT_HIDDEN,  # both encoders' hidden states, concatenated
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + 6 size/crop numbers, each embedded with addition_time_embed_dim
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * time_embed_dim,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(resolution, scaling_factor=0.13025),
        text_encoder=build_clip_text_encoder(tokenizer, hidden_size=_TEXT_HIDDEN),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sd3(resolution: int, vocabulary: Sequence[str]) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(vocabulary)
    tokenizer_2 = build_clip_tokenizer(vocabulary, pad_token="!")
    tokenizer_3 = build_t5_tokenizer(vocabulary)
    text_encoder = build_clip_text_encoder_with_projection(tokenizer, hidden_size=_TEXT_HIDDEN, projection_dim=32)
    text_encoder_2 = build_clip_text_encoder_with_projection(tokenizer_2, hidden_size=_TEXT_HIDDEN, projection_dim=32)
    # the pipeline concatenates both CLIP hidden states and pads them to the T5 width: make them equal
    text_encoder_3 = build_t5_encoder(tokenizer_3, d_model=2 * _TEXT_HIDDEN)
    latent_channels = 16
    transformer = SD3Transformer2DModel(
        sample_size=_latent_size(resolution),
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=32,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=max(16, _latent_size(resolution) // 2),
    )
    vae = _tiny_vae(
        resolution,
        latent_channels=latent_channels,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


_BUILDERS: dict[str, Callable[[int, Sequence[str]], DiffusionPipeline]] = {
    "sd15": _sd15,
    "sd2": _sd2,
    "sdxl": _sdxl,
    "sd3": _sd3,
}


def _save(pipeline: DiffusionPipeline, out_dir: str | Path) -> str:
    with atomic_directory(out_dir) as tmp:
        pipeline.save_pretrained(tmp)
    return str(Path(out_dir))


def build_tiny_pipeline(
    family: str, out_dir: str, *, seed: int = 0, resolution: int = 32, vocabulary: list[str] | None = None
) -> str:
    """Write a complete tiny diffusers pipeline of ``family`` (sd15, sd2, sdxl, sd3) with random weights to ``out_dir``.

    ``resolution`` is the default image size (a multiple of 4); ``vocabulary`` the words the tokenizers know as whole
    tokens (any other text still tokenizes). Returns ``out_dir``.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; tiny pipelines exist for {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[family](resolution, list(vocabulary or DEFAULT_VOCABULARY))
    return _save(pipeline, out_dir)


def build_toy_sd15(out_dir: str, *, vocabulary: list[str], resolution: int = 16, seed: int = 0,
                   pooled_text: bool = False, full_resolution_attention: bool = False,
                   latent_downsample: int = 1) -> str:
    """Write the untrained toy base: an SD1.5-family pipeline whose VAE downsamples by ``latent_downsample``
    (1, 2 or 4; latents 4 x R/d x R/d; 1 = the base the results in docs/results.md were measured on).

    Parts: AutoencoderKL with one block per halving plus one (~150k parameters with one), a 2-layer CLIP text
    encoder (hidden 32) with a word-level
    tokenizer over ``vocabulary``, a ~0.99M-parameter UNet2DConditionModel (cross-attention at 8x8; with
    ``pooled_text`` also the prompt's attention-pooled embedding added to the time embedding), and a DDIM scheduler
    with SD1.5's exact noise schedule (epsilon, 1000 steps, scaled_linear betas 0.00085..0.012), so that training with
    ``DDPMScheduler.from_config`` and DDIM sampling share one schedule and the loss scale matches SD1.5 recipes.
    """
    if latent_downsample not in (1, 2, 4) or resolution % toy_resolution_multiple(latent_downsample):
        raise ValueError(f"latent_downsample {latent_downsample} needs to be 1, 2 or 4, and the resolution "
                         f"{resolution} a multiple of {toy_resolution_multiple(latent_downsample)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(vocabulary)
        text_encoder = build_clip_text_encoder(tokenizer, hidden_size=32, num_layers=2)
        vae_blocks = latent_downsample.bit_length()  # diffusers' VAE halves the size once between two blocks
        vae = AutoencoderKL(
            block_out_channels=(32,) * vae_blocks,
            down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=resolution,
            scaling_factor=1.0,
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // latent_downsample,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            # text enters at 8x8 (and the mid block): half the cost of cross-attention at 16x16 too, unless
            # full_resolution_attention
            down_block_types=("CrossAttnDownBlock2D" if full_resolution_attention else "DownBlock2D",
                              "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D",
                            "CrossAttnUpBlock2D" if full_resolution_attention else "UpBlock2D"),
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=8,
            # pooled_text: the prompt also enters globally, attention-pooled and added to the time embedding
            # (diffusers' "text" addition embedding), so it reaches every resolution of the UNet
            **({"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if pooled_text else {}),
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**_SD_DDIM, prediction_type="epsilon"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _save(pipeline, out_dir)
