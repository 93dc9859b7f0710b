"""Reward adapters on tiny random CLIP models built offline: scores match a direct computation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_eval_support import build_tiny_clip, clip_cosines, random_images, to_open_clip_layout

from sdpo.config import ConfigError
from sdpo.errors import ModelError
from sdpo.eval.rewards import RewardModel, load_reward, reward_names
from sdpo.eval.rewards.weights import copy_remote, folder_digest

PROMPTS = ["a red circle", "blue square", "red", "a blue triangle on red"]



@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("clip")
    model = build_tiny_clip(folder, logit_scale=2.5)
    return folder, model


@pytest.fixture(scope="module")
def images() -> list:
    return random_images(len(PROMPTS))


def test_registry_names() -> None:
    assert reward_names() == ["aesthetic", "alignment", "clip", "hpsv2", "imagereward", "pickscore", "preference",
                              "synthetic"]


def test_pickscore_is_scaled_cosine(tiny_clip, images) -> None:
    folder, model = tiny_clip
    reward = load_reward("pickscore", str(folder), device="cpu")
    assert isinstance(reward, RewardModel) and reward.name == "pickscore"
    scores = reward.score(images, PROMPTS)
    expected = np.exp(2.5) * clip_cosines(model, folder, images, PROMPTS).numpy()
    assert scores.shape == (4,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    # prompts matter: a different prompt gives a different score for the same image
    assert reward.score(images[:1], ["blue"])[0] != pytest.approx(scores[0])


def test_pickscore_processor_in_a_subfolder(tiny_clip, images, tmp_path) -> None:
    folder, model = tiny_clip
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "processor").mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / "processor" / name).symlink_to(folder / name)
    scores = load_reward("pickscore", str(tmp_path), device="cpu").score(images, PROMPTS)
    expected = np.exp(2.5) * clip_cosines(model, folder, images, PROMPTS).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_pickscore_batches_do_not_change_scores(tiny_clip, images) -> None:
    folder, _ = tiny_clip
    reward = load_reward("pickscore", f"file://{folder}", device="cpu")
    whole = reward.score(images, PROMPTS)
    reward.embedder.batch_size = 1
    np.testing.assert_allclose(reward.score(images, PROMPTS), whole, rtol=1e-5, atol=1e-6)


def test_clip_score_is_clamped_100_cosine(tiny_clip, images) -> None:
    folder, model = tiny_clip
    scores = load_reward("clip", str(folder), device="cpu").score(images, PROMPTS)
    cosines = clip_cosines(model, folder, images, PROMPTS).numpy()
    np.testing.assert_allclose(scores, np.maximum(100 * cosines, 0), rtol=1e-5, atol=1e-4)
    assert (scores >= 0).all()


def _aesthetic_head(in_dim: int) -> torch.nn.Module:
    """The public predictor's MLP, written out independently of the adapter."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(in_dim, 1024),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(1024, 128),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1),
            )

    torch.manual_seed(3)
    return Head().eval()


@pytest.mark.parametrize("head_format", ["pth", "safetensors"])
def test_aesthetic_is_head_on_normalised_image_embedding(tiny_clip, images, tmp_path, head_format) -> None:
    folder, model = tiny_clip
    (tmp_path / "clip").symlink_to(folder, target_is_directory=True)
    head = _aesthetic_head(model.config.projection_dim)
    if head_format == "pth":
        torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    else:
        save_file(head.state_dict(), tmp_path / "head.safetensors")
    scores = load_reward("aesthetic", str(tmp_path), device="cpu").score(images, PROMPTS)
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=pixels).pooler_output
        expected = head.layers(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_aesthetic_refuses_a_foreign_head(tiny_clip, tmp_path) -> None:
    folder, _ = tiny_clip
    (tmp_path / "clip").symlink_to(folder, target_is_directory=True)
    torch.save({"fc.weight": torch.zeros(1, 8)}, tmp_path / "head.pth")
    with pytest.raises(ModelError, match=r"head\.pth: not a LAION aesthetic head"):
        load_reward("aesthetic", str(tmp_path), device="cpu")


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("hps")
    model = build_tiny_clip(folder, seed=1, hidden_act="gelu")  # open_clip ViT-H-14 uses exact GELU
    (folder / "model.safetensors").unlink()  # only the open_clip checkpoint and the config stay
    torch.save({"epoch": 1, "state_dict": to_open_clip_layout(model)}, folder / "HPS_v2_compressed.pt")
    return folder, model


def test_hpsv2_converts_open_clip_weights(hps_folder, images) -> None:
    folder, model = hps_folder
    scores = load_reward("hpsv2", str(folder), device="cpu").score(images, PROMPTS)
    expected = 100 * clip_cosines(model, folder, images, PROMPTS).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)


