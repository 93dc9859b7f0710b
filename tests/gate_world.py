"""A tiny world for registry and promotion tests: real pipelines, real evaluations, a real MLflow server.

The models are copies of one tiny random SD1.5 pipeline (16 px). Scaling the VAE decoder's output layer makes the
images smoother, which the synthetic judge scores higher, and leaves the UNet, so the held-out error deltas, exactly
as they are; noising the UNet raises them. So each model's place is known by construction:

    base (scale 1) < worse (0.6) < good (0.3) < better (0.1) < best (0.03)     judge, image by image
    noised: decoder 0.1 (the judge likes it as much as `better`) and a noised UNet (held-out winner error up)

Evaluations use 2 seeds per prompt and 2 inference steps on the 4 held-out prompts (8 images). Each test gets its
own registered model name; evaluations live in one experiment per module. :func:`variant` makes a copy of a model
with one extra file: the same images under another digest, for tests that must not share evaluation runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

ZOO = {"good": 0.3, "better": 0.1, "best": 0.03, "worse": 0.6, "noised": 0.1}
EVAL_SETTINGS = ["eval.seeds_per_prompt=2", "eval.num_inference_steps=2",
                 "eval.prompt_sets.train.seeds_per_prompt=1", "eval.batch_size=8",
                 "eval.bootstrap_samples=100", "eval.heldout_pairs=8",
                 # the zoo is built for the judge (smoother images score higher), so the gate reads it
                 "eval.rewards=[synthetic]", "registry.primary_reward=synthetic"]


def _scaled_copy(base: Path, out: Path, decoder_scale: float, unet_noise: float = 0.0) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(decoder_scale)
        if unet_noise:
            for p in pipe.unet.parameters():
                scale = p.std() if p.numel() > 1 else p.abs()
                p.add_(torch.randn(p.shape, generator=generator) * unet_noise * scale)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gate_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base, the zoo's models and small train / held-out shards (16 px)."""
    from pipeline_fixtures import make_shards

    from sdpo.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("gate-models")
    base = Path(build_tiny_pipeline("sd15", str(root / "base"), resolution=16))
    models = {"base": base}
    for name, scale in ZOO.items():
        models[name] = _scaled_copy(base, root / name, scale, unet_noise=0.7 if name == "noised" else 0.0)
    models["shards-train"] = make_shards(root, pairs=4, seed=1, split="train", resolution=16)
    models["shards-heldout"] = make_shards(root, pairs=8, seed=0, split="heldout", resolution=16)
    return models


@dataclass
class World:
    """A run root with the zoo's models as arms, and a stage context factory over one experiment."""

    root: Path
    models: dict[str, Path]
    experiment: str

    def ctx(self, model_name: str, *overrides: str):
        from sdpo import stages
        from sdpo.config import load_config

        cfg = load_config(None, [f"data.root={self.root}", f"model.base={self.models['base']}",
                                 f"registry.experiment={self.experiment}", f"registry.model_name={model_name}",
                                 *EVAL_SETTINGS, *overrides])
        return stages.StageContext.from_config(cfg, self.root)

    def add_arm(self, arm: str, model: Path) -> str:
        shutil.copytree(model, self.root / "models" / arm / "model", dirs_exist_ok=True)
        return arm

    def variant(self, arm: str, source: str) -> str:
        """A new arm: ``source``'s model with one extra file (same images, another digest)."""
        self.add_arm(arm, self.models[source])
        (self.root / "models" / arm / "model" / "variant.txt").write_text(arm)
        return arm


def make_world(root: Path, models: dict[str, Path], experiment: str, evaluate: tuple[str, ...]) -> World:
    """A run root (shards, base recorded, arms) with ``evaluate`` arms evaluated into ``experiment``."""
    from sdpo import stages

    for split in ("train", "heldout"):
        shutil.copytree(models[f"shards-{split}"], root / "shards" / split)
    world = World(root, models, experiment)
    for name in ZOO:
        world.add_arm(name, models[name])
    ctx = world.ctx("unused")
    stages.base(ctx)
    for arm in evaluate:
        stages.evaluate(ctx, arm)
    return world


def registry_state(name: str) -> dict:
    """Aliases and every version's tags of registered model ``name`` (what a refusal must leave untouched)."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    return {"aliases": dict(client.get_registered_model(name).aliases),
            "versions": {v.version: dict(v.tags) for v in versions}}


def crown(world: World, name: str, arm: str = "good") -> str:
    """Register ``arm`` and promote it over the base: the champion of ``name``; returns its version."""
    from sdpo import stages

    ctx = world.ctx(name)
    version = stages.register(ctx, arm)["version"]
    result = stages.promote(ctx, version)
    assert result["outcome"] == "promoted", result["decision"]["reason"]
    return version
