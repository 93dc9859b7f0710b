"""Real models through evaluation and the registry: a deliberately worse candidate is refused.

The toy base is the current champion. The candidate is the same pipeline with noise added to its UNet weights.
The synthetic judge alone can be fooled by such a model (it scores some degenerate images well), but its held-out
winner error against the base rises far beyond the guard's tolerance, so promotion refuses it: decided on real
generated images and real held-out errors, not on crafted numbers.
"""

from pathlib import Path

import mlflow
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdpo.config import load_config
from sdpo.eval.generate import evaluate, resolve_prompts
from sdpo.tracking.registry import promote, register

ROOT = Path(__file__).resolve().parents[1]
POLICY = {"primary_reward": "synthetic", "min_win_rate_lower": 0.5, "guards": {"heldout_winner_delta": 0.002},
          "bootstrap_samples": 200}


def noised_copy(model_dir: Path, out: Path, scale: float = 0.7) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else p.abs()))
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def evals(toy_base, toy_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promotion")
    cfg = load_config(ROOT / "params.yaml", ["eval.seeds_per_prompt=8", "eval.num_inference_steps=10",
                                             "eval.heldout_pairs=32"])
    worse = noised_copy(toy_base, tmp / "worse")
    prompts = resolve_prompts("heldout")
    for name, model in (("base", toy_base), ("worse", worse)):
        evaluate(str(model), prompts, tmp / f"eval-{name}", cfg.eval, base_dir=str(toy_base),
                 heldout_shards=str(toy_shards["heldout"]))
    return {"base": Path(toy_base), "worse": worse, "eval-base": tmp / "eval-base", "eval-worse": tmp / "eval-worse"}


def test_worse_candidate_is_refused_and_champion_kept(evals, mlflow_tracking):
    name = "sdpo-e2e"
    client = mlflow.MlflowClient()
    champion = register(evals["base"], name=name, eval_dir=evals["eval-base"], dvc_lock=None)
    client.set_registered_model_alias(name, "champion", champion.version)  # the model in production
    candidate = register(evals["worse"], name=name, eval_dir=evals["eval-worse"], dvc_lock=None)
    decision = promote(name, candidate.version, candidate_eval=evals["eval-worse"], **POLICY)
    assert not decision.promote
    assert decision.details["baseline_version"] == champion.version
    assert "heldout_winner_delta" in decision.reason, decision.reason
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    refused = client.get_model_version_by_alias(name, "challenger")
    assert refused.version == candidate.version and refused.tags["promotion.decision"] == "refused"
