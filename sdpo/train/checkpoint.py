"""Training checkpoints in safe formats only (JSON + safetensors), and the identity of the run they belong to.

A checkpoint folder ``checkpoints/step-NNNNNNN/`` holds::

    state.json                format, run id, step, run identity, config in force, resume history,
                              optimizer / scheduler / grad-scaler state (tensors referenced by name)
    denoiser.safetensors      the trainable parameters of the denoiser (full fine-tune: all; LoRA: the adapters)
    optimizer.safetensors     the optimizer's tensors (Adam moments, step counters...)
    rank-<i>.json             per process: data cursor, Python and NumPy RNG state (arrays by name)
    rank-<i>.safetensors      per process: the noise generator, torch CPU/CUDA RNG states, NumPy's key array
    COMPLETE                  written last (the folder is renamed into place complete)

Nothing else in the folder is read: accelerate's ``save_state`` files (``optimizer.bin``, ``scheduler.bin``,
``random_states_*.pkl``, ``custom_checkpoint_*.pkl``, ``scaler.pt``...) are pickles, and accelerate loads
``custom_checkpoint_*.pkl`` with ``torch.load(weights_only=False)``, which runs any code planted there. The trainer
no longer calls ``save_state``/``load_state``; it writes and reads the files above, whose parsers (``json`` and
safetensors) cannot execute code.

**Run identity.** A run is the digest of (1) its resolved configuration for the arm, minus the keys in
:data:`FREE_ON_RESUME`, (2) the sha256 of the train data manifest and (3) the digest of the base model folder
(:func:`sdpo.fs.folder_digest`; a hub id with its revision when there is no folder). Each checkpoint stores its
identity; resuming with another identity is refused, naming the keys, the data or the base that changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import socket
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdpo import fs
from sdpo.config import Config, flatten
from sdpo.errors import TrainingError

FORMAT = "sdpo-checkpoint/1"
STATE = "state.json"
WEIGHTS = "denoiser.safetensors"
OPTIMIZER = "optimizer.safetensors"
COMPLETE = "COMPLETE"
PREFIX = "step-"
REJECTED_PREFIX = "rejected-"


def rank_files(rank: int) -> tuple[str, str]:
    """The JSON and safetensors file names of one process's loop state."""
    return f"rank-{rank}.json", f"rank-{rank}.safetensors"


# --- run identity -------------------------------------------------------------------------------------------

# Keys that may differ between a checkpoint and the run that resumes it, and why. Every other key of the resolved
# config (``train.*`` after the arm's variant is applied, ``model.*``) is part of the identity, including keys added
# later: a new key is identity until it is listed here. Patterns ending in "." cover a whole section. A key of a
# free section that training starts to read (e.g. a data.* cache setting) must be taken out of this list.
FREE_ON_RESUME: dict[str, str] = {
    "train.steps": "extends or shortens the run; refused when the lr schedule depends on the total (see below)",
    "train.log_every": "only when metrics are written",
    "train.checkpoint_every": "only when checkpoints are written",
    "train.keep_checkpoints": "only which older checkpoints are deleted",
    "train.heldout_every": "the held-out probe observes the model and draws from its own generator",
    "train.heldout_pairs": "the held-out probe observes the model and draws from its own generator",
    "train.dataloader_workers": "batches are a pure function of (seed, epoch, batch); workers only prefetch",
    "train.accelerate_config": "the launcher; the world size is part of the data cursor and checked there",
    "train.lr": "recovery knob: applied to the optimizer and scheduler from the resumed step on, and recorded",
    "train.max_grad_norm": "recovery knob: applies from the resumed step on, and recorded",
    "train.variants": "the arm's own variant is already resolved into train.*; other arms do not matter",
    "data.": "training reads the shards, and the train data is in the identity by its manifest digest",
    "model.base": "where the base is; the base is in the identity by its content digest",
    "model.toy.": "how the toy base was built; the base is in the identity by its content digest",
    "eval.": "training does not read it",
    "registry.": "training does not read it",
}
# Schedules whose learning rate at a step does not depend on ``train.steps``: only with these may steps change.
STEPS_FREE_SCHEDULES = frozenset({"constant", "constant_with_warmup"})


