"""The paper's pathology at toy scale, on the toy base that `make run` builds (docs/method.md).

With plain Diffusion-DPO the held-out winner error rises above the reference (m_w - r_w > 0) while the margin
widens; with the SDPO safeguard (mu = 0.9, one lambda per pair) it stays at or below the reference. Two seeds.

Each (arm, seed) trains in its own test and its own xdist group, so the four trainings run on whichever workers are
free. They train from the latent caches of the train and held-out shards (``train.cache`` with params.yaml's dtype
and flips), as `make run` does. ``STEPS`` is the default ``train.steps``: twice the smallest probed length at which
the pattern held on every seed of ``experiments/pathology_sweep.py`` (docs/results.md, "The regression test").
"""

from pathlib import Path

import pytest

from sdpo.config import load_config
from sdpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 100  # the pattern held on 4 of 4 seeds from step 50 on; twice that leaves a margin
SEEDS = (0, 1)
# A hang guard only, far above the quiet time (under 2 minutes per training on one core): nothing here is timed.
pytestmark = pytest.mark.timeout(1800)


def _deltas(variant: str, seed: int, toy_base: Path, toy_shards: dict[str, Path], latents: dict[str, Path],
            out: Path) -> dict[str, float]:
    """Train one arm of params.yaml for ``STEPS`` steps from the latent caches, as `make run` trains; its final
    held-out deltas and training metrics."""
    overrides = [f"train.seed={seed}", f"train.steps={STEPS}", f"train.heldout_every={STEPS}"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    result = train(cfg, shards_dir=toy_shards["train"], base_model=str(toy_base), output_dir=out / f"{variant}-{seed}",
                   variant=variant, heldout_shards=toy_shards["heldout"], show_progress=False,
                   cache_dir=latents["train"], heldout_cache=latents["heldout"])
    print(variant, seed, result.heldout, {k: result.final_metrics.get(k) for k in ("lambda_mean",)})
    return {**result.heldout, **result.final_metrics}


def _per_seed(arm: str) -> list:
    return [pytest.param(seed, marks=pytest.mark.xdist_group(f"pathology-{arm}-{seed}")) for seed in SEEDS]


@pytest.mark.parametrize("seed", _per_seed("dpo"))
def test_plain_dpo_raises_the_heldout_winner_error(seed, toy_base, toy_shards, toy_latents, tmp_path):
    d = _deltas("dpo", seed, toy_base, toy_shards, toy_latents, tmp_path)
    assert d["winner_delta"] > 0, d
    assert d["loser_delta"] > d["winner_delta"], d  # the margin widens by making both branches worse


@pytest.mark.parametrize("seed", _per_seed("dpo-sdpo"))
def test_safeguard_keeps_the_heldout_winner_error_at_or_below_the_reference(seed, toy_base, toy_shards, toy_latents,
                                                                             tmp_path):
    d = _deltas("dpo-sdpo", seed, toy_base, toy_shards, toy_latents, tmp_path)
    assert d["winner_delta"] <= 0, d
    assert 0 < d["lambda_mean"] < 1, d  # the safeguard was active, not a no-op


def test_the_defaults_are_the_configuration_under_test():
    cfg = load_config(ROOT / "params.yaml")
    sdpo = cfg.train.for_variant("dpo-sdpo")
    assert (sdpo.method, sdpo.safeguard, sdpo.mu) == ("dpo", "pair", 0.9)
    assert cfg.train.steps == STEPS  # the regression runs as long as `make run` trains
    assert cfg.train.for_variant("dpo").safeguard == "off"
