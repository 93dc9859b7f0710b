"""params.yaml schema: every error path names the key and what is allowed."""

import re
from pathlib import Path

import pytest

from sdpo.config import ConfigError, load_config, parse_yaml, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.input is None  # embedded default: the synthetic world
    assert set(cfg.train.variants) >= {"dpo", "dpo-sdpo"}


def test_defaults_describe_the_embedded_run():
    cfg = load_config(None)
    assert cfg.model.base is None and cfg.model.family == "sd15"
    assert cfg.train.for_variant("dpo").safeguard == "off"
    assert cfg.train.for_variant("dpo-sdpo").safeguard == "pair"


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("train.mu=1.5", "train.mu", "less than or equal to 1"),
        ("train.mu=-0.1", "train.mu", "greater than or equal to 0"),
        ("train.beta=0", "train.beta", "greater than 0"),
        ("train.method=ppo", "train.method", "'sft', 'dpo', 'dspo' or 'dmpo'"),
        ("train.safeguard=always", "train.safeguard", "'off', 'pair' or 'batch'"),
        ("model.family=sd9", "model.family", "'sd15', 'sd2', 'sdxl' or 'sd3'"),
        ("train.steps=many", "train.steps", "valid integer"),
        ("train.bogus=1", "train.bogus", "unknown key"),
        ("bogus.x=1", "bogus", "unknown key"),
        ("train.variants.x.mu=2", "train.variants.x.mu", "less than or equal to 1"),
    ],
)
def test_errors_name_the_key_and_allowed_values(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"{key}:" in message and hint in message


def test_a_toy_latent_size_that_does_not_fit_the_resolution_fails_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.resolution=24", "model.toy.latent_downsample=4"])
    message = str(err.value)
    assert "model.toy.latent_downsample: 4" in message and "data.resolution is 24" in message
    assert load_config(None, ["data.resolution=24", "model.toy.latent_downsample=2"]).data.resolution == 24
    # a real base has its own VAE: the toy setting does not apply
    assert load_config(None, ["data.resolution=24", "model.toy.latent_downsample=4", "model.base=/models/sd15"])


def test_unknown_key_lists_known_keys_of_its_section():
    with pytest.raises(ConfigError, match=r"known keys: .*train\.mu") as err:
        load_config(None, ["train.mue=0.5"])
    assert "data.root" not in str(err.value)


def test_floats_in_dvc_exponent_form_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 2e-05\n  mu: 5e-1\n")
    cfg = load_config(path)
    assert cfg.train.lr == 2e-05 and isinstance(cfg.train.lr, float) and cfg.train.mu == 0.5
    assert parse_yaml("x: 1e3")["x"] == 1000.0


def test_dotted_overrides_apply_in_order(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  mu: 0.9\n")
    cfg = load_config(path, ["train.mu=0.5", "train.lr=2e-5", "eval.rewards=[synthetic, pickscore]",
                              "eval.reward_paths.pickscore=/models/pickscore", "registry.primary_reward=pickscore"])
    assert cfg.train.mu == 0.5 and cfg.train.lr == 2e-5 and cfg.eval.rewards == ["synthetic", "pickscore"]


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.mu"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  mu: 0.9\n")
    with pytest.raises(ConfigError, match=r"train\.mu: Input should be a valid number"):
        load_config(path, ["train.mu.x=1"])


def test_variant_names_and_lookup():
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        load_config(None).train.for_variant("nope")
    with pytest.raises(ConfigError, match="must be letters"):
        validate_config({"train": {"variants": {"a/b": {}}}})


def test_empty_sections_take_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\ntrain:\n")
    assert load_config(path).train.mu == 0.9


def test_unquoted_yaml_off_means_off(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  safeguard: off\n  mixed_precision: no\n  variants:\n    a:\n      safeguard: off\n"
                    "registry:\n  candidate: a\n")
    cfg = load_config(path)
    assert cfg.train.safeguard == "off" and cfg.train.mixed_precision == "no"
    assert cfg.train.for_variant("a").safeguard == "off"


# --- one place for defaults ---------------------------------------------------------------------------------

DICT_KEYS = ("train.variants", "eval.reward_paths", "eval.reward_sha256", "eval.prompt_sets", "registry.guards")


def _leaves(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in DICT_KEYS:
            keys |= _leaves(value, name + ".")
        else:
            keys.add(name)
    return keys


def test_params_file_spells_out_the_schema_defaults():
    """params.yaml lists every key of the schema with the schema's value, and nothing else."""
    from sdpo.config import Config, read_params, schema_keys

    raw = read_params(ROOT / "params.yaml")
    assert _leaves(raw) == set(schema_keys())
    assert validate_config(raw, "params.yaml") == Config()


def test_every_schema_key_is_read_somewhere():
    """A key that no code reads is a setting that silently does nothing (model.revision once was one)."""
    from sdpo.config import schema_keys

    sources = "\n".join(p.read_text() for p in (ROOT / "sdpo").rglob("*.py") if p.name != "config.py")
    unread = []
    for key in schema_keys():
        *section, field = key.split(".")
        patterns = [rf"\.{field}\b", rf"['\"]{field}['\"]"]
        if not any(re.search(p, sources) for p in patterns):
            unread.append(key)
    assert unread == []


# --- checked before any work --------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("registry.candidate=nope", "registry.candidate: 'nope' is not a variant"),
    ("registry.primary_reward=pickscore", "registry.primary_reward: 'pickscore' is not one of eval.rewards"),
    ("eval.rewards=[synthetic, nosuch]", "unknown reward(s) ['nosuch']"),
    ("eval.rewards=[synthetic, pickscore]", "eval.reward_paths: no weights for ['pickscore']"),
    ("registry.guards={heldout_winer: 0.1}", "registry.guards: unknown guard 'heldout_winer'"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.beta=.nan", "train.beta: Input should be a finite number"),
])
def test_settings_that_cannot_work_together_fail_up_front(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", [override])
    assert message in str(err.value) and "params.yaml" in str(err.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  mu: 0.5\n  lr: [1e-5\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train\.mu=\[': value '\[' is not valid YAML"):
        load_config(None, ["train.mu=["])


def test_an_override_every_variant_shadows_is_refused():
    cfg = load_config(None, ["train.mu=0.5"])  # dpo-sdpo inherits mu: the override applies
    assert cfg.train.for_variant("dpo-sdpo").mu == 0.5
    with pytest.raises(ConfigError, match=r"changes nothing.*train\.variants\.dpo-sdpo\.mu"):
        load_config(None, ["train.variants.dpo-sdpo.mu=0.9", "train.mu=0.5"])
    with pytest.raises(ConfigError, match="changes nothing"):
        load_config(None, ["train.safeguard=batch"])  # both variants set their own safeguard


def test_the_embedded_preference_reward_is_trained_only_for_the_synthetic_world():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.trains_reward("preference") and not cfg.trains_reward("alignment")
    given = load_config(ROOT / "params.yaml", ["eval.reward_paths={preference: /weights/pref}"])
    assert not given.trains_reward("preference")
    with pytest.raises(ConfigError, match=r"no weights for \['preference'\].*only for the synthetic world"):
        load_config(ROOT / "params.yaml", ["data.input=/data/pickapic.parquet"])


def test_an_empty_mapping_override_empties_it_and_a_dotted_one_merges():
    cfg = load_config(ROOT / "params.yaml", ["eval.prompt_sets={}"])
    assert cfg.eval.prompt_sets == {}
    cfg = load_config(ROOT / "params.yaml", ["eval.prompt_sets.unseen.prompts=heldout"])
    assert set(cfg.eval.prompt_sets) == {"train", "unseen"}
    assert cfg.eval.for_prompt_set("unseen").seed == cfg.eval.seed  # a set's seed defaults to eval.seed
    assert cfg.eval.for_prompt_set("train").prompt_sets == {}
    with pytest.raises(ConfigError, match="prompt set 'a b'"):
        load_config(ROOT / "params.yaml", ["eval.prompt_sets={a b: {prompts: train}}"])
