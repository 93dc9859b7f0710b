"""The NaN guard: the checkpoint it names is good, and its advice, followed literally through the CLI, works."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from train_world import cli_args, make_root, snapshot

from sdpo import fs, stages
from sdpo.cli import main as cli
from sdpo.train import checkpoint as ck

CKPT = "models/dpo/checkpoints"


def _advice(stderr: str) -> list[str]:
    found = re.search(r"rerun the same command with `([^`]+)`", stderr)
    assert found, stderr
    return shlex.split(found.group(1))


def _outputs_finite(base: Path, weights: Path | None = None) -> bool:
    """A denoiser forward pass from the base, with a checkpoint's weights loaded into it, is finite."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    if weights is not None:
        ck.load_weights(weights, unet.requires_grad_(True))
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2, 4, cfg.cross_attention_dim, generator=gen)
    with torch.no_grad():
        out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    return bool(torch.isfinite(out).all())


def _poison_the_loss_of_step_3(monkeypatch):
    """Make step 3's training loss (computed from step 2's weights) NaN; returns the real ``_micro_step``."""
    from sdpo.train.trainer import Trainer

    original = Trainer._micro_step

    def poisoned(self, batch):
        out = original(self, batch)
        if self.state.step == 2 and torch.is_grad_enabled():  # step 3's training forward only
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Trainer, "_micro_step", poisoned)
    return original


def test_a_diverged_first_step_leaves_no_checkpoint_and_the_advice_works(small_shards, tiny_sd15, tmp_path,
                                                                           tracking, capsys):
    root = make_root(tmp_path / "root", small_shards, tiny_sd15)
    args = cli_args(root, "train.lr=1e6")
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "non-finite training at step 1" in err and "no checkpoint passed the check" in err
    assert ck.complete_checkpoints(root / CKPT) == [] and not (root / "models" / "dpo" / "model").exists()

    advice = _advice(err)
    assert advice == ["--overwrite", "--set", "train.lr=1e-05"]
    assert cli(args + advice) == 0
    summary = fs.read_json(root / "models" / "dpo" / "training_summary.json")
    assert summary["steps"] == 3 and summary["train"]["lr"] == 1e-5
    assert _outputs_finite(root / "models" / "dpo" / "model")


def test_divergence_after_a_good_checkpoint_names_it_and_resume_advice_works(small_shards, tiny_sd15,
                                                                            tmp_path, tracking, capsys,
                                                                            monkeypatch):
    root = make_root(tmp_path / "root", small_shards, tiny_sd15)
    args = cli_args(root)
    monkeypatch.setenv(stages.FAULT_ENV, "train-after-checkpoint")  # an interrupted run with one checkpoint
    assert cli(args) == 2
    monkeypatch.delenv(stages.FAULT_ENV)
    good = root / CKPT / "step-0000001"
    before = snapshot(good)
    capsys.readouterr()

    assert cli([*args, "--resume", "--set", "train.lr=1e6"]) == 2  # the lr change applies: it diverges
    err = capsys.readouterr().err
    assert "non-finite training at step 2" in err or "non-finite training at step 3" in err
    assert f"the last good checkpoint is {good} " in err
    assert ck.latest_checkpoint(root / CKPT) == good.name and snapshot(good) == before
    assert _outputs_finite(tiny_sd15, good)  # the named checkpoint loads and gives finite outputs

    advice = _advice(err)
    assert advice == ["--resume", "--set", "train.lr=1e-05"]
    assert cli(args + advice) == 0
    summary = fs.read_json(root / "models" / "dpo" / "training_summary.json")
    assert summary["steps"] == 3 and summary["train"]["lr"] == 1e-5
    assert [(r["step"], r["lr"]) for r in fs.read_jsonl(root / "models" / "dpo" / "metrics.jsonl")] == [
        (1, 1e-5), (2, 1e-5), (3, 1e-5)]
    assert _outputs_finite(root / "models" / "dpo" / "model")


