"""One adapter over the model families: what differs between SD1.x/SD2, SDXL and SD3 lives in one class each.

The trainer sees :class:`DiffusionModel` only: encode images and prompts, draw timesteps, build the noised input and
the regression target for the family's prediction type, run the denoiser, save a complete pipeline folder.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor, nn

from sdpo.errors import ModelError
from sdpo.models._atomic import atomic_directory
from sdpo.models.components import ENCODER_COMPONENTS
from sdpo.models.lora import has_lora, merge_lora, unwrap_model

PredictionType = Literal["epsilon", "v_prediction", "flow"]

# model_index.json ``_class_name`` -> the families such a folder can be
PIPELINE_FAMILIES: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("sd15", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",),
    "StableDiffusion3Pipeline": ("sd3",),
}
_CLIP = ("vae", "scheduler", "text_encoder", "tokenizer")
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", *_CLIP),
    "sd2": ("unet", *_CLIP),
    "sdxl": ("unet", *_CLIP, "text_encoder_2", "tokenizer_2"),
    # text_encoder_3 (T5) may be left out: the SD3 pipeline then uses zeros in its place
    "sd3": ("transformer", *_CLIP, "text_encoder_2", "tokenizer_2"),
}


def _read_json(path: Path, model_dir: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{model_dir}: {path.name} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelError(f"{model_dir}: {path.name} should hold a JSON object")
    return data


def _model_index(model_dir: str | Path) -> dict[str, Any]:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelError(f"{model_dir}: no such folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{model_dir}: no model_index.json; expected a diffusers pipeline folder (save_pretrained)")
    return _read_json(index, model_dir)


def _component_config(model_dir: str | Path, component: str, file_name: str) -> dict[str, Any]:
    path = Path(model_dir) / component / file_name
    return _read_json(path, model_dir) if path.is_file() else {}


def detect_family(model_dir: str) -> str:
    """The family (sd15, sd2, sdxl, sd3) of a local diffusers pipeline folder.

    From ``model_index.json``'s ``_class_name``; a ``StableDiffusionPipeline`` is sd2 when its scheduler predicts
    ``v_prediction`` or its UNet uses linear projections (SD2's layout), else sd15.
    """
    class_name = _model_index(model_dir).get("_class_name")
    families = PIPELINE_FAMILIES.get(str(class_name))
    if families is None:
        raise ModelError(
            f"{model_dir}: model_index.json names pipeline class {class_name!r}; supported: {sorted(PIPELINE_FAMILIES)}"
        )
    if families != ("sd15", "sd2"):
        return families[0]
    scheduler = _component_config(model_dir, "scheduler", "scheduler_config.json")
    unet = _component_config(model_dir, "unet", "config.json")
    is_sd2 = scheduler.get("prediction_type") == "v_prediction" or bool(unet.get("use_linear_projection"))
    return "sd2" if is_sd2 else "sd15"


def _components(index: dict[str, Any]) -> dict[str, bool]:
    """Component name -> whether ``model_index.json`` names a class for it (False: saved as None)."""
    return {
        name: value[0] is not None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2
    }


def _check_components(model_dir: str | Path, family: str) -> None:
    listed = {name for name, present in _components(_model_index(model_dir)).items() if present}
    for name in REQUIRED_COMPONENTS[family]:
        if name not in listed:
            raise ModelError(f"{model_dir}: model_index.json has no component {name!r}, which a {family} model needs")
    for name in sorted(listed):
        if not (Path(model_dir) / name).is_dir():
            raise ModelError(f"{model_dir}: component {name!r} is listed in model_index.json but {name}/ is missing")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _local_folder(source: str, revision: str | None) -> str:
    """``source`` itself when it is a folder, else the local snapshot of the hub repository ``source``."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if Path(source).expanduser().exists():
        raise ModelError(f"{source}: is a file; expected a diffusers pipeline folder or a hub id")
    if not _HUB_ID.fullmatch(source):
        raise ModelError(f"{source}: no such folder")
    try:
        return str(DiffusionPipeline.download(source, revision=revision))
    except Exception as err:  # the hub client raises many types (offline, not found, auth, network)
        raise ModelError(f"{source}: not a local folder, and fetching it from the model hub failed: {err}") from err


def load_model(
    source: str,
    family: str | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    encoders: bool = True,
) -> DiffusionModel:
    """Load a diffusers pipeline (local folder or hub id) behind its family's adapter.

    ``family`` None detects it; a given family must fit the folder's pipeline class. ``encoders=False`` loads only
    the denoiser and the scheduler (training from a latent cache): the VAE, text encoders and tokenizers stay on
    disk, and :meth:`DiffusionModel.save_pipeline` copies them from the folder.
    """
    model_dir = _local_folder(source, revision)
    detected = detect_family(model_dir)
    if family is None:
        family = detected
    elif family not in FAMILY_ADAPTERS:
        raise ModelError(f"model.family {family!r}: unknown; expected one of {sorted(FAMILY_ADAPTERS)}")
    elif family != detected and family not in PIPELINE_FAMILIES[_model_index(model_dir)["_class_name"]]:
        raise ModelError(f"{source}: model.family is {family!r} but the folder holds a {detected} pipeline")
    _check_components(model_dir, family)
    # components saved as None must be passed as None again, or diffusers refuses the folder (e.g. SD3 without T5)
    components = _components(_model_index(model_dir))
    absent = {name: None for name, present in components.items() if not present}
    if not encoders:
        absent.update({name: None for name in ENCODER_COMPONENTS if name in components})
    try:
        pipeline = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype, **absent)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ModelError(f"{source}: cannot load the {family} pipeline: {err}") from err
    pipeline.to(device)
    model = FAMILY_ADAPTERS[family](pipeline, family=family, source=source)
    model.model_dir = Path(model_dir)
    model.encoders_loaded = encoders
    return model


