"""One typed schema for ``params.yaml``.

Every entry point (CLI, Metaflow ``Config``, DVC stages) loads parameters through :func:`load_config` (or
:func:`resolve_config` for text already read), so a typo, a wrong type, a non-finite number, an out-of-range value or
two settings that contradict each other fail in the same way everywhere, before any work, naming the file and key.
This schema is the only place a default lives: ``params.yaml`` spells out the same values (a test keeps them equal).
Overrides use dotted keys (``train.mu=0.5``), as ``dvc exp run -S`` does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdpo.errors import SdpoError

Method = Literal["sft", "dpo", "dspo", "dmpo"]
SafeguardMode = Literal["off", "pair", "batch"]
Family = Literal["sd15", "sd2", "sdxl", "sd3"]
# every schedule of diffusers.optimization.SchedulerType (a test keeps the two lists equal)
LrSchedule = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "piecewise_constant"]
WARMUP_IGNORED = ("constant", "piecewise_constant")  # diffusers' schedules that take no warmup
DSPO_VARIANT_OF_FAMILY = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "sd3": "sd15"}


class ConfigError(SdpoError, ValueError):
    """A parameter file or override is invalid; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    # Conditioning: what each knob does to the colour and shape rates, and at what cost, is measured in
    # docs/results.md ("Does the toy base follow its prompts?"). The defaults (all off) are the base the method's
    # results were measured on, which ignores its prompts; experiments/colour-following.yaml turns on the recipe
    # whose colour follows the prompt at the same cost (on it the safeguard's held-out pattern does not hold).
    pooled_text: bool = False  # UNet also gets the attention-pooled prompt in its time embedding
    full_resolution_attention: bool = False  # cross-attention at 16x16 as well as 8x8
    # VAE downsampling (1, 2 or 4). 2 gives 8x8 latents at 16 px: a UNet step 4x cheaper and `make run` 3x faster,
    # but the method's held-out pattern held on 1 of 3 worlds (1: 3 of 3), so the default stays 1 (docs/results.md,
    # "A cheaper toy base: 8x8 latents"). The recipes in experiments/ pin it to the value they were measured on.
    latent_downsample: Literal[1, 2, 4] = 1
    train_text_encoder: bool = False  # the text encoder learns with the UNet (else it stays random and frozen)
    prompt_dropout: float = Field(0.0, ge=0.0, le=1.0)  # share of UNet samples with the empty prompt (CFG training)
    high_noise_weight: float = Field(0.0, ge=0.0)  # cap of the 1/SNR loss weight at high noise (<= 1: plain eps MSE)
    # Offset / pyramid noise: at 16x16 the SD1.5 schedule's terminal SNR leaves the object's colour and layout
    # readable in x_T, so a base learns them from the noise instead of the prompt (Lin et al. 2023 on SD itself).
    noise_offset: float = Field(0.0, ge=0.0)  # std of a per-channel constant added to the training noise
    multires_noise: float = Field(0.0, ge=0.0, lt=1.0)  # discount of the pyramid noise's coarser scales (0: off)
    seed: int = 0
    cache_dir: str | None = None  # None: ROOT/cache/toy-base (a local folder or URI elsewhere shares one cache)


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
    # auto: the model family's (SDXL: the SDXL branch; SD1.5/SD2 and SD3: the SD1.5 formula); a mismatch is an error
    dspo_variant: Literal["auto", "sd15", "sdxl"] = "auto"
    dspo_threshold: float = Field(0.1, ge=0)
    # the arms an experiment trains side by side; unset fields inherit from this section
    variants: dict[str, VariantConfig] = {
        "dpo": VariantConfig(safeguard="off"),
        "dpo-sdpo": VariantConfig(safeguard="pair"),
    }
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    scale_lr: bool = False  # multiply lr by the effective batch, as the reference recipe does
    lr_schedule: LrSchedule = "constant"  # the reference recipe: constant_with_warmup, 500 warmup steps
    warmup_steps: int = Field(0, ge=0)
    lr_step_rules: str | None = None  # piecewise_constant only, e.g. "1:100,0.1:200,0.01" (optimizer steps)
    lr_num_cycles: int = Field(1, ge=1)  # cosine_with_restarts
    lr_power: float = Field(1.0, gt=0)  # polynomial
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = False  # TF32 matmuls and convolutions on Ampere+ GPUs (the reference recipe turns it on)
    gradient_checkpointing: bool = False
    prompt_dropout: float = Field(0.0, ge=0, le=1)
    random_flip: bool = False
    # batch-mode safeguard: one lambda per micro-batch of this process (the reference code), or pooled over all
    safeguard_reduce: Literal["process", "global"] = "process"
    # frozen reference copy's weights (bf16 halves its memory; its errors are still computed in fp32)
    reference_dtype: Literal["float32", "bfloat16"] = "float32"
    # latent cache (`sdpo encode`): VAE posteriors and text embeddings computed once, beside the shards
    cache: bool = True
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_flips: bool = True  # with random_flip: cache both orientations (off: half the size, training unflipped)
    cache_batch_size: int = Field(16, ge=1)  # images/prompts per forward of the encode stage
    # with the cache: the reference's per-pair errors for every (pair, epoch) draw, computed once by `sdpo encode`
    # (DPO, DMPO, SFT; not DSPO); training then runs no reference model
    precompute_reference: bool = False
    reference_epochs: int = Field(0, ge=0)  # epochs of draws to precompute; 0: what one process needs for train.steps
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=0)  # the newest N complete checkpoints are kept; 0 keeps every one
    log_every: int = Field(10, ge=1)
    heldout_every: int = Field(50, ge=0)  # held-out winner/loser deltas; 0 disables
    heldout_pairs: int = Field(64, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    # accelerate config file (DDP/FSDP/DeepSpeed, e.g. infra/docker/accelerate/fsdp.yaml); null: with several GPUs
    # on the machine, one DDP process per GPU, else training runs in process
    accelerate_config: str | None = None

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

    @model_validator(mode="after")
    def _schedule_uses_its_settings(self) -> TrainConfig:
        """A warmup or step rule that the chosen learning-rate schedule would silently ignore is refused."""
        if self.warmup_steps and self.lr_schedule in WARMUP_IGNORED:
            hint = "constant_with_warmup" if self.lr_schedule == "constant" else "a schedule with warmup"
            raise ValueError(f"train.warmup_steps={self.warmup_steps}: diffusers' {self.lr_schedule!r} schedule "
                             f"has no warmup and would ignore it; use train.lr_schedule={hint} (the reference "
                             "recipe) or train.warmup_steps=0")
        if self.lr_schedule == "piecewise_constant" and not self.lr_step_rules:
            raise ValueError("train.lr_schedule=piecewise_constant needs train.lr_step_rules (e.g. '1:100,0.1')")
        if self.lr_step_rules and self.lr_schedule != "piecewise_constant":
            raise ValueError(f"train.lr_step_rules is only used by lr_schedule=piecewise_constant, not "
                             f"{self.lr_schedule!r}; remove it")
        return self

    def for_variant(self, name: str) -> TrainConfig:
        """This section with the fields of variant ``name`` applied."""
        if name not in self.variants:
            raise ConfigError(f"train.variants: unknown variant {name!r}; defined: {sorted(self.variants)}")
        overrides = self.variants[name].model_dump(exclude_none=True)
        return self.model_copy(update=overrides)


class PreferenceModelConfig(_Section):
    """The embedded learned reward ``preference`` (toy PickScore), trained on the train pairs by the rewards stage."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class PromptSetConfig(_Section):
    """A further prompt set, evaluated beside ``eval.prompts`` with the same sampler and rewards."""

    prompts: str  # "train" / "heldout" (the synthetic world's sets) or a text file, one prompt a line
    seeds_per_prompt: int = Field(4, ge=1)
    seed: int | None = None  # default: eval.seed


class EvalConfig(_Section):
    # the headline set: promotion, the held-out deltas' companion rewards and DVC's metrics read it
    prompts: str = "heldout"  # "heldout" (synthetic held-out prompts) or a text file, one prompt a line
    seeds_per_prompt: int = Field(16, ge=1)
    seed: int = 1234
    scheduler: Literal["ddim", "euler", "default"] = "ddim"
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=0)  # diffusers convention: 1.0 = no classifier-free guidance
    batch_size: int = Field(32, ge=1)
    # the judge (synthetic) labelled the data; alignment and preference did not (see params.yaml)
    rewards: list[str] = ["preference", "alignment", "synthetic"]
    reward_paths: dict[str, str] = {}  # reward name -> local folder or URI of its weights
    reward_sha256: dict[str, str] = {}
    bootstrap_samples: int = Field(1000, ge=10)
    heldout_pairs: int = Field(64, ge=1)
    preference_model: PreferenceModelConfig = PreferenceModelConfig()
    # further prompt sets by name (e.g. unseen seeds of the train prompts), each reported beside the headline set
    prompt_sets: dict[str, PromptSetConfig] = {"train": PromptSetConfig(prompts="train", seeds_per_prompt=4)}

    @field_validator("prompt_sets")
    @classmethod
    def _set_names(cls, value: dict[str, PromptSetConfig]) -> dict[str, PromptSetConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"prompt set {name!r}: use letters, digits, '-' or '_' (it becomes a folder name)")
        return value

    def for_prompt_set(self, name: str) -> EvalConfig:
        """This section as the evaluation of prompt set ``name`` (its prompts and seeds; no further sets)."""
        if name not in self.prompt_sets:
            raise ConfigError(f"eval.prompt_sets: unknown prompt set {name!r}; defined: {sorted(self.prompt_sets)}")
        chosen = self.prompt_sets[name]
        return self.model_copy(update={"prompts": chosen.prompts, "seeds_per_prompt": chosen.seeds_per_prompt,
                                       "seed": self.seed if chosen.seed is None else chosen.seed,
                                       "prompt_sets": {}})


class RegistryConfig(_Section):
    experiment: str = "sdpo"
    model_name: str = "sdpo-toy"
    primary_reward: str = "preference"
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

    def trains_reward(self, name: str) -> bool:
        """Whether the pipeline trains reward ``name`` itself (the rewards stage): the embedded preference model
        of the synthetic world, when no weights are configured for it."""
        return name == "preference" and name not in self.eval.reward_paths and not self.data.input

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """Settings that only make sense together: checked now, not after training and generation."""
        from sdpo.eval.rewards import REWARDS, needs_weights
        from sdpo.tracking.policy import guard_value

        problems: list[str] = []
        rewards = self.eval.rewards
        unknown = [name for name in rewards if name not in REWARDS]
        if unknown:
            problems.append(f"eval.rewards: unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
        if not rewards:
            problems.append("eval.rewards: at least one reward is needed")
        for section in ("reward_paths", "reward_sha256"):
            stray = sorted(set(getattr(self.eval, section)) - set(REWARDS))
            if stray:
                problems.append(f"eval.{section}: unknown reward(s) {stray}; known: {sorted(REWARDS)}")
        missing = [name for name in rewards if name in REWARDS and needs_weights(name)
                   and name not in self.eval.reward_paths and not self.trains_reward(name)]
        if missing:
            problems.append(f"eval.reward_paths: no weights for {missing} (set eval.reward_paths.<name> to a folder "
                            "or URI; nothing is downloaded; the pipeline trains the embedded 'preference' reward "
                            "only for the synthetic world, data.input empty)")
        if self.registry.primary_reward not in rewards:
            problems.append(f"registry.primary_reward: {self.registry.primary_reward!r} is not one of eval.rewards "
                            f"{rewards}")
        if self.registry.candidate not in self.train.variants:
            problems.append(f"registry.candidate: {self.registry.candidate!r} is not a variant of train.variants "
                            f"{sorted(self.train.variants)}")
        for guard in self.registry.guards:
            try:
                guard_value({}, guard)
            except ValueError as err:
                problems.append(f"registry.guards: {err}")
        problems += _training_problems(self)
        down = self.model.toy.latent_downsample
        if self.model.base is None and self.data.resolution % toy_resolution_multiple(down):
            problems.append(f"model.toy.latent_downsample: {down} needs data.resolution to be a multiple of "
                            f"{toy_resolution_multiple(down)} (latents whose side is a multiple of "
                            f"{TOY_LATENT_MULTIPLE}); data.resolution is {self.data.resolution}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def resolved_dspo_variant(setting: str, family: str) -> Literal["sd15", "sdxl"]:
    """The DSPO branch for ``train.dspo_variant`` on ``model.family`` ("auto" follows the family)."""
    return DSPO_VARIANT_OF_FAMILY[family] if setting == "auto" else setting  # type: ignore[return-value]


# The toy base's latents (image side / latent_downsample) need a side that is a multiple of this (what the toy UNet
# is built and tested for); sdpo.models.tiny and the config check share the rule.
TOY_LATENT_MULTIPLE = 4


def toy_resolution_multiple(latent_downsample: int) -> int:
    """What the toy base's image side must be a multiple of when its VAE downsamples by ``latent_downsample``."""
    return TOY_LATENT_MULTIPLE * latent_downsample


def _training_problems(cfg: Config) -> list[str]:
    """Training settings that contradict the model family or each other (one message each)."""
    t, family = cfg.train, cfg.model.family
    problems: list[str] = []
    natural = DSPO_VARIANT_OF_FAMILY[family]
    if t.dspo_variant != "auto" and family in ("sd15", "sd2", "sdxl") and t.dspo_variant != natural:
        problems.append(f"train.dspo_variant: {t.dspo_variant!r} is the wrong DSPO branch for model.family "
                        f"{family!r} (its own is {natural!r}; at SDXL's beta the other branch's loss is badly "
                        "wrong); use 'auto'")
    if t.precompute_reference and not t.cache:
        problems.append("train.precompute_reference: needs train.cache=true (the reference errors are stored in the "
                        "latent cache that `sdpo encode` writes)")
    if t.precompute_reference:
        arms = {name: t.for_variant(name).method for name in t.variants} or {"train": t.method}
        dspo = sorted(name for name, method in arms.items() if method == "dspo")
        if dspo:
            problems.append(f"train.precompute_reference: arm(s) {dspo} use DSPO, whose loss needs the reference's "
                            "prediction, not only its errors; train them with train.precompute_reference=false")
    return problems


# --- YAML: YAML 1.2 (``2e-05`` is a float, as dvc writes it), errors with file and line ---------------------


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML 1.2 (ruamel.yaml); :class:`ConfigError` naming ``source``, line and column on a syntax error."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None


# --- loading and overrides ----------------------------------------------------------------------------------


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.mu=0.5")
    key, value = item.split("=", 1)
    if not all(key.strip().split(".")):
        raise ConfigError(f"override {item!r}: empty part in key {key!r}")
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML, as OmegaConf dotlists are) to a raw dict.

    Mappings merge (``train.variants.dpo.mu=0.5`` keeps the other variants); ``key={}`` empties one.
    """
    if not overrides:
        return raw
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.create(raw)
    for item in overrides:
        key, value = _split_override(item)
        try:
            update = OmegaConf.from_dotlist([f"{key}={value}"])
            if OmegaConf.select(update, key) == {}:  # `key={}` empties a mapping; a merge would keep its entries
                OmegaConf.update(merged, key, {}, merge=False)
            else:
                merged = OmegaConf.merge(merged, update)
        except Exception as err:  # PyYAML (value) and OmegaConf (key) errors alike
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            if not isinstance(err, OmegaConfBaseException):
                detail = f"value {value!r} is not valid YAML ({detail})"
            raise ConfigError(f"override {item!r}: {detail}") from None
    return OmegaConf.to_container(merged)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        ctx = e.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in msg:
            msg = f"{msg} (allowed: {ctx['expected']})"
        if e["type"] == "value_error" and not e["loc"]:
            lines.extend(f"  {part}" for part in msg.split("\n"))
            continue
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


def schema_keys() -> list[str]:
    """Every leaf key of the schema, dotted (``train.mu``, ``eval.rewards``...)."""
    return _known_keys(Config)


def validate_config(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a raw parameter dict; raise :class:`ConfigError` naming ``source`` and each bad key."""
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


