"""The paper's pathology at toy scale, on the toy base that `make run` builds (docs/method.md).

With plain Diffusion-DPO the held-out winner error rises above the reference (m_w - r_w > 0) while the margin
widens; with the SDPO safeguard (mu = 0.9, one lambda per pair) it stays at or below the reference. Two seeds.
"""

from pathlib import Path

import pytest

from sdpo.config import load_config
from sdpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# A hang guard only, far above the quiet time (about 6 minutes for the four trainings on 2 cores): a loaded machine
# once took 14 minutes, and the test asserts nothing about speed.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def deltas(toy_base, toy_shards, tmp_path_factory) -> dict[tuple[str, int], dict[str, float]]:
    out = tmp_path_factory.mktemp("pathology")
    results = {}
    for seed in (0, 1):
        for variant in ("dpo", "dpo-sdpo"):
            cfg = load_config(ROOT / "params.yaml", [f"train.seed={seed}"])
            result = train(cfg, shards_dir=toy_shards["train"], base_model=str(toy_base),
                           output_dir=out / f"{variant}-{seed}", variant=variant,
                           heldout_shards=toy_shards["heldout"], show_progress=False)
            results[(variant, seed)] = {**result.heldout, **result.final_metrics}
            print(variant, seed, result.heldout, {k: result.final_metrics.get(k) for k in ("lambda_mean",)})
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_plain_dpo_raises_the_heldout_winner_error(deltas, seed):
    d = deltas[("dpo", seed)]
    assert d["winner_delta"] > 0, d
    assert d["loser_delta"] > d["winner_delta"], d  # the margin widens by making both branches worse


@pytest.mark.parametrize("seed", [0, 1])
def test_safeguard_keeps_the_heldout_winner_error_at_or_below_the_reference(deltas, seed):
    d = deltas[("dpo-sdpo", seed)]
    assert d["winner_delta"] <= 0, d
    assert 0 < d["lambda_mean"] < 1, d  # the safeguard was active, not a no-op


def test_the_defaults_are_the_configuration_under_test():
    cfg = load_config(ROOT / "params.yaml")
    sdpo = cfg.train.for_variant("dpo-sdpo")
    assert (sdpo.method, sdpo.safeguard, sdpo.mu) == ("dpo", "pair", 0.9)
    assert cfg.train.for_variant("dpo").safeguard == "off"
