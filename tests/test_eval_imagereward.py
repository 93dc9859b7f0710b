"""ImageReward offline: a tiny random checkpoint in the public ImageReward.pt layout, converted to transformers BLIP,
scores exactly what a plain-torch forward over the raw checkpoint tensors gives (tests/imagereward_support.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from imagereward_support import (
    IGNORED_KEYS,
    VOCAB,
    random_images,
    reference_pixels,
    reference_scores,
    reference_tokens,
    write_tiny_imagereward,
    write_vocab,
)

from sdpo.errors import ModelError
from sdpo.eval.rewards import RewardModel, load_reward
from sdpo.eval.rewards.weights import folder_digest

PROMPTS = ["a red circle", "blue square", "RED", "a big green triangle on the small square", "circle"]
# (width, height): square, portrait, landscape, and 37x50 whose odd crop margin torchvision rounds to nearest.
SIZES = [(32, 32), (40, 52), (50, 37), (37, 50), (64, 48)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("imagereward")
    return folder, write_tiny_imagereward(folder)


@pytest.fixture(scope="module")
def reward(tiny):
    return load_reward("imagereward", str(tiny[0]), device="cpu")


@pytest.fixture(scope="module")
def images() -> list:
    return random_images(SIZES)


def copy_without(source: Path, target: Path, *names: str) -> Path:
    """``source``'s files except ``names``, linked into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in names:
            (target / path.name).symlink_to(path)
    return target


def test_scores_equal_the_reference_forward(reward, tiny, images) -> None:
    _, state = tiny
    scores = reward.score(images, PROMPTS)
    assert isinstance(reward, RewardModel) and reward.name == "imagereward"
    assert scores.dtype == np.float64 and scores.shape == (len(PROMPTS),)
    np.testing.assert_allclose(scores, reference_scores(state, images, PROMPTS), rtol=1e-5, atol=1e-5)


def test_inputs_are_prepared_as_imagereward_does(reward, images) -> None:
    # Tokens: [CLS] first (ImageReward feeds the tokenizer's ids unchanged), padded to 35, lower-cased.
    tokens = reward.tokenize(PROMPTS)
    ids, mask = reference_tokens(PROMPTS)
    assert torch.equal(tokens["input_ids"], ids) and torch.equal(tokens["attention_mask"], mask)
    assert (tokens["input_ids"][:, 0] == VOCAB.index("[CLS]")).all()
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    # Pixels: torchvision Resize + CenterCrop semantics (the 37x50 image would be off by a row with transformers'
    # center crop) and CLIP normalisation.
    torch.testing.assert_close(reward.pixel_values(images), reference_pixels(images), rtol=0, atol=1e-6)


def test_scores_are_finite_and_depend_on_prompt_and_image(reward, images) -> None:
    same_image = reward.score([images[0]] * len(PROMPTS), PROMPTS)
    same_prompt = reward.score(images, [PROMPTS[0]] * len(images))
    for scores in (same_image, same_prompt):
        assert np.isfinite(scores).all()
        assert len(set(np.round(scores, 6))) == len(scores), scores


def test_batches_do_not_change_scores(reward, images) -> None:
    whole = reward.score(images, PROMPTS)
    reward.batch_size = 2
    try:
        np.testing.assert_allclose(reward.score(images, PROMPTS), whole, rtol=1e-6, atol=1e-6)
    finally:
        reward.batch_size = 32
    assert reward.score([], []).shape == (0,)


def test_reference_depends_on_every_checkpoint_tensor(tiny, images) -> None:
    """The equality test can only catch a wrong mapping if the reference uses each tensor where it belongs."""
    _, state = tiny
    base = reference_scores(state, images[:2], PROMPTS[:2])
    for key, value in state.items():
        # A key bias adds q.b to every score of a softmax row, which cancels: no model can depend on it.
        if key in IGNORED_KEYS or key.endswith("self.key.bias"):
            continue
        changed = dict(
            state, **{key: value + 0.5 * torch.randn(value.shape, generator=torch.Generator().manual_seed(1))}
        )
        assert not np.allclose(reference_scores(changed, images[:2], PROMPTS[:2]), base, atol=1e-6), key
    # The fused qkv order matters: swapping the q and k thirds changes the scores.
    qkv = "blip.visual_encoder.blocks.0.attn.qkv."
    swapped = dict(state)
    for kind in ("weight", "bias"):
        q, k, v = state[qkv + kind].chunk(3)
        swapped[qkv + kind] = torch.cat([k, q, v])
    assert not np.allclose(reference_scores(swapped, images[:2], PROMPTS[:2]), base, atol=1e-6)