def test_a_retry_that_fetched_only_the_newest_checkpoint_names_the_stores_older_one(small_shards, tiny_sd15,
                                                                                     tmp_path, monkeypatch):
    """A retry on a fresh machine fetches only the checkpoint it resumes from. When the step after it diverges,
    that checkpoint is set aside here and in the store, and the last good one is the store's older checkpoint."""
    from sdpo.config import load_config
    from sdpo.errors import TrainingError
    from sdpo.train.job import mirror_checkpoint
    from sdpo.train.trainer import train

    sets = ["train.batch_size=4", "train.heldout_every=0", "train.beta=500", "train.checkpoint_every=1",
            "train.log_every=1", "train.keep_checkpoints=0"]
    first, store, retry = tmp_path / "first", tmp_path / "store", tmp_path / "retry"

    def mirror(path: Path) -> None:
        mirror_checkpoint(path, str(store), keep=0)

    train(load_config(None, [*sets, "train.steps=2"]), shards_dir=small_shards, base_model=str(tiny_sd15),
          output_dir=first, show_progress=False, on_checkpoint=mirror)
    assert ck.complete_checkpoints(store) == ["step-0000001", "step-0000002"]
    shutil.copytree(store / "step-0000002", retry / "checkpoints" / "step-0000002")  # what the retry fetches

    _poison_the_loss_of_step_3(monkeypatch)
    with pytest.raises(TrainingError, match="non-finite training at step 3") as err:
        train(load_config(None, [*sets, "train.steps=4"]), shards_dir=small_shards, base_model=str(tiny_sd15),
              output_dir=retry, resume=True, show_progress=False, on_checkpoint=mirror, checkpoint_store=str(store))
    message = str(err.value)
    assert f"the last good checkpoint is {store / 'step-0000001'} " in message
    assert "To continue from step-0000001 " in message
    assert ck.complete_checkpoints(retry / "checkpoints") == []
    assert ck.complete_checkpoints(store) == ["step-0000001"]  # the set-aside one left the store too


@pytest.mark.parametrize(("lr", "suggested"), [(1e6, 1e-5), (1e-5, 1e-6), (3e-7, 3e-8)])
def test_the_suggested_lr_is_lower(lr, suggested):
    from sdpo.train.guard import lower_lr

    assert lower_lr(lr) == pytest.approx(suggested) and lower_lr(lr) < lr


def test_a_checkpoint_whose_next_step_diverges_is_set_aside_everywhere(small_shards, tiny_sd15, tmp_path,
                                                                        monkeypatch):
    """Step 3's loss comes from step 2's weights: when it is NaN, step-0000002 is not good, even though its weights
    and its own outputs were finite. It is set aside (here and in the mirror) and resume takes step-0000001."""
    from sdpo.config import load_config
    from sdpo.errors import TrainingError
    from sdpo.train.job import mirror_checkpoint
    from sdpo.train.trainer import Trainer, train

    original = _poison_the_loss_of_step_3(monkeypatch)
    cfg = load_config(None, ["train.steps=4", "train.batch_size=4", "train.heldout_every=0", "train.beta=500",
                             "train.checkpoint_every=1", "train.log_every=1"])
    out, mirror = tmp_path / "run", tmp_path / "mirror"
    with pytest.raises(TrainingError, match="non-finite training at step 3") as err:
        train(cfg, shards_dir=small_shards, base_model=str(tiny_sd15), output_dir=out, show_progress=False,
              on_checkpoint=lambda path: mirror_checkpoint(path, str(mirror), keep=2))
    message = str(err.value)
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-0000001'} " in message
    assert "step-0000002 was set aside as rejected-step-0000002" in message
    assert (out / "checkpoints" / "rejected-step-0000002" / "REJECTED").is_file()
    assert ck.complete_checkpoints(out / "checkpoints") == ["step-0000001"]
    assert ck.complete_checkpoints(mirror) == ["step-0000001"]  # the mirror follows

    monkeypatch.setattr(Trainer, "_micro_step", original)
    result = train(cfg, shards_dir=small_shards, base_model=str(tiny_sd15), output_dir=out, resume=True,
                   show_progress=False)
    assert result.steps == 4 and [r["step"] for r in fs.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
