"""Sample a model on fixed (prompt, seed) units, score every image with the configured rewards, write an eval folder.

Output folder (written to a temporary sibling, then renamed into place)::

    images/p00003_s1234.png   one PNG per (prompt index, seed)
    manifest.json             model path and digest, prompts, seeds, generation settings, rewards
    scores.jsonl              one row per image: prompt, prompt_index, seed, image, scores {reward: value}
    summary.json              the headline numbers, flat (each reward's mean, the held-out deltas): DVC's metrics
    metrics.json              {"rewards": {name: {mean, ci_low, ci_high, n}}, "heldout": {...}, "model_digest"}
    grid.png                  sample grid: prompts (rows) x first seeds (columns), both labelled

Guidance follows the diffusers convention: ``guidance_scale = 1.0`` means no classifier-free guidance and
``uncond + s * (cond - uncond)`` is applied for s > 1. The public Diffusion-DPO/SDPO reference code writes
``cond + s' * (cond - uncond)``, so its s' equals our ``guidance_scale - 1``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdpo import fs
from sdpo.config import ConfigError, EvalConfig
from sdpo.errors import DataError, ModelError
from sdpo.eval.rewards import RewardModel, load_reward
from sdpo.eval.rewards.alignment import Alignment, alignment_parts
from sdpo.eval.winrate import bootstrap_ci

SCHEMA_VERSION = 1
GUIDANCE_CONVENTION = "diffusers: 1.0 = no guidance; reference-code s = guidance_scale - 1"
GRID_MAX_PROMPTS = 16
GRID_MAX_SEEDS = 4
GRID_MIN_CELL = 64  # tiny images are upscaled (nearest) so the grid is readable in MLflow and cards
GRID_FONT_SIZE = 12
GRID_MARGIN = 4
SCORE_CHUNK = 256  # images read back and scored per call


@dataclass(frozen=True)
class ImageUnit:
    """One image to generate: a prompt (by index) and a seed."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def image_name(self) -> str:
        return f"images/p{self.prompt_index:05d}_s{self.seed}.png"


def resolve_prompts(spec: str) -> list[str]:
    """``"heldout"`` / ``"train"``: the synthetic world's prompt sets; otherwise a text file, one prompt a line."""
    if spec in ("heldout", "train"):
        from sdpo.data.synthetic import prompts

        return prompts(spec)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: prompt file not found (or use the synthetic sets 'heldout' / 'train')")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts_ = [line for line in lines if line]
    if not prompts_:
        raise DataError(f"{path}: no prompts (expected one prompt a line)")
    return prompts_


def eval_seeds(cfg: EvalConfig) -> list[int]:
    """The fixed seeds every prompt is sampled with."""
    return [cfg.seed + k for k in range(cfg.seeds_per_prompt)]