def test_hpsv2_checkpoint_file_with_file_sha256_pin(hps_folder, images) -> None:
    folder, _ = hps_folder
    checkpoint = folder / "HPS_v2_compressed.pt"
    pin = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    reward = load_reward("hpsv2", str(checkpoint), sha256=pin.upper(), device="cpu")
    assert reward.score(images[:1], PROMPTS[:1]).shape == (1,)
    with pytest.raises(ModelError, match="sha256 mismatch") as err:
        load_reward("hpsv2", str(checkpoint), sha256="0" * 64)
    assert str(checkpoint) in str(err.value) and pin in str(err.value) and "0" * 64 in str(err.value)


def test_hpsv2_refuses_unknown_keys(hps_folder, tmp_path) -> None:
    folder, model = hps_folder
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    state = to_open_clip_layout(model)
    state["visual.attn_pool.query"] = torch.zeros(2)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"other\.pt: .*visual\.attn_pool\.query"):
        load_reward("hpsv2", str(tmp_path))


def test_folder_sha256_pin_accepted_and_refused(tiny_clip) -> None:
    folder, _ = tiny_clip
    digest = folder_digest(folder)
    assert load_reward("clip", str(folder), sha256=digest, device="cpu").name == "clip"
    with pytest.raises(ModelError, match="eval.reward_sha256.clip") as err:
        load_reward("clip", str(folder), sha256="ab" * 32)
    assert digest in str(err.value) and str(folder) in str(err.value)


def test_folder_digest_tracks_content(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    first = folder_digest(tmp_path)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("ignored")
    (tmp_path / "notes.md").write_text("not a model file")
    assert folder_digest(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert folder_digest(tmp_path) != first


def test_missing_weights_name_the_config_key(tmp_path) -> None:
    for name in ("pickscore", "clip", "aesthetic", "hpsv2", "imagereward"):
        with pytest.raises(ModelError, match=rf"eval\.reward_paths\.{name}"):
            load_reward(name)
    with pytest.raises(ModelError, match=r"eval\.reward_paths\.clip: .*nowhere does not exist"):
        load_reward("clip", str(tmp_path / "nowhere"))


def test_clip_folder_without_tokenizer_is_refused(tiny_clip, tmp_path) -> None:
    folder, _ = tiny_clip
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).symlink_to(folder / name)
    with pytest.raises(ModelError, match="no CLIP tokenizer files"):
        load_reward("pickscore", str(tmp_path), device="cpu")


def test_unknown_reward_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="unknown reward 'nope'.*pickscore"):
        load_reward("nope")


def test_copy_remote_through_pyarrow_filesystem(tiny_clip, tmp_path) -> None:
    folder, _ = tiny_clip
    copied = copy_remote(f"file://{folder}", tmp_path / "cache")
    assert copied.is_dir() and folder_digest(copied) == folder_digest(folder)
    assert copy_remote(f"file://{folder}", tmp_path / "cache") == copied  # cached: copied once
    with pytest.raises(ModelError, match="not found"):
        copy_remote(f"file://{tmp_path}/absent", tmp_path / "cache")


def test_synthetic_reward_is_the_world_judge() -> None:
    from sdpo.data.synthetic import judge_scores

    images = random_images(3, size=(16, 16), seed=5)
    prompts = ["a red circle", "a blue square", "a red square"]
    scores = load_reward("synthetic").score(images, prompts)
    np.testing.assert_allclose(scores, judge_scores(np.stack([np.asarray(i) for i in images]), prompts))
