"""Embedded rewards that are not the labeller: prompt alignment (toy CLIP score), learned preference (toy PickScore)."""

import json

import numpy as np
import pytest
from PIL import Image

from sdpo.data.synthetic import COLOURS, SHAPES, make_pairs, prompts, render
from sdpo.errors import ModelError
from sdpo.eval.rewards import load_reward, needs_weights
from sdpo.eval.rewards.alignment import alignment_parts
from sdpo.eval.rewards.preference import load_train_pairs, pairs_digest, train_preference_model
from sdpo.eval.rewards.weights import folder_digest

ALL_PROMPTS = prompts("train") + prompts("heldout")


def _renders(quality: str, per_prompt: int = 3) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(7)
    pairs = [(render(p, quality, rng), p) for p in ALL_PROMPTS for _ in range(per_prompt)]
    return [im for im, _ in pairs], [p for _, p in pairs]


def _other(prompt: str, colour_step: int = 0, shape_step: int = 0) -> str:
    _, colour, shape = prompt.split()
    colours = list(COLOURS)
    return (f"a {colours[(colours.index(colour) + colour_step) % len(colours)]} "
            f"{SHAPES[(SHAPES.index(shape) + shape_step) % len(SHAPES)]}")


@pytest.mark.parametrize("quality", ["good", "bad"])
def test_alignment_recognises_the_colour_and_shape_of_ground_truth_renders(quality):
    images, texts = _renders(quality)
    parts = alignment_parts(images, texts)
    assert parts.colour_ok.all() and parts.shape_ok.all()  # offset and rough renders are still the right object
    assert parts.score.min() > (0.9 if quality == "good" else 0.7)


def test_alignment_scores_a_wrong_colour_or_shape_low():
    images, texts = _renders("good")
    right = alignment_parts(images, texts).score
    for step in (1, 2, 3):
        wrong_colour = alignment_parts(images, [_other(p, colour_step=step) for p in texts])
        assert not wrong_colour.colour_ok.any() and wrong_colour.shape_ok.all()
        assert (wrong_colour.score < right - 0.05).all(), wrong_colour.score  # blue vs cyan: the closest pair
        assert (right - wrong_colour.score).mean() > 0.1
        wrong_shape = alignment_parts(images, [_other(p, shape_step=step) for p in texts])
        assert not wrong_shape.shape_ok.any() and wrong_shape.colour_ok.all()
        assert (wrong_shape.score < right - 0.03).all(), wrong_shape.score  # square vs circle: the closest pair
        assert (right - wrong_shape.score).mean() > 0.1


def test_alignment_of_an_empty_image_is_zero_and_the_reward_is_registered():
    blank = np.full((16, 16, 3), 10, np.uint8)
    parts = alignment_parts([blank], ["a red square"])
    assert not parts.colour_ok[0] and not parts.shape_ok[0] and parts.score[0] == 0.0
    assert not needs_weights("alignment")
    images, texts = _renders("good", per_prompt=1)
    reward = load_reward("alignment")
    np.testing.assert_allclose(reward.score([Image.fromarray(im) for im in images], texts),
                               alignment_parts(images, texts).score)


@pytest.fixture(scope="module")
def preference_folder(tmp_path_factory):
    return train_preference_model(make_pairs(96, 0), tmp_path_factory.mktemp("pref") / "model", seed=0, steps=40)


def _scores(reward, images: np.ndarray, texts: list[str]) -> np.ndarray:
    return reward.score([Image.fromarray(im) for im in images], texts)


def test_preference_model_ranks_heldout_winners_above_losers(preference_folder):
    win, lose, texts = load_train_pairs(make_pairs(64, 5, split="heldout"))  # unseen prompts and renders
    reward = load_reward("preference", str(preference_folder))
    accuracy = float((_scores(reward, win, texts) > _scores(reward, lose, texts)).mean())
    assert accuracy > 0.75, accuracy  # chance is 0.5


def test_preference_folder_reloads_to_identical_scores_and_records_its_data(preference_folder):
    from safetensors import safe_open

    win, _, texts = load_train_pairs(make_pairs(16, 9))
    pinned = load_reward("preference", str(preference_folder), sha256=folder_digest(preference_folder))
    again = load_reward("preference", str(preference_folder))
    np.testing.assert_array_equal(_scores(pinned, win, texts), _scores(again, win, texts))
    config = json.loads((preference_folder / "config.json").read_text())
    expected = pairs_digest(*load_train_pairs(make_pairs(96, 0)))
    assert config["training"]["data_digest"] == expected
    assert config["training"]["pairs"] == 96 and config["training"]["steps"] == 40
    with safe_open(str(preference_folder / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["data_digest"] == expected


def test_preference_needs_weights_and_reads_shards_like_the_table(tmp_path):
    from sdpo.data.pickapic import ingest
    from sdpo.data.synthetic import write_parquet

    assert needs_weights("preference")
    with pytest.raises(ModelError, match="eval.reward_paths.preference"):
        load_reward("preference")
    table = make_pairs(8, 2)
    ingest(str(write_parquet(table, tmp_path / "train.parquet")), tmp_path / "shards", resolution=16)
    from_table, from_shards = load_train_pairs(table), load_train_pairs(tmp_path / "shards")
    assert pairs_digest(*from_table) == pairs_digest(*from_shards)
    with pytest.raises(ModelError, match="not a preference model"):
        load_reward("preference", str(tmp_path))