def plan_units(prompts: Sequence[str], seeds: Sequence[int]) -> list[ImageUnit]:
    """Every (prompt, seed) unit, prompt-major."""
    return [ImageUnit(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]


def load_pipeline(model_dir: Path, scheduler: str, device: torch.device):
    """A diffusers pipeline from a local folder (offline), with the evaluation scheduler installed.

    ``ddim`` / ``euler`` replace the scheduler (keeping its noise schedule and prediction type); flow-matching
    pipelines keep their FlowMatch scheduler, which those names do not apply to; ``default`` keeps whatever is saved.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler

    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir}: not a diffusers pipeline folder (model_index.json is missing)")
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: cannot load the pipeline: {err}") from err
    is_flow_matching = "FlowMatch" in type(pipe.scheduler).__name__
    if scheduler != "default" and not is_flow_matching:
        scheduler_class = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_resolution(pipe) -> int:
    """Default image side of a pipeline: the denoiser's sample size times the VAE scale factor."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ModelError(f"{type(pipe).__name__}: no unet or transformer to read the sample size from")
    return int(denoiser.config.sample_size * pipe.vae_scale_factor)


def generation_settings(pipe, cfg: EvalConfig) -> dict[str, Any]:
    """Everything about sampling that must match for two evaluation folders to be comparable (and a bit more)."""
    return {
        "pipeline": type(pipe).__name__,
        "scheduler": cfg.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "guidance_convention": GUIDANCE_CONVENTION,
        "resolution": pipeline_resolution(pipe),
        "dtype": "float32",
    }


def generate_images(
    pipe, units: Sequence[ImageUnit], settings: dict[str, Any], batch_size: int
) -> Iterator[tuple[ImageUnit, Image.Image]]:
    """Sample ``units`` in batches; one CPU generator per image so an image does not depend on its batch."""
    for start in range(0, len(units), batch_size):
        batch = units[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(unit.seed) for unit in batch]
        with torch.no_grad():
            output = pipe(
                prompt=[unit.prompt for unit in batch],
                num_inference_steps=settings["num_inference_steps"],
                guidance_scale=settings["guidance_scale"],
                height=settings["resolution"],
                width=settings["resolution"],
                generator=generators,
                output_type="pil",
            )
        yield from zip(batch, output.images, strict=True)


def prompt_following(
    pipe, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig
) -> tuple[list[ImageUnit], Alignment]:
    """Sample every prompt on ``seeds`` as the evaluation does and classify each image against its prompt.

    Only for prompts of the synthetic world, whose ground truth (colour, shape) the alignment reward reads.
    """
    units = plan_units(prompts, seeds)
    settings = generation_settings(pipe, cfg)
    images = [np.asarray(image) for _, image in generate_images(pipe, units, settings, cfg.batch_size)]
    return units, alignment_parts(images, [unit.prompt for unit in units])


def load_rewards(cfg: EvalConfig, device: torch.device) -> dict[str, RewardModel]:
    """Every configured reward, loaded (and its weights checked) before any image is generated."""
    return {name: load_reward(name, cfg.reward_paths.get(name), cfg.reward_sha256.get(name), device=device)
            for name in cfg.rewards}


def score_units(folder: Path, units: Sequence[ImageUnit], rewards: dict[str, RewardModel]) -> list[dict]:
    """Score the saved images of ``units`` with every reward."""
    rows = [
        {"prompt": u.prompt, "prompt_index": u.prompt_index, "seed": u.seed, "image": u.image_name, "scores": {}}
        for u in units
    ]
    for name, reward in rewards.items():
        for start in range(0, len(units), SCORE_CHUNK):
            chunk = units[start : start + SCORE_CHUNK]
            images = [Image.open(folder / u.image_name).convert("RGB") for u in chunk]
            scores = np.asarray(reward.score(images, [u.prompt for u in chunk]), dtype=np.float64)
            for row, value in zip(rows[start : start + SCORE_CHUNK], scores, strict=True):
                row["scores"][name] = float(value)
    return rows


def reward_metrics(rows: list[dict], rewards: Sequence[str], bootstrap_samples: int, seed: int) -> dict[str, Any]:
    """Mean and bootstrap 95% interval over images of every reward."""
    metrics = {}
    for name in rewards:
        values = np.array([row["scores"][name] for row in rows], dtype=np.float64)
        low, high = bootstrap_ci(values, bootstrap_samples, seed)
        metrics[name] = {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "n": int(values.size)}
    return metrics


def write_grid(folder: Path, prompts: Sequence[str], seeds: Sequence[int], path: Path) -> None:
    """grid.png: the first prompts (rows, labelled with the prompt) by the first seeds (columns, labelled)."""
    from diffusers.utils import make_image_grid

    rows, cols = min(len(prompts), GRID_MAX_PROMPTS), min(len(seeds), GRID_MAX_SEEDS)
    cells = [
        Image.open(folder / ImageUnit(i, prompts[i], seed).image_name).convert("RGB")
        for i in range(rows)
        for seed in seeds[:cols]
    ]
    side = max(cells[0].width, GRID_MIN_CELL)
    if cells[0].width < side:
        cells = [cell.resize((side, side * cell.height // cell.width), Image.Resampling.NEAREST) for cell in cells]
    grid = make_image_grid(cells, rows=rows, cols=cols)
    _label_grid(grid, list(prompts[:rows]), [f"seed {seed}" for seed in seeds[:cols]],
                cell=(cells[0].width, cells[0].height)).save(path)


def _label_grid(grid: Image.Image, row_labels: list[str], col_labels: list[str], *,
                cell: tuple[int, int]) -> Image.Image:
    """The grid on a white canvas with its row labels on the left and its column labels on top."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=GRID_FONT_SIZE)
    measure = ImageDraw.Draw(grid)
    left = int(max(measure.textlength(label, font=font) for label in row_labels)) + 2 * GRID_MARGIN
    top = GRID_FONT_SIZE + 2 * GRID_MARGIN
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    width, height = cell
    for j, label in enumerate(col_labels):
        draw.text((left + j * width + GRID_MARGIN, GRID_MARGIN), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        draw.text((GRID_MARGIN, top + i * height + (height - GRID_FONT_SIZE) // 2), label, fill="black", font=font)
    return canvas


def metrics_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of ``metrics``, flat: each reward's mean and the held-out winner/loser deltas.

    ``dvc metrics show`` prints one column per key of every metrics file, so it reads this file rather than
    ``metrics.json`` (four numbers per reward, digests): the table then fits a terminal.
    """
    summary = {name: entry["mean"] for name, entry in metrics.get("rewards", {}).items()}
    summary.update({key: metrics["heldout"][key] for key in ("winner_delta", "loser_delta")
                    if key in metrics.get("heldout", {})})
    return summary


def write_results(folder: Path, manifest: dict[str, Any], rows: list[dict], metrics: dict[str, Any]) -> None:
    """manifest.json, scores.jsonl, grid.png, summary.json and, last, metrics.json beside the images in ``folder``."""
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_grid(folder, manifest["prompts"], manifest["seeds"], folder / "grid.png")
    (folder / "summary.json").write_text(json.dumps(metrics_summary(metrics), indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def evaluate(
    model_dir: str | Path,
    prompts: list[str],
    out_dir: str | Path,
    cfg: EvalConfig,
    *,
    base_dir: str | Path | None = None,
    heldout_shards: str | Path | None = None,
    extra_metrics: dict[str, Any] | None = None,
    model_uri: str | None = None,
) -> dict[str, Any]:
    """Generate ``cfg.seeds_per_prompt`` images per prompt from ``model_dir``, score them, publish ``out_dir``.

    ``out_dir`` is a local folder or an object-store URI; it is replaced whole, with ``metrics.json`` last. With
    ``base_dir`` and ``heldout_shards`` the held-out winner/loser error deltas against the base are added to the
    metrics; ``extra_metrics`` are merged in as they are. ``model_uri`` is recorded as where the model lives (default:
    ``model_dir``). Launched with several processes (``accelerate launch``), units are split between processes and
    the main process writes the folder. Returns the metrics.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if (base_dir is None) != (heldout_shards is None):
        raise ConfigError(
            "held-out deltas need both a base model folder and held-out shards (--base, --heldout-shards)"
        )
    if not prompts:
        raise DataError("no prompts to evaluate")
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found")
    # cpu=True lets torchrun / accelerate launch split work over CPU processes (gloo) as well as GPUs.
    state = PartialState(cpu=not torch.cuda.is_available())
    rewards = load_rewards(cfg, state.device)  # a missing or mismatched reward fails before any generation
    seeds = eval_seeds(cfg)
    units = plan_units(prompts, seeds)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(fs.publishing(out_dir, marker="metrics.json")) if state.is_main_process \
            else None
        shared = gather_object([str(tmp)] if tmp is not None else [])
        work = Path(shared[0])
        if state.is_main_process:
            (work / "images").mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        pipe = load_pipeline(model_dir, cfg.scheduler, state.device)
        settings = generation_settings(pipe, cfg)
        with state.split_between_processes(units) as my_units:
            for unit, image in generate_images(pipe, my_units, settings, cfg.batch_size):
                image.save(work / unit.image_name)
            del pipe
            my_rows = score_units(work, my_units, rewards)
        rows = sorted(gather_object(my_rows), key=lambda row: (row["prompt_index"], row["seed"]))
        metrics: dict[str, Any] = {}
        if state.is_main_process:
            digest = fs.folder_digest(model_dir)
            metrics = {"rewards": reward_metrics(rows, cfg.rewards, cfg.bootstrap_samples, cfg.seed),
                       "model_digest": digest}
            if base_dir is not None:
                from sdpo.train.heldout import heldout_deltas

                metrics["heldout"] = heldout_deltas(
                    str(model_dir), str(base_dir), str(heldout_shards), n_pairs=cfg.heldout_pairs, seed=cfg.seed
                )
            metrics.update(extra_metrics or {})
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "model": model_uri or str(model_dir),
                "model_digest": digest,
                "prompts": list(prompts),
                "seeds": seeds,
                "settings": settings,
                "rewards": list(cfg.rewards),
                "n_images": len(units),
            }
            write_results(work, manifest, rows, metrics)
    state.wait_for_everyone()
    return metrics if state.is_main_process else {}
