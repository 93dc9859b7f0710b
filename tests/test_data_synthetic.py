"""The synthetic preference world: prompts, renders, judge, and pairs in the Pick-a-Pic v2 schema."""

import hashlib
import io
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdpo.cli import main
from sdpo.data import synthetic
from sdpo.data.pickapic import PICKAPIC_V2_SCHEMA
from sdpo.data.synthetic import (
    PROMPTS_HELDOUT,
    PROMPTS_TRAIN,
    VOCABULARY,
    judge_score,
    judge_scores,
    make_pairs,
    prompts,
    render,
    write_parquet,
)
from sdpo.errors import DataError

# Column names and Arrow types of Pick-a-Pic v2 (design/pickapic_v2_schema.json), in its column order.
PICKAPIC_COLUMNS = {
    "are_different": "bool",
    "best_image_uid": "string",
    "caption": "string",
    "created_at": "timestamp[ns]",
    "has_label": "bool",
    "image_0_uid": "string",
    "image_0_url": "string",
    "image_1_uid": "string",
    "image_1_url": "string",
    "jpg_0": "binary",
    "jpg_1": "binary",
    "label_0": "double",
    "label_1": "double",
    "model_0": "string",
    "model_1": "string",
    "ranking_id": "int64",
    "user_id": "int64",
    "num_example_per_prompt": "int64",
}


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_prompt_splits_are_disjoint_and_cover_every_word():
    assert len(PROMPTS_HELDOUT) == 4 and len(PROMPTS_TRAIN) == 20
    assert not set(PROMPTS_HELDOUT) & set(PROMPTS_TRAIN)
    assert prompts("train") == PROMPTS_TRAIN and prompts("heldout") == PROMPTS_HELDOUT
    words = {w for p in PROMPTS_TRAIN + PROMPTS_HELDOUT for w in p.split()}
    assert words == set(VOCABULARY)
    # every colour and every shape of the held-out prompts is still seen in training (only the combination is new)
    train_words = {w for p in PROMPTS_TRAIN for w in p.split()}
    assert words == train_words
    with pytest.raises(ValueError, match="split"):
        prompts("test")


def test_good_render_is_centred_and_clean_bad_is_offset_and_rough():
    rng = np.random.default_rng(0)
    for prompt in PROMPTS_TRAIN[:8]:
        good, bad = render(prompt, "good", rng), render(prompt, "bad", rng)
        assert good.shape == bad.shape == (16, 16, 3) and good.dtype == np.uint8
        terms = synthetic.judge_terms(np.stack([good, bad]))
        assert terms["distance"][0] <= 1.5 and terms["distance"][1] >= 2.0
        assert terms["roughness"][1] > terms["roughness"][0]
        # both clearly in the prompt's colour
        colour = np.array(synthetic.COLOURS[synthetic.parse_prompt(prompt)[0]])
        for image in (good, bad):
            bright = image.max(axis=-1) > 150
            mean = image[bright].mean(axis=0) / 255
            assert np.linalg.norm(mean - colour) < 0.2


def test_render_other_resolution():
    image = render("a cyan cross", "good", np.random.default_rng(1), resolution=32)
    assert image.shape == (32, 32, 3)


def test_judge_accepts_any_image_scale_and_degenerate_images():
    rng = np.random.default_rng(3)
    image = render("a red circle", "good", rng)
    as_uint8 = judge_score(image, "a red circle")
    assert judge_score(image.astype(np.float32) / 255, "a red circle") == pytest.approx(as_uint8, abs=1e-5)
    assert judge_score(image.astype(np.float64), "a red circle") == pytest.approx(as_uint8, abs=1e-5)
    assert -1.5 < as_uint8 < 0
    black = np.zeros((16, 16, 3), np.uint8)
    assert judge_score(black, "a red circle") == pytest.approx(-np.hypot(7.5, 7.5))
    noise = rng.random((16, 16, 3))
    assert np.isfinite(judge_score(noise, "a red circle"))
    # the colour-fidelity term penalises the wrong colour only when asked for
    assert judge_score(image, "a green circle") == as_uint8
    assert judge_score(image, "a green circle", colour_weight=1.0) < judge_score(
        image, "a red circle", colour_weight=1.0
    )
    with pytest.raises(DataError, match="purple"):
        judge_score(image, "a purple circle", colour_weight=1.0)


