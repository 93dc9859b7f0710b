"""Prompt alignment in the synthetic world: does the drawn object have the prompt's colour and shape?

The toy counterpart of CLIP score. It reads the prompt's ground truth (:func:`sdpo.data.synthetic.parse_prompt`)
and compares the image with it; it is not the judge that labelled the pairs (which ignores colour and shape).

- colour: the coverage-weighted mean colour of the object, classified to the nearest colour of the world;
  fidelity ``1 - error / sqrt(3)`` against the prompt's colour.
- shape: the object's coverage, moved so its centroid is on the image centre (position is the judge's business, not
  alignment's), against each shape's template; fidelity is the soft IoU with the prompt's shape, and the shape is
  classified to the template with the highest IoU.

The reward is the mean of the two fidelities, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdpo.data.synthetic import BACKGROUND, COLOURS, SHAPES, parse_prompt, shape_mask

_PEAK = 0.9  # typical brightest channel of an object colour; coverage saturates there
_ROW_QUANTILE = 0.25  # no shape covers three quarters of any row
_COLOUR_TABLE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Alignment:
    """Per-image alignment parts (arrays of one entry per image)."""

    colour: list[str]  # the nearest colour of the world ("" when nothing is drawn)
    shape: list[str]  # the best-matching shape ("" when nothing is drawn)
    colour_ok: np.ndarray  # bool: the drawn colour is the prompt's
    shape_ok: np.ndarray  # bool: the drawn shape is the prompt's
    colour_fidelity: np.ndarray  # float in [0, 1]
    shape_fidelity: np.ndarray  # float in [0, 1]: soft IoU with the prompt's shape

    @property
    def score(self) -> np.ndarray:
        """The combined reward: mean of colour and shape fidelity."""
        return 0.5 * (self.colour_fidelity + self.shape_fidelity)

    def rates(self) -> dict[str, float]:
        """The shares of images whose colour / shape / both are the prompt's, the mean reward, the image count."""
        return {"colour": float(self.colour_ok.mean()), "shape": float(self.shape_ok.mean()),
                "both": float((self.colour_ok & self.shape_ok).mean()), "alignment": float(self.score.mean()),
                "n": len(self.colour)}


def coverage(image: np.ndarray) -> np.ndarray:
    """Soft object coverage (HxW in [0, 1]) of a float HxWx3 image in [0, 1].

    The brightest channel above the background, where each row's background level is its lower quartile (at least
    :data:`~sdpo.data.synthetic.BACKGROUND`): rough renders brighten whole rows, which are not object.
    """
    bright = image.max(axis=-1)
    level = np.maximum(np.quantile(bright, _ROW_QUANTILE, axis=1, keepdims=True), BACKGROUND)
    return np.clip((bright - level) / (_PEAK - BACKGROUND), 0.0, 1.0)


def _centred(cover: np.ndarray) -> np.ndarray:
    """``cover`` translated by whole pixels so its centroid is nearest the image centre."""
    h, w = cover.shape
    total = cover.sum()
    cy = (cover.sum(axis=1) * np.arange(h)).sum() / total
    cx = (cover.sum(axis=0) * np.arange(w)).sum() / total
    dy, dx = round((h - 1) / 2 - cy), round((w - 1) / 2 - cx)
    out = np.zeros_like(cover)
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[dst_y, dst_x] = cover[src_y, src_x]
    return out


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def alignment_parts(images: list[np.ndarray], prompts: list[str]) -> Alignment:
    """Colour and shape alignment of RGB uint8 images (HxWx3, any square size) with their prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    colours, shapes, colour_fid, shape_fid = [], [], [], []
    for image, prompt in zip(images, prompts, strict=True):
        want_colour, want_shape = parse_prompt(prompt)
        x = np.asarray(image, dtype=np.float32) / 255.0
        cover = coverage(x)
        if cover.sum() < 1.0:  # less than one pixel's worth of object: nothing is drawn
            colours.append("")
            shapes.append("")
            colour_fid.append(0.0)
            shape_fid.append(0.0)
            continue
        mean = (cover[..., None] * x).sum(axis=(0, 1)) / cover.sum()
        colours.append(_COLOUR_NAMES[int(np.linalg.norm(_COLOUR_TABLE - mean, axis=1).argmin())])
        colour_fid.append(1.0 - float(np.linalg.norm(mean - np.asarray(COLOURS[want_colour]))) / np.sqrt(3.0))
        centred = _centred(cover)
        ious = {s: _soft_iou(centred, shape_mask(s, cover.shape[0])) for s in SHAPES}
        shapes.append(max(ious, key=ious.__getitem__))
        shape_fid.append(ious[want_shape])
    truth = [parse_prompt(p) for p in prompts]
    return Alignment(
        colour=colours,
        shape=shapes,
        colour_ok=np.array([c == t[0] for c, t in zip(colours, truth, strict=True)], dtype=bool),
        shape_ok=np.array([s == t[1] for s, t in zip(shapes, truth, strict=True)], dtype=bool),
        colour_fidelity=np.clip(np.asarray(colour_fid, dtype=np.float64), 0.0, 1.0),
        shape_fidelity=np.asarray(shape_fid, dtype=np.float64),
    )


class AlignmentReward:
    """Colour and shape fidelity of the drawn object against the prompt (no weights)."""

    name = "alignment"

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        return alignment_parts(arrays, list(prompts)).score
