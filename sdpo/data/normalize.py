"""Honest normalisation of ingested images and captions.

Images become 8-bit RGB that looks like what a viewer shows:

- the EXIF orientation is applied first (:func:`PIL.ImageOps.exif_transpose`), so a rotated JPEG is stored upright;
- 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I``, which Pillow uses for 16-bit sources) is
  scaled to 8 bit with ``round(v / 257)`` (65535 -> 255) instead of being clipped at 255;
- anything with transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key images with a ``tRNS`` chunk) is
  composited onto :data:`ALPHA_BACKGROUND`, white, the colour a browser or an image viewer shows a transparent
  picture on; dropping alpha would reveal whatever colour the hidden pixels happen to hold.

A caption must hold at least one visible character: captions made only of whitespace, control, format (zero-width
space, joiners, BOM...), private-use or unassigned code points, or of the few default-ignorable fillers that Unicode
files under letters and marks (Hangul fillers, variation selectors...), are refused.
"""

from __future__ import annotations

import unicodedata

import numpy as np
from PIL import Image, ImageOps

ALPHA_BACKGROUND = (255, 255, 255)  # white: transparent pixels are shown on it, as viewers and browsers do
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Unicode general categories that never draw a glyph: separators (spaces, line and paragraph separators), control,
# format (zero-width characters, joiners, BOM, bidi marks, tags), surrogates, private use and unassigned.
INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"})
# Default_Ignorable_Code_Point characters outside those categories (DerivedCoreProperties.txt), plus the braille
# blank, which renders as an empty cell and is a common "invisible" filler.
_INVISIBLE_EXTRA = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0]
    + list(range(0x180B, 0x1810))  # Mongolian free variation selectors and vowel separator
    + list(range(0xFE00, 0xFE10))  # variation selectors 1-16
    + list(range(0xE0100, 0xE01F0))  # variation selectors 17-256
)


def is_visible(char: str) -> bool:
    """Whether one character draws something (see :data:`INVISIBLE_CATEGORIES`)."""
    return ord(char) not in _INVISIBLE_EXTRA and unicodedata.category(char) not in INVISIBLE_CATEGORIES


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds at least one visible character."""
    return any(is_visible(char) for char in text)


def describe_code_points(text: str, limit: int = 8) -> str:
    """``"U+200B U+200C ..."`` for the first ``limit`` code points of ``text`` (for reject details)."""
    points = " ".join(f"U+{ord(char):04X}" for char in text[:limit])
    return points + (" ..." if len(text) > limit else "")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> ``L`` (or ``LA`` when a ``tRNS`` grey level marks transparent pixels)."""
    values = np.asarray(image).astype(np.int64)
    scaled = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257): exact for v8 * 257
    key = image.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([scaled, alpha], axis=-1), "LA")
    return Image.fromarray(scaled, "L")


def to_rgb8(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """An 8-bit RGB copy of a loaded ``image``: upright, 16-bit scaled, transparency composited on ``background``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
