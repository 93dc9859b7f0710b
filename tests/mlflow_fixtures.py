"""Fixtures for tracking tests: a real ``mlflow server`` (session-wide) and a tiny offline diffusers pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a fresh ``mlflow server`` (SQLite backend, proxied artifacts in a temp dir), stopped at session end."""
    from sdpo.devstack import mlflow_server as run_server

    with run_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def mlflow_tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Point sdpo and MLflow at the test server for one test (cwd: a temp dir, so nothing lands in the repo)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    while mlflow.active_run() is not None:
        mlflow.end_run()


# --- a tiny, random-weight StableDiffusionPipeline folder (offline) ---------------------------------------------

TINY_RESOLUTION = 32


def _write_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer (no merges); returns the vocabulary size."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def build_tiny_sd_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """Save a complete SD1.5-family pipeline (32 px, ~0.5M parameters, random weights) to ``out_dir``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab_size = _write_tokenizer(out_dir.parent / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir.parent / "tokenizer-src", model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline folder, built once per session."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


# --- crafted evaluation dirs, and a stand-in for sdpo.eval.winrate.compare_eval_dirs ----------------------------


def write_eval_dir(
    path: Path,
    scores: list[float],
    *,
    reward: str = "synthetic",
    heldout: dict[str, float] | None = None,
) -> Path:
    """An evaluation dir in the project's layout: one score per (prompt, seed), metrics.json, grid.png."""
    import numpy as np
    from PIL import Image

    (path / "images").mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"prompt {i % 8}", "seed": i, "rewards": {reward: value}} for i, value in enumerate(scores)]
    (path / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    values = np.asarray(scores, dtype=float)
    spread = 1.96 * values.std() / max(len(values), 1) ** 0.5
    metrics: dict = {
        "rewards": {reward: {"mean": values.mean(), "ci_low": values.mean() - spread, "ci_high": values.mean() + spread,
                             "n": len(values)}},
        "model_digest": "sha256:" + "0" * 64,
    }  # fmt: skip
    if heldout is not None:
        metrics["heldout"] = {**heldout, "n_pairs": 16}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "manifest.json").write_text(json.dumps({"prompts": 8, "seeds_per_prompt": len(scores) // 8}))
    Image.new("RGB", (8, 8), "red").save(path / "grid.png")
    Image.new("RGB", (8, 8), "blue").save(path / "images" / "000000.png")
    return path


def _scores(eval_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    rows = [json.loads(line) for line in (eval_dir / "scores.jsonl").read_text().splitlines() if line.strip()]
    return {(row["prompt"], row["seed"]): row["rewards"] for row in rows}


def paired_compare(candidate_dir: str, baseline_dir: str, *, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Paired win rates with bootstrap CIs, in the shape of ``compare_eval_dirs`` (a test stand-in for it)."""
    import numpy as np

    candidate, baseline = _scores(Path(candidate_dir)), _scores(Path(baseline_dir))
    keys = sorted(candidate.keys() & baseline.keys())
    rng = np.random.default_rng(seed)
    rewards = {}
    for name in sorted(set(candidate[keys[0]]) & set(baseline[keys[0]])):
        cand = np.array([candidate[k][name] for k in keys])
        base = np.array([baseline[k][name] for k in keys])
        outcome = np.where(cand > base, 1.0, np.where(cand == base, 0.5, 0.0))
        boot = outcome[rng.integers(0, len(keys), size=(bootstrap_samples, len(keys)))].mean(axis=1)
        rewards[name] = {
            "win_rate": float(outcome.mean()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "wins": int((cand > base).sum()),
            "ties": int((cand == base).sum()), "losses": int((cand < base).sum()),
            "mean_candidate": float(cand.mean()), "mean_baseline": float(base.mean()),
        }  # fmt: skip
    return {
        "candidate": str(candidate_dir),
        "baseline": str(baseline_dir),
        "n": len(keys),
        "rewards": rewards,
        "metrics_candidate": json.loads((Path(candidate_dir) / "metrics.json").read_text()),
        "metrics_baseline": json.loads((Path(baseline_dir) / "metrics.json").read_text()),
    }
