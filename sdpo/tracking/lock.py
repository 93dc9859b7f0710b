"""A mutex over the MLflow tracking server, so registrations and promotions of one model run one at a time.

The lock of registered model ``NAME`` is another registered model, ``NAME.lock``: creating a registered model is
atomic in MLflow's store (its name is the primary key), so of two processes that try at once exactly one gets it,
whatever machines they run on. Releasing deletes it. A lock older than ``stale_after_s`` (a holder that died) is
broken. While one is held, the MLflow UI lists ``NAME.lock`` with its holder in the description.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sdpo.errors import ModelError

LOCK_SUFFIX = ".lock"
OWNER_TAG = "sdpo.lock.owner"
SINCE_TAG = "sdpo.lock.acquired_at"
POLL_S = 0.5
TIMEOUT_S = 3600.0
STALE_AFTER_S = 4 * 3600.0


def lock_name(name: str) -> str:
    """The registered model that is the lock of registered model ``name``."""
    return f"{name}{LOCK_SUFFIX}"


def on_busy(lock: str, owner: str | None) -> None:
    """Called each time the lock is found held by someone else (a hook for tests and logging; does nothing)."""


def _holder(client: MlflowClient, lock: str) -> tuple[str | None, float | None] | None:
    """(owner, acquired_at) of the held lock, or None when it is free."""
    try:
        model = client.get_registered_model(lock)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    since = model.tags.get(SINCE_TAG)
    try:
        return model.tags.get(OWNER_TAG), float(since) if since is not None else None
    except ValueError:
        return model.tags.get(OWNER_TAG), None


def _try_acquire(client: MlflowClient, lock: str, owner: str) -> bool:
    try:
        client.create_registered_model(
            lock, tags={OWNER_TAG: owner, SINCE_TAG: f"{time.time():.3f}"},
            description=f"sdpo registry lock, held by {owner}; deleted when it is released",
        )
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _release(client: MlflowClient, lock: str, owner: str) -> None:
    held = _holder(client, lock)
    if held is not None and held[0] == owner:
        client.delete_registered_model(lock)


@contextmanager
def registry_lock(client: MlflowClient, name: str, *, timeout_s: float = TIMEOUT_S,
                  stale_after_s: float = STALE_AFTER_S, poll_s: float = POLL_S) -> Iterator[str]:
    """Hold the lock of registered model ``name`` for the block; yields the owner token.

    Waits up to ``timeout_s`` for another holder (then :class:`ModelError` naming it); breaks a lock held longer
    than ``stale_after_s``.
    """
    lock = lock_name(name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while not _try_acquire(client, lock, owner):
        held = _holder(client, lock)
        if held is None:
            continue  # released between the two calls
        holder, since = held
        on_busy(lock, holder)
        if since is not None and time.time() - since > stale_after_s:
            if _holder(client, lock) == held:  # still the same stale holder: break its lock
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise ModelError(f"registered model {name!r} is locked by {holder} (since {since}); if that process is "
                             f"gone, delete the registered model {lock!r}")
        time.sleep(poll_s)
    try:
        yield owner
    finally:
        _release(client, lock, owner)
