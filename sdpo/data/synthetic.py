"""The embedded synthetic preference world: coloured shapes, good and bad renders, and the judge that ranks them.

It reproduces the paper's pathology at toy scale (docs/method.md, "The pathology, and what the toy world measures").

Prompts are ``"a {colour} {shape}"`` for 6 colours x 4 shapes = 24 prompts. The HELD-OUT split is the "diagonal"
``colour[i] x shape[i]`` for i = 0..3 (red square, green circle, blue triangle, yellow cross): 4 prompts, 1/6 of the
grid, never seen in the train split, while every colour and every shape still occurs in training.

A **good** render is the shape centred on the image (at most one pixel of jitter), clean, in the prompt's colour on a
dark background. A **bad** render of the same prompt is offset from the centre by 15-25 % of the image size and has
vertical roughness: every row gets its own brightness offset and a horizontal jitter of up to one pixel.

The **judge** (also the programmatic reward of evaluation, see :func:`judge_score`) prefers centred, smooth images:
``score = -centroid_distance - 10 * vertical_roughness - colour_weight * colour_error``.

Pairs are written as parquet in the exact Pick-a-Pic v2 schema. The images are **PNG** bytes stored in the
``jpg_0``/``jpg_1`` columns: PNG is lossless, and JPEG artifacts would swamp 16 px images.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sdpo.data.pickapic import PICKAPIC_V2_SCHEMA
from sdpo.errors import DataError

Split = Literal["train", "heldout"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.90, 0.85, 0.10),
    "magenta": (0.90, 0.10, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
BACKGROUND = 0.04  # dark grey, the same in every channel

_ALL_PROMPTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
_COLOUR_NAMES = list(COLOURS)
PROMPTS_HELDOUT: list[str] = [f"a {_COLOUR_NAMES[i]} {SHAPES[i]}" for i in range(len(SHAPES))]
PROMPTS_TRAIN: list[str] = [p for p in _ALL_PROMPTS if p not in PROMPTS_HELDOUT]
VOCABULARY: list[str] = ["a", *COLOURS, *SHAPES]

ROUGHNESS_WEIGHT = 10.0
_MASS_THRESHOLD = 0.3  # pixels whose brightest channel is below this are background for the judge
_SPLIT_CODES = {"train": 0, "heldout": 1}
_EPOCH_NS = np.datetime64("2023-01-01T00:00:00", "ns")


def prompts(split: Split = "train") -> list[str]:
    """The prompts of one split (``"train"`` or ``"heldout"``), in a fixed order."""
    if split == "train":
        return list(PROMPTS_TRAIN)
    if split == "heldout":
        return list(PROMPTS_HELDOUT)
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"a red circle"`` -> ``("red", "circle")``; :class:`DataError` if it is not a prompt of this world."""
    words = prompt.lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise DataError(
            f"prompt {prompt!r}: expected 'a <colour> <shape>' with colour in {_COLOUR_NAMES} and shape in {SHAPES}"
        )
    return colour, shape