def test_judge_matches_the_documented_formula():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = image / 255.0
    mass = np.maximum(x.max(-1) - 0.3, 0)
    ys, xs = np.mgrid[:16, :16]
    cy, cx = (mass * ys).sum() / mass.sum(), (mass * xs).sum() / mass.sum()
    expected = -np.hypot(cy - 7.5, cx - 7.5) - 10 * np.abs(np.diff(x, axis=0)).mean()
    assert judge_score(image, "a red square") == pytest.approx(expected, rel=1e-5)
    batch = judge_scores([image, image[::-1]], ["a red square"] * 2)
    assert batch.shape == (2,) and batch[0] == pytest.approx(expected, rel=1e-5)


def test_pairs_have_the_exact_pickapic_schema_and_consistent_fields():
    table = make_pairs(300, seed=7, tie_fraction=0.2)
    assert {f.name: str(f.type) for f in table.schema} == PICKAPIC_COLUMNS
    assert table.schema.names == list(PICKAPIC_COLUMNS)
    assert table.schema.equals(PICKAPIC_V2_SCHEMA)
    rows = table.to_pylist()
    assert len({r["ranking_id"] for r in rows}) == 300
    ties = [r for r in rows if r["label_0"] == 0.5]
    assert 30 < len(ties) < 90
    for r in rows:
        assert r["caption"] in PROMPTS_TRAIN
        assert r["label_1"] == 1 - r["label_0"] and r["has_label"]
        assert r["are_different"] == (r["jpg_0"] != r["jpg_1"])
        images = [_decode(r["jpg_0"]), _decode(r["jpg_1"])]
        assert r["jpg_0"].startswith(b"\x89PNG")
        if r["label_0"] == 0.5:
            assert r["best_image_uid"] == "" and r["model_0"] == r["model_1"]
            continue
        assert r["are_different"]
        winner = 0 if r["label_0"] == 1.0 else 1
        assert r["best_image_uid"] == r[f"image_{winner}_uid"]
        assert r[f"model_{winner}"] == "synthetic-good" and r[f"model_{1 - winner}"] == "synthetic-bad"
        scores = judge_scores(np.stack(images), [r["caption"]] * 2)
        assert scores[winner] > scores[1 - winner]
    winners_first = sum(r["label_0"] == 1.0 for r in rows if r["label_0"] != 0.5)
    assert 0.3 < winners_first / (len(rows) - len(ties)) < 0.7  # the winner's position is random
    counts = {}
    for r in rows:
        counts[r["caption"]] = counts.get(r["caption"], 0) + 1
    assert all(r["num_example_per_prompt"] == counts[r["caption"]] for r in rows)


def test_heldout_split_uses_only_heldout_prompts():
    table = make_pairs(40, seed=0, split="heldout")
    assert set(table.column("caption").to_pylist()) == set(PROMPTS_HELDOUT)
    train_ids = set(make_pairs(40, seed=0).column("ranking_id").to_pylist())
    assert not train_ids & set(table.column("ranking_id").to_pylist())


def test_same_arguments_give_the_same_bytes(tmp_path):
    a = write_parquet(make_pairs(64, seed=11, tie_fraction=0.1), tmp_path / "a.parquet")
    b = write_parquet(make_pairs(64, seed=11, tie_fraction=0.1), tmp_path / "sub" / "b.parquet")
    c = write_parquet(make_pairs(64, seed=12, tie_fraction=0.1), tmp_path / "c.parquet")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "c.parquet", "sub"]  # no temp file left
    assert pq.read_table(a).equals(make_pairs(64, seed=11, tie_fraction=0.1))


def test_generation_is_fast():
    start = time.perf_counter()
    make_pairs(1000, seed=0)
    # thousands of pairs per second on one core; a loose bound so a busy machine does not fail it
    assert time.perf_counter() - start < 5.0


def test_invalid_arguments_are_refused():
    for kwargs in ({"n": 0, "seed": 0}, {"n": 5, "seed": -1}, {"n": 5, "seed": 0, "tie_fraction": 1.5}):
        with pytest.raises(ValueError):
            make_pairs(**kwargs)


def test_cli_synth_writes_parquet_and_documents_png(tmp_path, capsys):
    root = tmp_path / "root"
    args = ["synth", "--split", "heldout", "--set", f"data.root={root}", "--set", "data.synthetic.heldout_pairs=24",
            "--set", "data.synthetic.seed=3"]
    assert main(args) == 0
    assert "wrote 24 heldout pairs" in capsys.readouterr().out
    out = root / "raw" / "heldout.parquet"
    table = pq.read_table(out)
    assert table.num_rows == 24 and set(table.column("caption").to_pylist()) <= set(PROMPTS_HELDOUT)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert main(args) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert main(["synth", "--set", f"data.root={root}", "--set", "data.synthetic.train_pairs=0"]) == 2
    assert "data.synthetic.train_pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "PNG" in help_text and "data.synthetic" in help_text and "Pick-a-Pic" in help_text