def is_free(key: str) -> bool:
    """Whether the dotted config key may differ on resume (see :data:`FREE_ON_RESUME`)."""
    return any(key == pattern or (pattern.endswith(".") and key.startswith(pattern))
               or key.startswith(pattern + ".") for pattern in FREE_ON_RESUME)


def resolved_view(cfg: Config, variant: str | None) -> dict[str, Any]:
    """The config as the arm trains with it, flattened: ``train.*`` with the variant applied."""
    tcfg = cfg.train.for_variant(variant) if variant else cfg.train
    view = cfg.model_dump(mode="json")
    view["train"] = tcfg.model_dump(mode="json")
    return flatten(view)


_DIGEST_MEMO: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def base_digest(base_model: str) -> str:
    """Content digest of a base model folder (memoised per file sizes and times), or ``hub:<id>`` for a hub id."""
    path = Path(base_model)
    if not path.is_dir():
        return f"hub:{base_model}"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(path.resolve()), stamp)
    if key not in _DIGEST_MEMO:
        _DIGEST_MEMO[key] = fs.folder_digest(path)
    return _DIGEST_MEMO[key]


def data_digest(shards_dir: str | Path) -> str:
    """sha256 of the train data manifest (it lists every shard with its sha256)."""
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise TrainingError(f"{shards_dir}: no manifest.json; not a published dataset")
    return "sha256:" + fs.file_sha256(path)