def test_checkpoint_file_with_file_sha256_pin(tiny, images) -> None:
    folder, state = tiny
    checkpoint = folder / "ImageReward.pt"
    pin = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    reward = load_reward("imagereward", str(checkpoint), sha256=pin.upper(), device="cpu")
    np.testing.assert_allclose(
        reward.score(images[:1], PROMPTS[:1]), reference_scores(state, images[:1], PROMPTS[:1]), atol=1e-5
    )
    with pytest.raises(ModelError, match=r"ImageReward\.pt: sha256 mismatch for reward 'imagereward'.*reward_sha256"):
        load_reward("imagereward", str(checkpoint), sha256="0" * 64)


def test_folder_sha256_pin(tiny) -> None:
    folder, _ = tiny
    assert load_reward("imagereward", str(folder), sha256=folder_digest(folder), device="cpu").name == "imagereward"
    with pytest.raises(ModelError, match=rf"{folder.name}: sha256 mismatch.*the folder has {folder_digest(folder)}"):
        load_reward("imagereward", str(folder), sha256="f" * 64)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("ImageReward.pt", r"expected the ImageReward checkpoint ImageReward\.pt .*found none"),
        ("med_config.json", r"med_config\.json: missing"),
        ("vocab.txt", r"no BERT tokenizer \(vocab\.txt"),
    ],
)
def test_missing_files_are_named(tiny, tmp_path, missing, message) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", missing)
    with pytest.raises(ModelError, match=message):
        load_reward("imagereward", str(folder), device="cpu")


def test_tokenizer_in_a_subfolder(tiny, tmp_path, images) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", "vocab.txt")
    write_vocab(folder / "tokenizer")
    scores = load_reward("imagereward", str(folder), device="cpu").score(images[:2], PROMPTS[:2])
    np.testing.assert_allclose(scores, reference_scores(tiny[1], images[:2], PROMPTS[:2]), atol=1e-5)


def test_a_tokenizer_of_another_size_is_refused(tiny, tmp_path) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", "vocab.txt")
    write_vocab(folder, VOCAB[:-1])
    with pytest.raises(ModelError, match=r"tokenizer has 18 tokens.*vocab_size 19"):
        load_reward("imagereward", str(folder), device="cpu")


def test_a_med_config_that_disagrees_with_the_weights_is_refused(tiny, tmp_path) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", "med_config.json")
    med = json.loads((tiny[0] / "med_config.json").read_text())
    (folder / "med_config.json").write_text(json.dumps(dict(med, num_hidden_layers=1)))
    with pytest.raises(ModelError, match=r"ImageReward\.pt: text \(blip\.text_encoder\) weights do not match"):
        load_reward("imagereward", str(folder), device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"blip.itm_head.weight": torch.zeros(2, 4)}, r"1 keys have no transformers equivalent.*itm_head"),
        ({"mlp.layers.7.weight": None}, r"MLP head lacks \['layers\.7\.weight'\]"),
        ({"blip.text_encoder.encoder.layer.1.crossattention.self.key.bias": None}, r"missing \['encoder\.layer\.1"),
        ({"blip.visual_encoder.blocks.1.attn.qkv.weight": torch.zeros(3, 3)}, r"vision .*do not match"),
    ],
)
def test_foreign_or_incomplete_checkpoints_are_refused(tiny, tmp_path, edit, message) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", "ImageReward.pt")
    state = {k: v for k, v in (tiny[1] | edit).items() if v is not None}
    torch.save(state, folder / "ImageReward.pt")
    with pytest.raises(ModelError, match=message):
        load_reward("imagereward", str(folder), device="cpu")


class _NotATensor:
    """A pickled object: ``torch.load(weights_only=True)`` must refuse to rebuild it."""


def test_checkpoints_are_never_unpickled(tiny, tmp_path) -> None:
    folder = copy_without(tiny[0], tmp_path / "ir", "ImageReward.pt")
    torch.save({"payload": _NotATensor()}, folder / "ImageReward.pt")
    with pytest.raises(ModelError, match=r"ImageReward\.pt: cannot read the ImageReward checkpoint"):
        load_reward("imagereward", str(folder), device="cpu")


def test_safetensors_checkpoint(tiny, tmp_path, images) -> None:
    from safetensors.torch import save_file

    folder = copy_without(tiny[0], tmp_path / "ir", "ImageReward.pt")
    save_file({k: v.contiguous() for k, v in tiny[1].items()}, folder / "model.safetensors")
    scores = load_reward("imagereward", str(folder), device="cpu").score(images[:2], PROMPTS[:2])
    np.testing.assert_allclose(scores, reference_scores(tiny[1], images[:2], PROMPTS[:2]), atol=1e-5)
