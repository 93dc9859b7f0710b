"""The recipes in recipes/: each loads through the schema, carries the paper's numbers, and trains.

The table below is the paper's settings table (beta and mu per setting) as the project's method notes give it;
the SD3 recipe is ours (no paper number) and is checked only against what its file says. Every recipe then runs
two training steps on the tiny model of its family through the stage code (``stages.encode`` + ``stages.train``
with the latent cache on), with overrides only for paths, sizes, steps and precision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdpo import stages
from sdpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# recipe -> (model.family, train.method, beta, mu): the paper's settings table (SD1.5/SDXL); SD3 is ours
TABLE = {
    "sd15-dpo": ("sd15", "dpo", 5000.0, 0.9),
    "sd15-dspo": ("sd15", "dspo", 0.001, 0.2),
    "sd15-dmpo": ("sd15", "dmpo", 2000.0, 0.9),
    "sdxl-dpo": ("sdxl", "dpo", 5000.0, 0.6),
    "sdxl-dspo": ("sdxl", "dspo", 5000.0, 0.6),
    "sdxl-dmpo": ("sdxl", "dmpo", 6000.0, 0.6),
    "sd3-dpo": ("sd3", "dpo", 5000.0, 0.9),
}
PAPER = [name for name in TABLE if not name.startswith("sd3")]
# lr before scaling by the effective batch (train.scale_lr), and the optimizer, per family
FAMILY = {"sd15": (1e-8, "adamw", False, 512), "sdxl": (1e-9, "adafactor", True, 1024),
          "sd3": (1e-9, "adafactor", True, 1024)}

# Two steps at tiny sizes. Precision: bf16 autocast works on this CPU and is kept, so the recipes' own precision
# path runs; nothing else but paths, sizes and steps is overridden.
TINY = ["data.resolution=32", "train.steps=2", "train.batch_size=2", "train.grad_accum=1", "train.heldout_every=0",
        "train.checkpoint_every=0", "train.log_every=1", "train.reference_epochs=0", "train.cache_batch_size=4"]


def _path(name: str) -> Path:
    return RECIPES / f"{name}.yaml"


def test_every_recipe_is_in_the_table():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_loads_with_the_papers_numbers(name):
    family, method, beta, mu = TABLE[name]
    text = _path(name).read_text()
    assert text.startswith("# "), "a recipe starts with a comment saying where its numbers come from"
    cfg = load_config(_path(name))
    t = cfg.train
    assert (cfg.model.family, t.method, t.beta, t.mu) == (family, method, beta, mu)
    lr, optimizer, checkpointing, resolution = FAMILY[family]
    assert (t.lr, t.scale_lr, t.optimizer, t.gradient_checkpointing) == (lr, True, optimizer, checkpointing)
    assert t.batch_size * t.grad_accum * 8 == 2048  # 8 per GPU x 32 accumulation x 8 GPUs
    assert (t.steps, t.lr_schedule, t.warmup_steps) == (2000, "constant_with_warmup", 500)
    assert (t.mixed_precision, t.weight_decay, t.prompt_dropout, t.random_flip) == ("bf16", 1e-2, 0.2, True)
    assert cfg.data.resolution == resolution and not cfg.data.keep_ties
    e = cfg.eval
    assert (e.scheduler, e.num_inference_steps, e.guidance_scale, e.seeds_per_prompt) == ("euler", 50, 8.5, 1)
    assert e.prompt_sets == {}  # the schema's default further set is the synthetic world's train prompts
    # two arms: the method alone and the method with the safeguard; the candidate is the safeguarded one
    arms = {arm: t.for_variant(arm) for arm in t.variants}
    assert {arm: v.method for arm, v in arms.items()} == {method: method, f"{method}-sdpo": method}
    assert arms[method].safeguard == "off"
    assert arms[f"{method}-sdpo"].safeguard == ("pair" if family == "sd3" else "batch")
    assert cfg.registry.candidate == f"{method}-sdpo"
    # reference-free training where it is allowed (DSPO needs the reference's prediction)
    assert t.cache and t.precompute_reference == (method != "dspo")
    if name in PAPER:
        assert f"beta {beta:g}, mu {mu:g}: the paper's settings table" in text
    else:
        assert "UNVERIFIED" in text.upper() and "ours" in text.lower()



@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each recipe sets its own mixed precision; accelerate keeps one process-wide state unless it is reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per family (32 px) and 32 px train shards, shared by every recipe of the module."""
    from pipeline_fixtures import make_shards

    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("recipe-world")
    found = {family: Path(build_tiny_pipeline(family, str(out / family), resolution=32, vocabulary=list(VOCABULARY)))
             for family in ("sd15", "sdxl", "sd3")}
    found["shards"] = make_shards(out, pairs=4, seed=3, split="train", resolution=32)
    return found


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_trains_two_steps_on_the_tiny_model_of_its_family(name, world, tmp_path, monkeypatch):
    family, method, _, _ = TABLE[name]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "root"
    shutil.copytree(world["shards"], root / "shards" / "train")
    model = str(world[family])
    ctx = stages.StageContext.load(_path(name), [f"data.root={root}", f"model.base={model}", *TINY])
    encoded = stages.encode(ctx, "train", base=model)
    assert encoded["pairs"] == 4 and encoded["flips"] is True
    assert encoded["reference_epochs"] == (0 if method == "dspo" else 1)  # 2 steps x 2 pairs: one epoch of 4
    arm = f"{method}-sdpo"
    summary = stages.train(ctx, arm, base=model)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (root / "models" / arm / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(abs(row["loss"]) < float("inf") for row in rows)
    assert (root / "models" / arm / "model" / "model_index.json").is_file()