@contextmanager
def _component_swapped(pipeline: DiffusionPipeline, name: str, module: nn.Module) -> Iterator[None]:
    original = getattr(pipeline, name)
    pipeline.register_modules(**{name: module})
    try:
        yield
    finally:
        pipeline.register_modules(**{name: original})


class DiffusionModel:
    """A loaded pipeline and what training needs from it; one subclass per family."""

    denoiser_name: ClassVar[str] = "unet"

    def __init__(self, pipeline: DiffusionPipeline, *, family: str, source: str) -> None:
        self.pipeline = pipeline
        self.family = family
        self.source = source
        self.prediction_type: PredictionType = self._prediction_type()
        self.model_dir: Path | None = None  # the local folder it was loaded from (set by load_model)
        self.encoders_loaded = True

    def _prediction_type(self) -> PredictionType:
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        """The trainable network (``pipeline.unet`` or ``pipeline.transformer``)."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipeline.scheduler.config.num_train_timesteps)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def default_resolution(self) -> int:
        """The image size the pipeline generates by default (denoiser sample size x VAE scale factor)."""
        return int(self.denoiser.config.sample_size) * int(self.pipeline.vae_scale_factor)

    def freeze_all_but_denoiser(self) -> None:
        """VAE and text encoders: no gradients, eval mode. The denoiser is left as it is."""
        for component in self.pipeline.components.values():
            if isinstance(component, nn.Module) and component is not self.denoiser:
                component.requires_grad_(False)
                component.eval()

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Pixels [B,3,H,W] in [-1, 1] -> latents scaled as the pipeline expects them.

        ``sample`` draws from the VAE posterior (as training scripts do); False takes its mean.
        """
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            return (latents - mean) * config.scaling_factor / std
        shift = config.get("shift_factor") or 0.0
        return (latents - shift) * config.scaling_factor

    @torch.no_grad()
    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels [B,3,H,W] in [-1, 1] -> mean and std of the VAE posterior in the scaled latent space.

        ``mean + std * eps`` with standard normal ``eps`` is a posterior sample scaled as :meth:`encode_images`
        scales it; the latent cache stores these two tensors, so cached and live training sample alike.
        """
        vae = self._needs("vae")
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            shift = torch.tensor(config.latents_mean, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1)
            scale = config.scaling_factor / torch.tensor(config.latents_std, device=mean.device,
                                                         dtype=mean.dtype).view(1, -1, 1, 1)
        else:
            shift, scale = config.get("shift_factor") or 0.0, config.scaling_factor
        return (mean - shift) * scale, std * scale

    def _needs(self, component: str) -> nn.Module:
        module = getattr(self.pipeline, component, None)
        if module is None:
            raise ModelError(f"{self.source}: the {component} was not loaded (training from a latent cache loads "
                             "only the denoiser); use the cached tensors instead")
        return module

    def encode_prompts(self, prompts: list[str], *, image_size: int | None = None) -> dict[str, Tensor]:
        """Conditioning tensors for :meth:`predict` (batch first, no gradient); ``image_size``: SDXL's time ids."""
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps for a batch, on the model's device."""
        raise NotImplementedError

    def noisy_input_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(noised latents x_t, regression target y) for the family's prediction type."""
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One forward of ``denoiser`` (this model's network, a frozen copy, or the same with adapters off)."""
        raise NotImplementedError

    def save_pipeline(self, out_dir: str, denoiser: nn.Module | None = None) -> None:
        """Write a complete diffusers folder with ``denoiser`` (default: this model's) in place of the original.

        A denoiser with LoRA adapters is saved with the adapters fused (into a copy; the argument is unchanged).
        """
        module = unwrap_model(self.denoiser if denoiser is None else denoiser)
        if has_lora(module):
            module = merge_lora(copy.deepcopy(module))
        if not self.encoders_loaded:
            self._save_beside_source(out_dir, module)
            return
        with atomic_directory(out_dir) as tmp, _component_swapped(self.pipeline, self.denoiser_name, module):
            self.pipeline.save_pretrained(tmp)

    def _save_beside_source(self, out_dir: str, module: nn.Module) -> None:
        """The source folder's components as they are (VAE, text encoders...) and ``module`` as the denoiser."""
        import shutil

        if self.model_dir is None:
            raise ModelError(f"{self.source}: loaded without its encoders and without a folder to copy them from")
        with atomic_directory(out_dir) as tmp:
            for entry in self.model_dir.iterdir():
                if entry.name == self.denoiser_name or entry.name.startswith("."):
                    continue
                target = Path(tmp) / entry.name
                if entry.is_dir():
                    shutil.copytree(entry, target)
                else:
                    shutil.copy2(entry, target)
            module.save_pretrained(str(Path(tmp) / self.denoiser_name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, source={self.source!r}, {self.prediction_type})"


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class UNetModel(DiffusionModel):
    """SD1.x and SD2: UNet on CLIP hidden states; epsilon or v-prediction, from the scheduler config."""

    def __init__(self, pipeline: DiffusionPipeline, *, family: str, source: str) -> None:
        # a separate DDPM scheduler: sampling with the pipeline must not change training's noise schedule
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        super().__init__(pipeline, family=family, source=source)

    def _prediction_type(self) -> PredictionType:
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ModelError(
                f"{self.source}: scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)"
            )
        return kind

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, image_size: int | None = None) -> dict[str, Tensor]:
        self._needs("text_encoder")
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds}

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integers in [0, num_train_timesteps)."""
        timesteps = torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=_generator_device(generator)
        )
        return timesteps.to(self.device)

    def noisy_input_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def _added_cond(self, cond: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return None

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=self._added_cond(cond),
            return_dict=False,
        )[0]


class SDXLModel(UNetModel):
    """SDXL: two CLIP encoders (hidden states concatenated), pooled embedding and size/crop time ids."""

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], *, image_size: int | tuple[int, int] | None = None
    ) -> dict[str, Tensor]:
        """Also ``text_embeds`` (pooled) and ``time_ids`` for ``image_size`` (default: the pipeline's), no crop."""
        self._needs("text_encoder_2")
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = image_size or self.default_resolution
        height, width = (size, size) if isinstance(size, int) else size
        time_ids = self.pipeline._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=self.pipeline.text_encoder_2.config.projection_dim,
        )
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}

    def _added_cond(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}


