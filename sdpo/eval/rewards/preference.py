"""A learned preference model of the synthetic world: the toy counterpart of PickScore.

A small image-text scorer trained with a Bradley-Terry loss, ``-log sigmoid(s(winner, prompt) - s(loser, prompt))``,
on the TRAIN pairs only. It never sees the judge that labelled them, only which image won; so, like PickScore, it is
a model of the labels with its own errors, not the labeller.

Data: the ingested train shards (``sdpo ingest`` output, read with :func:`sdpo.data.loader.load_pairs_arrays`, winner
first, ties already dropped) or a Pick-a-Pic v2 table / parquet file (ties, ``label_0 == 0.5``, are skipped). The
shards are the pipeline's source of truth for training, so a stage should pass the shards folder.

Folder written by :func:`train_preference_model`::

    config.json         architecture, vocabulary, resolution, and "training": data digest, pair count, seed, steps
    model.safetensors   the weights; its metadata repeats the data digest

Scores are raw Bradley-Terry logits (higher is better; a difference of d means P(win) = sigmoid(d)).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from sdpo.errors import DataError, ModelError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "sdpo-toy-preference"
_UNKNOWN = "<unk>"


@dataclass(frozen=True)
class PreferenceConfig:
    """Architecture of the scorer (saved as config.json)."""

    vocabulary: list[str]
    resolution: int = 16
    channels: int = 32
    text_dim: int = 32
    max_words: int = 8
    model_type: str = MODEL_TYPE
    training: dict[str, Any] = field(default_factory=dict)


class PreferenceNet(nn.Module):
    """CNN image features and a bag of word embeddings, joined by an MLP into one logit."""

    def __init__(self, cfg: PreferenceConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.image = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(c * (cfg.resolution // 4) ** 2, c), nn.SiLU(),
        )  # fmt: skip
        self.words = nn.EmbeddingBag(len(cfg.vocabulary) + 1, cfg.text_dim, mode="mean", padding_idx=0)
        self.head = nn.Sequential(nn.Linear(c + cfg.text_dim, c), nn.SiLU(), nn.Linear(c, 1))

    def forward(self, pixels: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """``pixels`` float [B, 3, R, R] in [-1, 1], ``words`` long [B, max_words] (0 = padding) -> logits [B]."""
        return self.head(torch.cat([self.image(pixels), self.words(words)], dim=1)).squeeze(1)


def _word_ids(prompts: list[str], cfg: PreferenceConfig) -> torch.Tensor:
    index = {w: i + 1 for i, w in enumerate(cfg.vocabulary)}  # 0 is padding
    unknown = index[_UNKNOWN]
    rows = []
    for prompt in prompts:
        ids = [index.get(w, unknown) for w in prompt.lower().split()][: cfg.max_words]
        rows.append(ids + [0] * (cfg.max_words - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _pairs_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sdpo.data.loader import decode_image

    win, lose, captions = [], [], []
    for row in table.select(["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist():
        if row["label_0"] == 0.5:
            continue  # a tie says nothing to a Bradley-Terry model
        first, second = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        win.append(first if row["label_0"] == 1.0 else second)
        lose.append(second if row["label_0"] == 1.0 else first)
        captions.append(row["caption"])
    if not win:
        raise DataError("preference model: the table holds no strict (non-tie) pairs")
    return np.stack(win), np.stack(lose), captions


def load_train_pairs(source: str | Path | pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Winners, losers (uint8 [N, R, R, 3]) and captions from a shards folder, a parquet file or a table."""
    if isinstance(source, pa.Table):
        return _pairs_from_table(source)
    path = Path(source)
    if path.is_dir():
        from sdpo.data.loader import load_pairs_arrays

        pairs = load_pairs_arrays(path)
        if not pairs["caption"]:
            raise DataError(f"{path}: no pairs to train the preference model on")
        return pairs["win"], pairs["lose"], list(pairs["caption"])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _pairs_from_table(pq.read_table(path))
    raise DataError(f"{path}: expected an ingested shards folder, a parquet file or a pyarrow table")


def pairs_digest(win: np.ndarray, lose: np.ndarray, captions: list[str]) -> str:
    """sha256 of exactly what the model is trained on: shapes, pixels and captions, in order."""
    digest = hashlib.sha256()
    for array in (win, lose):
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    digest.update(json.dumps(captions).encode())
    return digest.hexdigest()


def train_preference_model(
    shards_or_table: str | Path | pa.Table, out_dir: str | Path, seed: int = 0, steps: int = 300,
    *, batch_size: int = 64, lr: float = 3e-3,
) -> Path:
    """Train the scorer on the train pairs with a Bradley-Terry loss; write ``config.json`` + ``model.safetensors``.

    Deterministic for a given source, seed and torch thread count (one generator drives init and batches).
    Returns ``out_dir``.
    """
    from sdpo.data.synthetic import VOCABULARY
    from sdpo.models._atomic import atomic_directory

    win, lose, captions = load_train_pairs(shards_or_table)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cfg = PreferenceConfig(vocabulary=[*VOCABULARY, _UNKNOWN], resolution=int(win.shape[1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PreferenceNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    win_px, lose_px, words = _pixels(win), _pixels(lose), _word_ids(captions, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(captions), (min(batch_size, len(captions)),), generator=gen)
        margin = model(win_px[idx], words[idx]) - model(lose_px[idx], words[idx])
        loss = -nn.functional.logsigmoid(margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        margin = torch.cat([model(win_px[i : i + 512], words[i : i + 512]) - model(lose_px[i : i + 512],
                                                                                   words[i : i + 512])
                            for i in range(0, len(captions), 512)])
    training = {
        "data_digest": pairs_digest(win, lose, captions),
        "pairs": len(captions),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": round(float(np.mean(losses[-20:])), 6),
        "train_accuracy": round(float((margin > 0).float().mean()), 6),
    }
    cfg = PreferenceConfig(**{**asdict(cfg), "training": training})
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        _save(model, cfg, tmp)
    return out_dir


def _save(model: PreferenceNet, cfg: PreferenceConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    (folder / CONFIG_NAME).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"data_digest": cfg.training["data_digest"],
                                                           "model_type": MODEL_TYPE})


class PreferenceReward:
    """The trained scorer as a :class:`~sdpo.eval.rewards.RewardModel`."""

    name = "preference"

    def __init__(self, model: PreferenceNet, cfg: PreferenceConfig, device: torch.device) -> None:
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, device

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return np.zeros(0)
        side = self.cfg.resolution
        arrays = np.stack([
            np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
                       if im.size != (side, side) else im.convert("RGB"), dtype=np.uint8)
            for im in images
        ])  # fmt: skip
        with torch.no_grad():
            logits = self.model(_pixels(arrays).to(self.device), _word_ids(list(prompts), self.cfg).to(self.device))
        return logits.double().cpu().numpy()


def read_preference_config(folder: Path) -> PreferenceConfig:
    """The saved config (with its training metadata); :class:`ModelError` if the folder is not a preference model."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        raise ModelError(f"{folder}: not a preference model folder ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelError(f"{path}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    return PreferenceConfig(**raw)


def load_preference(folder: Path, device: torch.device | str | None = None) -> PreferenceReward:
    """The preference reward from a folder written by :func:`train_preference_model`."""
    from safetensors.torch import load_file

    cfg = read_preference_config(folder)
    model = PreferenceNet(cfg)
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)))
    return PreferenceReward(model, cfg, torch.device(device or "cpu"))
