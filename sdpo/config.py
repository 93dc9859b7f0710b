"""One typed schema for ``params.yaml``.

Every entry point (CLI, Metaflow ``Config``, DVC stages) loads parameters through :func:`load_config`,
so a typo, a wrong type or an out-of-range value fails in the same way everywhere, naming the key.
Overrides use dotted keys (``train.mu=0.5``), as ``dvc exp run -S`` does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdpo.errors import SdpoError

Method = Literal["sft", "dpo", "dspo", "dmpo"]
SafeguardMode = Literal["off", "pair", "batch"]
Family = Literal["sd15", "sd2", "sdxl", "sd3"]


class ConfigError(SdpoError, ValueError):
    """A parameter file or override is invalid; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """The embedded synthetic preference world (used when ``data.input`` is empty)."""

    train_pairs: int = Field(2048, ge=1)
    heldout_pairs: int = Field(256, ge=1)
    seed: int = 0
    tie_fraction: float = Field(0.0, ge=0.0, le=1.0)


class DataConfig(_Section):
    input: str | None = None  # parquet file, glob, folder or s3:// URI; None -> synthetic world
    heldout_input: str | None = None
    root: str = "data"  # where shards and derived data go (local folder or s3://)
    resolution: int = Field(16, ge=8)
    min_image_size: int = Field(8, ge=1)
    shard_max_pairs: int = Field(1000, ge=1)
    workers: int = Field(1, ge=1)
    keep_ties: bool = False
    image_format: Literal["png", "jpg"] = "png"
    synthetic: SyntheticConfig = SyntheticConfig()


class ToyBaseConfig(_Section):
    """How ``sdpo pretrain`` builds the toy base model (only used when ``model.base`` is empty)."""

    vae_steps: int = Field(200, ge=0)
    unet_steps: int = Field(400, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    cache_dir: str = ".cache/toy-base"


class LoraConfig(_Section):
    enabled: bool = False
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class ModelConfig(_Section):
    family: Family = "sd15"
    base: str | None = None  # local diffusers folder or hub id; None -> toy base
    revision: str | None = None
    toy: ToyBaseConfig = ToyBaseConfig()
    lora: LoraConfig = LoraConfig()


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` / ``no`` as False: accept it for the "off"/"no" choices."""
    return "off" if value is False else value


class VariantConfig(_Section):
    """One training arm of an experiment; unset fields inherit from ``train``."""

    method: Method | None = None
    safeguard: SafeguardMode | None = None
    mu: float | None = Field(None, ge=0.0, le=1.0)
    beta: float | None = Field(None, gt=0)

    _off = field_validator("safeguard", mode="before")(_yaml_off)


class TrainConfig(_Section):
    method: Method = "dpo"
    safeguard: SafeguardMode = "pair"
    mu: float = Field(0.9, ge=0.0, le=1.0)
    beta: float = Field(5000.0, gt=0)
    alpha: float = Field(0.01, gt=0, lt=1)  # DMPO target q = 1 - alpha
    max_lambda: float = Field(1.0, ge=0)
    dspo_variant: Literal["sd15", "sdxl"] = "sd15"
    dspo_threshold: float = Field(0.1, ge=0)
    variants: dict[str, VariantConfig] = {
        "dpo": VariantConfig(method="dpo", safeguard="off"),
        "dpo-sdpo": VariantConfig(method="dpo", safeguard="pair"),
    }
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    scale_lr: bool = False  # multiply lr by the effective batch, as the reference recipe does
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    prompt_dropout: float = Field(0.0, ge=0, le=1)
    random_flip: bool = False
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    log_every: int = Field(10, ge=1)
    heldout_every: int = Field(50, ge=0)  # held-out winner/loser deltas; 0 disables
    heldout_pairs: int = Field(64, ge=1)
    dataloader_workers: int = Field(0, ge=0)

    _off = field_validator("safeguard", mode="before")(_yaml_off)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_precision(cls, value: Any) -> Any:
        return "no" if value is False else value

    @model_validator(mode="after")
    def _variants_named(self) -> TrainConfig:
        for name in self.variants:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(
                    f"train.variants: name {name!r} must be letters, digits, '-' or '_' (it becomes a folder name)"
                )
        return self

    def for_variant(self, name: str) -> TrainConfig:
        """This section with the fields of variant ``name`` applied."""
        if name not in self.variants:
            raise ConfigError(f"train.variants: unknown variant {name!r}; defined: {sorted(self.variants)}")
        overrides = self.variants[name].model_dump(exclude_none=True)
        return self.model_copy(update=overrides)


class EvalConfig(_Section):
    prompts: str = "heldout"  # "heldout" (synthetic held-out prompts) or a text file, one prompt a line
    seeds_per_prompt: int = Field(4, ge=1)
    seed: int = 1234
    scheduler: Literal["ddim", "euler", "default"] = "ddim"
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=0)  # diffusers convention: 1.0 = no classifier-free guidance
    batch_size: int = Field(32, ge=1)
    rewards: list[str] = ["synthetic"]
    reward_paths: dict[str, str] = {}  # reward name -> local folder or URI of its weights
    reward_sha256: dict[str, str] = {}
    bootstrap_samples: int = Field(1000, ge=10)
    heldout_pairs: int = Field(64, ge=1)


class RegistryConfig(_Section):
    experiment: str = "sdpo"
    model_name: str = "sdpo-toy"
    primary_reward: str = "synthetic"
    min_win_rate_lower: float = Field(0.5, ge=0, le=1)
    # guard metric -> largest allowed regression (candidate worse than champion by more than this blocks promotion)
    guards: dict[str, float] = {"heldout_winner_delta": 0.002}
    candidate: str = "dpo-sdpo"  # which variant the flow registers and tries to promote


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value


# --- YAML: read floats the YAML 1.2 way ("2e-05" is a float, as dvc writes it) -----------------------------


class _Yaml12Loader(yaml.SafeLoader):
    pass


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML with YAML 1.2 float rules."""
    return yaml.load(text, Loader=_Yaml12Loader)


# --- loading and overrides ----------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw parameter dict (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.mu=0.5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in key {key!r}")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value) if value.strip() else None
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in msg:
            msg = f"{msg} (allowed: {ctx['expected']})"
        lines.append(f"  {key}: {msg}; got {e.get('input')!r}")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def validate_config(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a raw parameter dict; raise :class:`ConfigError` naming each bad key."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        message = _format_error(err, source)
        unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            sections = {str(loc[0]) for loc in unknown if len(loc) > 1}
            known = [k for k in _known_keys(Config) if not sections or k.split(".")[0] in sections]
            message += "\n  known keys: " + ", ".join(known)
        raise ConfigError(message) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) with dotted overrides applied."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        raw = parse_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return validate_config(raw, source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, JSON-serialisable view of a config (for manifests and MLflow params)."""
    return cfg.model_dump(mode="json")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