@dataclass(frozen=True)
class RunIdentity:
    """What makes two trainings the same run: identity config, train data and base model (see module doc)."""

    config: dict[str, Any]
    free: dict[str, Any]
    data: str
    base: str
    digest: str = ""

    @classmethod
    def of(cls, cfg: Config, variant: str | None, shards_dir: str | Path, base_model: str) -> RunIdentity:
        """The identity of training ``variant`` of ``cfg`` on ``shards_dir`` from ``base_model``."""
        view = resolved_view(cfg, variant)
        config = {k: v for k, v in view.items() if not is_free(k)}
        free = {k: v for k, v in view.items() if is_free(k) and k.startswith("train.")}
        data, base = data_digest(shards_dir), base_digest(base_model)
        blob = json.dumps({"config": config, "data": data, "base": base}, sort_keys=True)
        return cls(config, free, data, base, "sha256:" + hashlib.sha256(blob.encode()).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunIdentity:
        return cls(dict(raw["config"]), dict(raw.get("free", {})), str(raw["data"]), str(raw["base"]),
                   str(raw["digest"]))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_problems(saved: RunIdentity, now: RunIdentity, *, checkpoint_step: int) -> list[str]:
    """Why a checkpoint of ``saved`` cannot be resumed as ``now`` (empty when it can)."""
    problems = []
    keys = sorted(set(saved.config) | set(now.config))
    changed = [k for k in keys if saved.config.get(k) != now.config.get(k)]
    if changed:
        problems.append("config keys changed: " + ", ".join(
            f"{k} {_short(saved.config.get(k))} -> {_short(now.config.get(k))}" for k in changed))
    if saved.data != now.data:
        problems.append(f"the train data changed (manifest {saved.data[:19]}... -> {now.data[:19]}...)")
    if saved.base != now.base:
        problems.append(f"the base model changed ({saved.base[:19]}... -> {now.base[:19]}...)")
    old_steps, new_steps = saved.free.get("train.steps"), now.free.get("train.steps")
    schedule = now.config.get("train.lr_schedule")
    if old_steps != new_steps and schedule not in STEPS_FREE_SCHEDULES:
        problems.append(f"train.steps {old_steps} -> {new_steps} changes the {schedule!r} lr schedule "
                        f"(only {sorted(STEPS_FREE_SCHEDULES)} allow it)")
    if new_steps is not None and new_steps < checkpoint_step:
        problems.append(f"train.steps is {new_steps} but the checkpoint is at step {checkpoint_step}")
    return problems


def free_changes(saved: RunIdentity, now: RunIdentity) -> dict[str, list[Any]]:
    """The ``train.*`` keys allowed to differ that do differ: ``{key: [checkpoint value, new value]}``."""
    keys = sorted(set(saved.free) | set(now.free))
    return {k: [saved.free.get(k), now.free.get(k)] for k in keys if saved.free.get(k) != now.free.get(k)}


def new_run_id() -> str:
    return uuid.uuid4().hex


# --- a safe codec for state trees (JSON structure, tensors in safetensors) ----------------------------------


def split_tree(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``value`` with each tensor/array moved into ``tensors`` under a name from ``prefix``.

    Handles dicts (any hashable JSON-scalar keys), lists, tuples, tensors, numpy arrays and JSON scalars; anything
    else is refused (it could not be restored without pickle).
    """
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(value, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": prefix}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: split_tree(v, tensors, f"{prefix}.{k}") for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise TrainingError(f"checkpoint: cannot store a key of type {type(k).__name__} at {prefix}")
            items.append([k, split_tree(v, tensors, f"{prefix}.{k}")])
        return {"__items__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [split_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise TrainingError(f"checkpoint: cannot store a {type(value).__name__} at {prefix} in a safe format")


def join_tree(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of :func:`split_tree`; a reference to a missing tensor is refused naming ``where``."""
    if isinstance(value, dict):
        for tag in ("__tensor__", "__ndarray__"):
            if tag in value:
                name = value[tag]
                if name not in tensors:
                    raise TrainingError(f"{where}: tensor {name!r} is missing")
                return tensors[name] if tag == "__tensor__" else tensors[name].numpy()
        if "__tuple__" in value:
            return tuple(join_tree(v, tensors, where) for v in value["__tuple__"])
        if "__items__" in value:
            return {k: join_tree(v, tensors, where) for k, v in value["__items__"]}
        return {k: join_tree(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tree(v, tensors, where) for v in value]
    return value


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; :class:`TrainingError` naming it when it is missing or not safetensors."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for anything that is not its format
        raise TrainingError(f"{path}: not a safetensors file ({err}); refusing to load it") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise TrainingError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainingError(f"{path}: not JSON ({err}); refusing to load it") from None


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# --- process-level random states ----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA random states of this process."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when this process has as many devices)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- writing and reading checkpoints ------------------------------------------------------------------------


def trainable_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@dataclass
class CheckpointMeta:
    """The shared, human-readable part of ``state.json``."""

    run_id: str
    step: int
    identity: dict[str, Any]
    config: dict[str, Any]  # the resolved config in force when this checkpoint was written
    world_size: int
    history: list[dict[str, Any]] = field(default_factory=list)  # resumes that changed free keys
    checkpoint_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    written_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def write_shared(path: Path, meta: CheckpointMeta, *, denoiser: torch.nn.Module, optimizer: Any, scheduler: Any,
                 scaler: Any | None, accelerate_step: int) -> None:
    """The main process's part of a checkpoint into the folder ``path`` (no ``COMPLETE`` yet)."""
    write_tensors(path / WEIGHTS, trainable_tensors(denoiser))
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT,
        **asdict(meta),
        "accelerate_step": accelerate_step,
        "optimizer": split_tree(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": split_tree(scheduler.state_dict(), tensors, "scheduler"),
        "scaler": split_tree(scaler.state_dict(), tensors, "scaler") if scaler is not None else None,
    }
    write_tensors(path / OPTIMIZER, tensors)
    write_json(path / STATE, state)


def write_rank(path: Path, rank: int, loop_state: dict[str, Any]) -> None:
    """One process's loop state (data cursor, generators, RNG states) into the folder ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = split_tree(loop_state, tensors, "loop")
    json_name, tensor_name = rank_files(rank)
    write_tensors(path / tensor_name, tensors)
    write_json(path / json_name, tree)


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint, checked to be this format."""
    state = read_json(path / STATE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path}: not a {FORMAT} checkpoint (no {STATE} of this format; older checkpoints "
                            "were pickles and are not loaded): start over with --overwrite")
    return state


def load_weights(path: Path, denoiser: torch.nn.Module) -> None:
    """Copy ``denoiser.safetensors`` into the trainable parameters; names, shapes and dtypes must match."""
    saved = read_tensors(path / WEIGHTS)
    params = trainable_tensors(denoiser)
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise TrainingError(f"{path / WEIGHTS}: parameters do not match this model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            t = saved[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise TrainingError(f"{path / WEIGHTS}: {name} is {tuple(t.shape)} {t.dtype}, the model has "
                                    f"{tuple(p.shape)} {p.dtype}")
            p.copy_(t.to(p.device))


def export_model(path: Path, base_model: str, out_dir: Path) -> None:
    """Write the model of checkpoint ``path`` as a diffusers folder: the base with the checkpoint's denoiser weights.

    The denoiser is set up as the trainer sets it up (its LoRA adapters, from the checkpoint's own config, are fused
    on saving), so the folder is what training would have exported had it stopped at that step.
    """
    from sdpo.models import load_model

    config = read_state(path)["config"]["model"]
    lora = config["lora"]
    model = load_model(base_model, config["family"] if config["base"] else None, encoders=False)
    model.freeze_all_but_denoiser()
    denoiser = model.denoiser
    if lora["enabled"]:
        from sdpo.models.lora import add_lora

        add_lora(denoiser, lora["rank"], lora["alpha"], lora["target_modules"])
    load_weights(path, denoiser)
    model.save_pipeline(str(out_dir), denoiser=denoiser)


def load_shared(path: Path, state: dict[str, Any], *, optimizer: Any, scheduler: Any, scaler: Any | None) -> None:
    """Restore optimizer, scheduler and grad-scaler state from a checkpoint's ``state.json`` and tensors."""
    tensors = read_tensors(path / OPTIMIZER)
    where = str(path / OPTIMIZER)
    try:
        optimizer.load_state_dict(join_tree(state["optimizer"], tensors, where))
        scheduler.load_state_dict(join_tree(state["scheduler"], tensors, where))
    except (KeyError, ValueError, TypeError) as err:
        raise TrainingError(f"{path}: optimizer or scheduler state does not fit this run ({err})") from None
    if scaler is not None:
        if state.get("scaler") is None:
            raise TrainingError(f"{path}: no grad-scaler state, but this run uses fp16")
        scaler.load_state_dict(join_tree(state["scaler"], tensors, where))


def read_rank(path: Path, rank: int) -> dict[str, Any]:
    """One process's loop state; refused when this rank has none (another world size)."""
    json_name, tensor_name = rank_files(rank)
    if not (path / json_name).is_file():
        raise TrainingError(f"{path}: no loop state for process {rank} (written with another number of processes)")
    return join_tree(read_json(path / json_name), read_tensors(path / tensor_name), str(path / tensor_name))


def rescale_lr(optimizer: Any, scheduler: Any, ratio: float) -> None:
    """Multiply the learning rate in force by ``ratio``: param groups, and the scheduler's base and last lrs."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * ratio
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * ratio
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    if getattr(inner, "_last_lr", None) is not None:
        inner._last_lr = [lr * ratio for lr in inner._last_lr]


# --- the checkpoints folder ---------------------------------------------------------------------------------


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name ``step-NNNNNNN`` (None for anything else)."""
    if not name.startswith(PREFIX):
        return None
    digits = name[len(PREFIX):]
    return int(digits) if digits.isdigit() else None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """Names of the complete checkpoints under ``root`` (local or URI), oldest first."""
    names = [n for n in fs.list_dirs(root) if step_of(n) is not None and fs.exists(fs.join(root, n, COMPLETE))]
    return sorted(names, key=lambda n: step_of(n) or 0)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint's name under ``root``, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def expired_checkpoints(root: str | os.PathLike, *, keep: int) -> list[str]:
    """The complete checkpoints under ``root`` beyond the newest ``keep`` (``keep=0``: none expire)."""
    return beyond_newest(complete_checkpoints(root), keep=keep)


def beyond_newest(names: Iterable[str], *, keep: int) -> list[str]:
    """The checkpoint names beyond the newest ``keep`` of ``names``, oldest first (``keep=0``: none)."""
    done = sorted(names, key=lambda n: step_of(n) or 0)
    return done[:-keep] if keep else []


def reject(path: Path, reason: str) -> Path:
    """Set a checkpoint aside (``rejected-step-N``, with the reason): resume never picks it; older ones go."""
    target = path.with_name(REJECTED_PREFIX + path.name)
    for old in path.parent.glob(REJECTED_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    (path / "REJECTED").write_text(reason + "\n")
    os.replace(path, target)
    return target


def foreign_runs(root: Path, run_id: str, names: Iterable[str]) -> list[str]:
    """Checkpoints under ``root`` written by another run than ``run_id``."""
    foreign = []
    for name in names:
        state = root / name / STATE
        try:
            other = json.loads(state.read_text()).get("run_id")
        except (OSError, ValueError):
            continue
        if other != run_id:
            foreign.append(f"{name} (run {other})")
    return foreign