class SD3Model(DiffusionModel):
    """SD3: MMDiT transformer, rectified flow (x_t = (1 - sigma) x0 + sigma n, target n - x0), three text encoders.

    Timesteps are drawn as diffusers' SD3 training does (``weighting_scheme`` uniform ``"none"``, ``"logit_normal"``
    or ``"mode"``), and prompts are encoded with ``max_sequence_length`` T5 tokens (77, as that script's default).
    """

    denoiser_name: ClassVar[str] = "transformer"

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        family: str,
        source: str,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        max_sequence_length: int = 77,
    ) -> None:
        # a separate copy: pipeline sampling calls set_timesteps, which rewrites the scheduler's timestep table
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline, family=family, source=source)

    def _prediction_type(self) -> PredictionType:
        return "flow"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, image_size: int | None = None) -> dict[str, Tensor]:
        self._needs("text_encoder")
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Density-sampled positions in [0, 1) mapped onto the scheduler's (shifted) training timesteps."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=_generator_device(generator),
            generator=generator,
        )
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.noise_scheduler.timesteps[indices.cpu()].to(self.device)

    def sigmas(self, timesteps: Tensor, ndim: int = 4) -> Tensor:
        """Noise level sigma of each timestep, shaped to broadcast over ``ndim``-dimensional latents.

        The flow-matching scheduler defines its timesteps as ``sigma * num_train_timesteps``.
        """
        sigma = timesteps.float() / self.num_train_timesteps
        return sigma.reshape(-1, *([1] * (ndim - 1)))

    def noisy_input_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas(timesteps, latents.ndim).to(device=latents.device, dtype=latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


FAMILY_ADAPTERS: dict[str, type[DiffusionModel]] = {
    "sd15": UNetModel,
    "sd2": UNetModel,
    "sdxl": SDXLModel,
    "sd3": SD3Model,
}
