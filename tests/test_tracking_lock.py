"""The registry lock against a real MLflow server: one holder at a time, released after use, stale locks broken."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from sdpo.errors import ModelError
from sdpo.tracking.lock import OWNER_TAG, SINCE_TAG, lock_name, registry_lock


def _exists(client: MlflowClient, name: str) -> bool:
    return bool(client.search_registered_models(f"name = '{name}'"))


def test_a_held_lock_refuses_another_holder_until_released(mlflow_tracking: str) -> None:
    client = MlflowClient()
    errors: list[str] = []

    def try_it() -> None:
        try:
            with registry_lock(MlflowClient(), "lock-held", timeout_s=0):
                errors.append("acquired a held lock")
        except ModelError as err:
            errors.append(str(err))

    with registry_lock(client, "lock-held") as owner:
        assert client.get_registered_model(lock_name("lock-held")).tags[OWNER_TAG] == owner
        thread = threading.Thread(target=try_it)
        thread.start()
        thread.join()
    (message,) = errors
    assert f"is locked by {owner}" in message and "delete the registered model 'lock-held.lock'" in message
    assert not _exists(client, lock_name("lock-held"))
    with registry_lock(client, "lock-held", timeout_s=0):  # free again
        assert _exists(client, lock_name("lock-held"))


def test_the_lock_is_released_when_the_block_fails(mlflow_tracking: str) -> None:
    client = MlflowClient()
    with pytest.raises(RuntimeError, match="inside"), registry_lock(client, "lock-fails"):
        raise RuntimeError("inside")
    assert not _exists(client, lock_name("lock-fails"))


def test_a_stale_lock_is_broken(mlflow_tracking: str) -> None:
    client = MlflowClient()
    stale = lock_name("lock-stale")
    client.create_registered_model(stale, tags={OWNER_TAG: "a process that died", SINCE_TAG: "0"})
    with registry_lock(client, "lock-stale", timeout_s=0, stale_after_s=60) as owner:
        assert client.get_registered_model(stale).tags[OWNER_TAG] == owner
    assert not _exists(client, stale)
    # a recent lock is not stale
    client.create_registered_model(stale, tags={OWNER_TAG: "alive", SINCE_TAG: f"{time.time():.3f}"})
    with pytest.raises(ModelError, match="is locked by alive"), registry_lock(client, "lock-stale", timeout_s=0):
        pass
    assert client.get_registered_model(stale).tags[OWNER_TAG] == "alive"  # someone else's lock stays
