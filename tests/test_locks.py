"""One writer per output folder: a second writer is refused naming the holder, and stale locks are recovered."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_world import PARAMS, cli_args, context, make_root, snapshot

from sdpo import fs, stages
from sdpo.cli import main as cli
from sdpo.locks import Holder, LockError, lock_uri, writer_lock
from sdpo.train import checkpoint as ck

HOST = socket.gethostname()
GUARD_S = 300  # only a deadlock guard for the events below; nothing waits on speed


def test_a_second_trainer_on_one_folder_is_refused_and_the_first_finishes_intact(small_shards, tiny_sd15, tmp_path,
                                                                                 tracking, monkeypatch, capsys):
    from sdpo.train.trainer import Trainer

    root = make_root(tmp_path / "root", small_shards, tiny_sd15)
    written, go = threading.Event(), threading.Event()
    original = Trainer._checkpoint

    def pausing(self, ckpt_root, step, batch):
        path = original(self, ckpt_root, step, batch)
        if step == 1:  # the first trainer holds the folder mid-run while the second one tries
            written.set()
            assert go.wait(GUARD_S)
        return path

    monkeypatch.setattr(Trainer, "_checkpoint", pausing)
    outcome: dict = {}

    def first() -> None:
        try:
            outcome["summary"] = stages.train(context(root), "dpo", overwrite=True)
        except BaseException as err:  # reported to the test thread below
            outcome["error"] = err
        finally:
            written.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert written.wait(GUARD_S) and "error" not in outcome
        before = snapshot(root / "models" / "dpo")
        capsys.readouterr()
        assert cli([*cli_args(root), "--overwrite"]) == 2  # would have deleted the first one's checkpoints
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"is being written by stage train (pid {os.getpid()} on {HOST}, since " in err
        assert snapshot(root / "models" / "dpo") == before
    finally:
        go.set()
        thread.join(GUARD_S)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["steps"] == 3
    assert [r["step"] for r in fs.read_jsonl(root / "models" / "dpo" / "metrics.jsonl")] == [1, 2, 3]
    runs = {ck.read_state(root / "models" / "dpo" / "checkpoints" / n)["run_id"]
            for n in ck.complete_checkpoints(root / "models" / "dpo" / "checkpoints")}
    assert runs == {outcome["summary"]["run_id"]}
    assert not Path(lock_uri(root / "models" / "dpo") + ".holder.json").exists()  # released


def test_a_crashed_holder_is_recovered_on_this_host(tmp_path):
    target = tmp_path / "models" / "dpo"
    code = ("import sys, time; from sdpo.locks import writer_lock\n"
            f"with writer_lock({str(target)!r}, 'train'):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"stage train \(pid {child.pid} on {HOST}"), \
                writer_lock(target, "evaluate"):
            pass
    finally:
        child.kill()  # SIGKILL: no clean-up ran, its holder file stays behind
        child.wait()
    info = Path(lock_uri(target) + ".holder.json")
    assert json.loads(info.read_text())["pid"] == child.pid
    with writer_lock(target, "train") as holder:  # the kernel released the dead holder's lock
        assert holder.pid == os.getpid() and json.loads(info.read_text())["token"] == holder.token


def test_the_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    target = str(tmp_path / "shards" / "train")
    refused: list[str] = []

    def other() -> None:
        try:
            with writer_lock(target, "ingest"):
                refused.append("")
        except LockError as err:
            refused.append(str(err))

    with writer_lock(target, "ingest") as outer, writer_lock(target, "ingest") as inner:
        assert inner == outer
        worker = threading.Thread(target=other)
        worker.start()
        worker.join(GUARD_S)
    assert refused and "is being written by stage ingest" in refused[0]
    with writer_lock(target, "ingest"):  # free again
        pass


# --- object stores ------------------------------------------------------------------------------------------


def _plant(moto_s3, uri: str, **fields) -> None:
    holder = Holder(**{"stage": "train", "host": "other-host", "pid": 4242, "started": "2026-01-01T00:00:00+00:00",
                       "token": "theirs", **fields})
    key = lock_uri(uri).removeprefix(f"s3://{moto_s3.bucket}/")
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=key, Body=holder.to_json())


def _lock_keys(moto_s3) -> list[str]:
    return [k for k in moto_s3.keys(prefix="") if k.endswith(".lock")]


def test_object_store_lock_refuses_a_second_writer_and_releases(moto_s3):
    uri = f"s3://{moto_s3.bucket}/root/models/dpo"
    with writer_lock(uri, "train") as holder:
        assert _lock_keys(moto_s3) == ["root/models/.dpo.lock"]
        errors: list[str] = []
        worker = threading.Thread(target=lambda: _try(uri, errors))
        worker.start()
        worker.join(GUARD_S)
        assert errors and f"stage train (pid {holder.pid} on {HOST}" in errors[0]
    assert _lock_keys(moto_s3) == []


def _try(uri: str, errors: list[str]) -> None:
    try:
        with writer_lock(uri, "train"):
            errors.append("")
    except LockError as err:
        errors.append(str(err))


def test_object_store_lock_recovers_stale_locks_only(moto_s3):
    uri = f"s3://{moto_s3.bucket}/root/evals/dpo"
    _plant(moto_s3, uri)  # fresh, on another host: refused
    with pytest.raises(LockError, match=r"being written by stage train \(pid 4242 on other-host"), \
            writer_lock(uri, "evaluate", timeout=3600):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(moto_s3, uri, host=HOST, pid=int(dead.stdout))  # its process is gone from this host
    with writer_lock(uri, "evaluate", timeout=3600) as holder:
        assert json.loads(fs.read_bytes(lock_uri(uri)))["token"] == holder.token
    _plant(moto_s3, uri, owner="metaflow:7:evaluate:x", attempt=0)  # a retry of the same task takes over
    with writer_lock(uri, "evaluate", owner="metaflow:7:evaluate:x", attempt=1, timeout=3600):
        pass
    _plant(moto_s3, uri)  # no heartbeat for longer than the timeout (the lock only gets older: no race with speed)
    time.sleep(1.1)  # Last-Modified and Date have whole seconds: the age is now at least 1 s
    with writer_lock(uri, "evaluate", timeout=0.5):
        pass
    assert _lock_keys(moto_s3) == []


def test_a_holder_whose_object_lock_was_taken_over_fails(moto_s3):
    """A retry took the lock over (the first attempt looked dead): the first attempt must not finish quietly."""
    uri = f"s3://{moto_s3.bucket}/root/models/dpo-sdpo"
    taken, done = threading.Event(), threading.Event()

    def retry() -> None:
        with writer_lock(uri, "train", owner="metaflow:9:train:y", attempt=1, timeout=3600):
            taken.set()
            assert done.wait(GUARD_S)

    worker = threading.Thread(target=retry)
    try:
        with pytest.raises(LockError, match=r"taken over by stage train \(pid \d+ on .*attempt 1\) while train"), \
                writer_lock(uri, "train", owner="metaflow:9:train:y", attempt=0, timeout=3600):
            worker.start()
            assert taken.wait(GUARD_S)
    finally:
        done.set()
        worker.join(GUARD_S)
    assert _lock_keys(moto_s3) == []  # the retry released its own lock; the first attempt deleted nothing


def test_a_stage_on_an_object_store_root_is_refused_while_locked(moto_s3, tiny_sd15, tmp_path):
    root = f"s3://{moto_s3.bucket}/root2"
    ctx = stages.StageContext.load(PARAMS, [f"data.root={root}", f"model.base={tiny_sd15}"])
    first = stages.base(ctx)
    record = fs.read_bytes(ctx.layout.base_record())
    _plant(moto_s3, ctx.layout.base_dir())
    with pytest.raises(LockError, match=r"root2/models/base is being written by stage train \(pid 4242 on other"):
        stages.base(ctx)
    assert fs.read_bytes(ctx.layout.base_record()) == record and first["digest"].startswith("sha256:")