# Training keys that only matter in some setups: a --set of one of them that no variant uses changes nothing.
_RELEVANT_WHEN: dict[str, Any] = {
    "mu": lambda t: t.safeguard != "off",
    "max_lambda": lambda t: t.safeguard != "off",
    "safeguard": lambda t: t.method != "sft",
    "beta": lambda t: t.method != "sft",
    "alpha": lambda t: t.method == "dmpo",
    "dspo_variant": lambda t: t.method == "dspo",
    "dspo_threshold": lambda t: t.method == "dspo",
}


def _check_shadowed(cfg: Config, overrides: list[str], source: str) -> None:
    """Refuse ``--set train.<key>=...`` when every variant sets its own value (the override would do nothing)."""
    per_variant = set(VariantConfig.model_fields)
    for item in overrides:
        key, _ = _split_override(item)
        parts = key.split(".")
        if len(parts) != 2 or parts[0] != "train" or parts[1] not in per_variant or not cfg.train.variants:
            continue
        field = parts[1]
        relevant = _RELEVANT_WHEN.get(field, lambda t: True)
        used_by = [name for name, v in cfg.train.variants.items()
                   if getattr(v, field) is None and relevant(cfg.train.for_variant(name))]
        if not used_by:
            own = {name: getattr(v, field) for name, v in cfg.train.variants.items() if getattr(v, field) is not None}
            hint = " ".join(f"train.variants.{name}.{field}=..." for name in sorted(own)) or "a variant that uses it"
            raise ConfigError(
                f"{source}: override {item!r} changes nothing: "
                + (f"every variant that uses train.{field} sets its own ({own}); " if own else
                   f"no variant uses train.{field}; ")
                + f"set it per variant instead, e.g. --set {hint.split()[0]}"
            )


def resolve_config(raw: dict[str, Any] | None, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    """Apply dotted overrides to a raw parameter dict, validate, and refuse overrides that would do nothing."""
    raw = apply_overrides(dict(raw or {}), overrides)
    where = source + (" with --set " + " ".join(overrides) if overrides else "")
    cfg = validate_config(raw, where)
    _check_shadowed(cfg, overrides or [], where)
    return cfg


def read_params(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a parameter file (YAML 1.2); :class:`ConfigError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or the schema's defaults when ``path`` is None) with dotted overrides applied."""
    # the defaults as a full mapping, so that an override of one variant keeps the others
    raw = read_params(path) if path is not None else config_to_dict(Config())
    return resolve_config(raw, overrides, str(path) if path is not None else "<defaults>")


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