# --- rendering ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def shape_mask(shape: str, resolution: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32, HxW) of ``shape``, its centre of mass on the image centre."""
    supersample = 8
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample - resolution / 2  # pixel units, 0 = image centre
    y, x = np.meshgrid(coords, coords, indexing="ij")
    half = 0.27 * resolution
    if shape == "square":
        inside = (np.abs(x) <= 0.85 * half) & (np.abs(y) <= 0.85 * half)
    elif shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "triangle":  # apex up; shifted so that its centroid (1/3 up from the base) is the centre
        yt = y + half / 3
        inside = (yt <= half) & (np.abs(x) <= (yt + half) / 2)
    elif shape == "cross":
        arm = 0.35 * half
        inside = ((np.abs(x) <= arm) & (np.abs(y) <= half)) | ((np.abs(y) <= arm) & (np.abs(x) <= half))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    coverage = inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))
    coverage = coverage.astype(np.float32)
    coverage.setflags(write=False)
    return coverage


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate the first two axes by whole pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def _compose(mask: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """Shape of ``colour`` over the dark background, float HxWx3 in [0, 1]."""
    rgb = np.asarray(colour, dtype=np.float32)
    return BACKGROUND + mask[:, :, None] * (rgb - BACKGROUND)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def render(prompt: str, quality: Literal["good", "bad"], rng: np.random.Generator, resolution: int = 16) -> np.ndarray:
    """Render ``prompt`` as a good (centred, clean) or bad (offset, rough) RGB uint8 image, HxWx3."""
    colour, shape = parse_prompt(prompt)
    mask = shape_mask(shape, resolution)
    if quality == "good":
        dy, dx = (rng.integers(-1, 2, size=2) * (rng.random(2) < 0.3)).tolist()
        return _to_uint8(_compose(_shift(mask, dy, dx), COLOURS[colour]))
    if quality != "bad":
        raise ValueError(f"quality must be 'good' or 'bad', got {quality!r}")
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(0.15, 0.25) * resolution
    dy, dx = round(radius * np.sin(angle)), round(radius * np.cos(angle))
    image = _compose(_shift(mask, dy, dx), COLOURS[colour])
    row_shift = rng.integers(-1, 2, size=resolution)  # each row rolled left, right or not at all
    columns = (np.arange(resolution)[None, :] - row_shift[:, None]) % resolution
    image = image[np.arange(resolution)[:, None], columns]
    image += rng.uniform(-0.15, 0.15, size=(resolution, 1, 1)).astype(np.float32)
    return _to_uint8(image)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 image."""
    buffer = BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# --- the judge ----------------------------------------------------------------------------------------------


def _as_unit_float(images: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) as float32 in [0, 1]: uint8 and float in [0, 255] (max > 2) are divided by 255."""
    images = np.asarray(images)
    if images.ndim == 3:  # grayscale batch N x H x W
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images N x H x W x 3 (or x 1), got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    peak = images.reshape(len(images), -1).max(axis=1) if images.size else np.zeros(0)
    scale = np.where(peak > 2.0, 1 / 255.0, 1.0).astype(np.float32)
    return np.clip(images * scale[:, None, None, None], 0.0, 1.0)


def judge_terms(images: np.ndarray, prompts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The judge's parts for a batch of images (N x H x W x 3, uint8 or float).

    - ``distance``: pixels from the image centre to the centroid of the bright mass, where a pixel's mass is
      ``max(0, brightest channel - 0.3)``; an image with no bright pixel gets the centre-to-corner distance.
    - ``roughness``: mean absolute difference between vertically adjacent pixels (all channels, values in [0, 1]).
    - ``colour_error`` (only with prompts): Euclidean distance in RGB [0, 1] between the mass-weighted mean colour and
      the prompt's colour (sqrt(3) when there is no bright mass).
    """
    x = _as_unit_float(images)
    n, h, w, _ = x.shape
    mass = np.maximum(x.max(axis=-1) - _MASS_THRESHOLD, 0.0)  # N x H x W
    total = mass.sum(axis=(1, 2))
    has_mass = total > 1e-6
    safe_total = np.where(has_mass, total, 1.0)
    cy = (mass * np.arange(h)[None, :, None]).sum(axis=(1, 2)) / safe_total
    cx = (mass * np.arange(w)[None, None, :]).sum(axis=(1, 2)) / safe_total
    distance = np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2)
    distance = np.where(has_mass, distance, np.hypot((h - 1) / 2, (w - 1) / 2))
    roughness = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) if h > 1 else np.zeros(n)
    terms = {"distance": distance.astype(np.float64), "roughness": roughness.astype(np.float64)}
    if prompts is not None:
        if len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts")
        target = np.array([COLOURS[parse_prompt(p)[0]] for p in prompts], dtype=np.float32)
        mean_colour = (mass[..., None] * x).sum(axis=(1, 2)) / safe_total[:, None]
        colour_error = np.linalg.norm(mean_colour - target, axis=1)
        terms["colour_error"] = np.where(has_mass, colour_error, np.sqrt(3.0)).astype(np.float64)
    return terms


def judge_scores(
    images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str], colour_weight: float = 0.0
) -> np.ndarray:
    """Judge scores (higher is better) of a batch: ``-distance - 10 * roughness - colour_weight * colour_error``.

    ``images`` is N x H x W x 3 (or a list of same-sized HxWx3 arrays), uint8 or float in [0, 1] or [0, 255].
    With the default ``colour_weight=0`` this is exactly the judge that labelled the pairs, and the prompts are only
    checked for count; a positive weight also penalises the wrong colour.
    """
    batch = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if len(batch) != len(prompts):
        raise ValueError(f"got {len(batch)} images but {len(prompts)} prompts")
    terms = judge_terms(batch, prompts if colour_weight else None)
    score = -terms["distance"] - ROUGHNESS_WEIGHT * terms["roughness"]
    if colour_weight:
        score = score - colour_weight * terms["colour_error"]
    return score


def judge_score(image: np.ndarray, prompt: str, colour_weight: float = 0.0) -> float:
    """Judge score of one HxWx3 image (uint8, or float in [0, 1] / [0, 255]); see :func:`judge_scores`."""
    return float(judge_scores(np.asarray(image)[None], [prompt], colour_weight)[0])


# --- pairs in the Pick-a-Pic v2 schema ----------------------------------------------------------------------


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def make_pairs(n: int, seed: int, split: Split = "train", resolution: int = 16, tie_fraction: float = 0.0) -> pa.Table:
    """``n`` preference pairs of ``split`` prompts as a Pick-a-Pic v2 table (PNG bytes in ``jpg_0``/``jpg_1``).

    Pair ``i`` draws from its own generator seeded by (seed, split, i), so output is deterministic. A strict pair is a
    good and a bad render of the same prompt, the winner (the one the judge scores higher) at a random position; a
    tie (a ``tie_fraction`` share of pairs, labels 0.5/0.5) is two renders of the same quality.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 <= tie_fraction <= 1.0:
        raise ValueError(f"tie_fraction must be in [0, 1], got {tie_fraction}")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    split_prompts = prompts(split)
    split_code = _SPLIT_CODES[split]
    columns: dict[str, list] = {name: [] for name in PICKAPIC_V2_SCHEMA.names}
    for i in range(n):
        rng = np.random.default_rng([seed, split_code, i])
        prompt = split_prompts[i % len(split_prompts)]
        is_tie = rng.random() < tie_fraction
        if is_tie:
            quality = "good" if rng.random() < 0.5 else "bad"
            qualities = [quality, quality]
        else:
            qualities = ["good", "bad"] if rng.random() < 0.5 else ["bad", "good"]
        images = [render(prompt, q, rng, resolution) for q in qualities]
        if is_tie:
            label_0 = 0.5
        else:
            scores = judge_scores(np.stack(images), [prompt, prompt])
            label_0 = 1.0 if scores[0] > scores[1] else 0.0
        uids = [str(uuid.UUID(bytes=_digest(seed, split, i, k)[:16], version=4)) for k in (0, 1)]
        pngs = [encode_png(im) for im in images]
        columns["are_different"].append(pngs[0] != pngs[1])
        columns["best_image_uid"].append("" if is_tie else uids[0 if label_0 == 1.0 else 1])
        columns["caption"].append(prompt)
        columns["created_at"].append(_EPOCH_NS + np.timedelta64(i, "s"))
        columns["has_label"].append(True)
        for k in (0, 1):
            columns[f"image_{k}_uid"].append(uids[k])
            columns[f"image_{k}_url"].append(f"https://synthetic.invalid/{split}/{uids[k]}.png")
            columns[f"jpg_{k}"].append(pngs[k])
            columns[f"model_{k}"].append(f"synthetic-{qualities[k]}")
        columns["label_0"].append(label_0)
        columns["label_1"].append(1.0 - label_0)
        columns["ranking_id"].append(int.from_bytes(_digest(seed, split, i, "ranking")[:8], "big") >> 1)
        columns["user_id"].append(int(rng.integers(1, 10_000)))
    per_prompt = Counter(columns["caption"])
    columns["num_example_per_prompt"] = [per_prompt[c] for c in columns["caption"]]
    columns["created_at"] = np.array(columns["created_at"], dtype="datetime64[ns]")
    return pa.Table.from_pydict(columns, schema=PICKAPIC_V2_SCHEMA)


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically (a temporary sibling, then ``os.replace``); same table -> same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
