"""Ingestion normalises odd images honestly (orientation, transparency, 16 bit) and refuses invisible captions."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdpo.data.normalize import ALPHA_BACKGROUND, has_visible_text, to_rgb8
from sdpo.data.pickapic import PICKAPIC_V2_SCHEMA, SKIP_REASONS, ingest
from sdpo.data.synthetic import make_pairs

SIDE = 16
RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), ALPHA_BACKGROUND


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _ingest(tmp_path: Path, images: list[bytes], captions: list[str] | None = None, **kw) -> tuple[dict, dict]:
    """Ingest one row per image (jpg_0 wins); returns the manifest and ``{row: (win pixels, caption)}``."""
    n = len(images)
    rows = make_pairs(n, seed=3).to_pydict()
    rows["jpg_0"] = images
    rows["label_0"], rows["label_1"] = [1.0] * n, [0.0] * n
    if captions is not None:
        rows["caption"] = captions
    source = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pydict(rows, schema=PICKAPIC_V2_SCHEMA), source)
    manifest = ingest(str(source), tmp_path / "shards", resolution=SIDE, **kw)
    stored: dict[int, dict[str, bytes]] = {}
    for shard in sorted((tmp_path / "shards").glob("pairs-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                stored.setdefault(int(key.split("_")[1]), {})[field] = tar.extractfile(member).read()
    decoded = {
        row: (np.asarray(Image.open(io.BytesIO(f["win.png"])).convert("RGB")).astype(int), f["txt"].decode())
        for row, f in stored.items()
    }
    return manifest, decoded


def _close(pixels: np.ndarray, colour, tolerance: int = 2) -> bool:
    return bool(np.abs(pixels.reshape(-1, 3) - np.asarray(colour)).max() <= tolerance)


# --- EXIF orientation -----------------------------------------------------------------------------------------


def _asymmetric() -> np.ndarray:
    """32x32: left half red, right half blue, a green band across the top: every rotation and mirror differs."""
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[:, :16], picture[:, 16:], picture[:8] = RED, BLUE, GREEN
    return picture


ORIENTATIONS = {  # EXIF orientation -> how the stored picture must be turned to be seen upright
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),
}


def _halve(picture: np.ndarray) -> np.ndarray:
    return picture.reshape(SIDE, 2, SIDE, 2, 3).mean(axis=(1, 3))


def test_exif_rotated_jpegs_are_stored_upright(tmp_path):
    stored_layout = _asymmetric()
    jpegs = []
    for orientation in ORIENTATIONS:
        exif = Image.Exif()
        exif[0x0112] = orientation
        jpegs.append(_encode(Image.fromarray(stored_layout), "JPEG", exif=exif.tobytes(), quality=95))
    _, decoded = _ingest(tmp_path, jpegs)
    for row, (orientation, turn) in enumerate(ORIENTATIONS.items()):
        pixels = decoded[row][0]
        upright = _halve(turn(stored_layout).astype(float))
        assert np.abs(pixels - upright).mean() < 12, orientation  # JPEG and resampling leave a small error
        assert np.abs(pixels - _halve(stored_layout.astype(float))).mean() > 40  # not the sideways original


# --- transparency -----------------------------------------------------------------------------------------------


def test_transparent_pixels_are_composited_on_white_not_revealed(tmp_path):
    # palette PNG whose transparent entry hides green: left half transparent, right half red
    palette = Image.new("P", (SIDE, SIDE), 0)
    palette.putpalette([*GREEN, *RED])
    palette.paste(1, (SIDE // 2, 0, SIDE, SIDE))
    with_trns = _encode(palette, "PNG", transparency=0)
    assert Image.open(io.BytesIO(with_trns)).info["transparency"] == 0
    # RGBA: hidden blue under alpha 0 on top, half-transparent red below
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)
    rgba[: SIDE // 2] = (*BLUE, 0)
    rgba[SIDE // 2 :] = (*RED, 128)
    # LA: hidden black under alpha 0 on the left, opaque grey on the right
    la = np.zeros((SIDE, SIDE, 2), np.uint8)
    la[:, SIDE // 2 :] = (90, 255)
    # RGB colour key (tRNS with one RGB value)
    keyed = Image.new("RGB", (SIDE, SIDE), BLUE)
    keyed.paste(RED, (0, 0, SIDE // 2, SIDE))
    images = [with_trns, _encode(Image.fromarray(rgba, "RGBA"), "PNG"), _encode(Image.fromarray(la, "LA"), "PNG"),
              _encode(keyed, "PNG", transparency=BLUE)]
    _, decoded = _ingest(tmp_path, images)
    half = SIDE // 2
    pal, rgba_out, la_out, keyed_out = (decoded[row][0] for row in range(4))
    assert _close(pal[:, :half], WHITE) and _close(pal[:, half:], RED)
    blended = [round(c * 128 / 255 + w * 127 / 255) for c, w in zip(RED, WHITE, strict=True)]
    assert _close(rgba_out[:half], WHITE) and _close(rgba_out[half:], blended)
    assert _close(la_out[:, :half], WHITE) and _close(la_out[:, half:], (90, 90, 90))
    assert _close(keyed_out[:, :half], RED) and _close(keyed_out[:, half:], WHITE)


def test_to_rgb8_takes_the_background_it_is_given():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb8(rgba, background=(0, 0, 0))).max() == 0
    assert np.asarray(to_rgb8(rgba)).min() == 255


# --- 16-bit images --------------------------------------------------------------------------------------------

QUADRANTS_16 = (0, 10 * 257, 32768, 65535)  # 8-bit values 0, 10, 128, 255 once scaled


def _quadrants(values, dtype) -> np.ndarray:
    half = SIDE // 2
    a = np.zeros((SIDE, SIDE), dtype)
    a[:half, :half], a[:half, half:], a[half:, :half], a[half:, half:] = values
    return a


def _png_16bit_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    grey = _quadrants(QUADRANTS_16, np.uint16)
    png16 = _encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    tiff16b = _encode(Image.frombytes("I;16B", (SIDE, SIDE), grey.astype(">u2").tobytes()), "TIFF")
    assert Image.open(io.BytesIO(tiff16b)).mode == "I;16B"
    tiff32 = _encode(Image.fromarray(grey.astype(np.int32), "I"), "TIFF")
    assert Image.open(io.BytesIO(tiff32)).mode == "I"
    rgb16 = np.stack([grey, grey[::-1], np.full_like(grey, 257 * 7)], axis=-1)
    keyed16 = _encode(Image.fromarray(grey), "PNG", transparency=10 * 257)  # a tRNS grey level on a 16-bit image
    _, decoded = _ingest(tmp_path, [png16, tiff16b, tiff32, _png_16bit_rgb(rgb16), keyed16])
    expected = _quadrants((0, 10, 128, 255), np.uint8).astype(int)
    for row in range(3):
        pixels = decoded[row][0]
        assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1)), row
    rgb = decoded[3][0]
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected[::-1])
    assert (rgb[..., 2] == 7).all()
    keyed = decoded[4][0]
    assert _close(keyed[: SIDE // 2, SIDE // 2 :], WHITE, 0) and keyed[0, 0, 0] == 0 and keyed[-1, -1, 0] == 255


# --- captions -------------------------------------------------------------------------------------------------

INVISIBLE = ["\u200b", "\u200b\u200c\u200d\ufeff", " \u2060 ", "\u3164", "\u2800\u2800", "\u00ad", "\x00\x07",
             "\U000e0041\U000e007f", "\ufe0f", "\ue000"]
VISIBLE = ["\u200bcat", "猫", "🐱", "a\u0301", "\u3164x"]


def test_captions_without_a_visible_character_are_rejected_with_their_own_reason(tmp_path):
    assert "invisible_caption" in SKIP_REASONS
    captions = INVISIBLE + VISIBLE
    png = _encode(Image.new("RGB", (SIDE, SIDE), RED), "PNG")
    manifest, decoded = _ingest(tmp_path, [png] * len(captions), captions)
    assert manifest["skipped"]["invisible_caption"] == len(INVISIBLE)
    assert manifest["pairs_written"] == len(VISIBLE)
    assert sorted(decoded) == list(range(len(INVISIBLE), len(captions)))
    assert [decoded[row][1] for row in sorted(decoded)] == [c.strip() for c in VISIBLE]
    rejects = [json.loads(line) for line in (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == list(range(len(INVISIBLE)))
    assert {r["reason"] for r in rejects} == {"invisible_caption"}
    assert "U+200B" in rejects[0]["detail"] and "U+3164" in rejects[3]["detail"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_invisible_text_has_no_visible_character(text):
    assert not has_visible_text(text)


@pytest.mark.parametrize("text", VISIBLE)
def test_visible_text_is_visible(text):
    assert has_visible_text(text)


def test_a_whitespace_caption_is_still_empty_not_invisible(tmp_path):
    png = _encode(Image.new("RGB", (SIDE, SIDE), RED), "PNG")
    manifest, _ = _ingest(tmp_path, [png, png], [" \t ", "a red square"])
    assert manifest["skipped"]["empty_caption"] == 1 and manifest["skipped"]["invisible_caption"] == 0
