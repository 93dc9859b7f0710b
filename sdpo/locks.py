"""One writer per output folder: an advisory lock beside the folder, naming its holder.

The stages that write a folder (ingest, base, train, evaluate, and any later one such as encode) take the lock of
that folder first with :func:`writer_lock` (or the :func:`writes` decorator). A second writer is refused at once
with one line naming the holder (stage, pid, host, start time). The lock of ``PARENT/NAME`` is ``PARENT/.NAME.lock``.

**Local folders** use :class:`filelock.FileLock` (``flock``): the kernel releases the lock when the holder process
ends, however it ends, so a crashed holder never blocks the next writer (on NFS the server does it when the dead
client's lease expires). The holder's details are in ``PARENT/.NAME.lock.holder.json``, written after the lock is
taken and removed on release; a leftover from a crash is replaced.

**Object stores** (``s3://``) have no locks. The lock is an object created with a conditional put
(``If-None-Match: *``, supported by AWS S3 since 2024, MinIO and moto): only one writer can create it. The holder
refreshes it every ``stale_after / 5`` seconds (``If-Match`` its own ETag). A lock is stale, and is taken over with
``If-Match`` on the stale ETag (so two recoverers cannot both win), when its holder was on this host and that process
is gone, when it was not refreshed for ``stale_after`` seconds (server clock: ``Last-Modified`` against the
response ``Date``), or when it is held by an earlier attempt of the same orchestrator task (a retry). Release is a
delete with ``If-Match``. A holder whose lock was taken over (its heartbeat failed for longer than the timeout)
learns it at the next refresh or at release, and its stage fails. Limits: the lock is advisory (only sdpo's stages
take it); a holder paused for longer than the timeout loses it; and on a store that ignores conditional writes
(found out by a probe once per bucket) the lock degrades to check-then-write with a read-back, which a close race
can defeat: a warning says so.

``SDPO_LOCK_STALE_S`` sets the timeout (default 600 s) for object-store locks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import functools
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from sdpo import fs
from sdpo.errors import SdpoError

STALE_ENV = "SDPO_LOCK_STALE_S"
DEFAULT_STALE_S = 600.0
HOLDER_SUFFIX = ".holder.json"


class LockError(SdpoError):
    """Another writer holds an output folder, or this writer lost its lock; the message names the holder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what an operator needs to find the process, plus a token that proves ownership."""

    stage: str
    host: str
    pid: int
    started: str
    owner: str | None = None  # orchestrator task (e.g. metaflow run/step/arm); a retry of it may take over
    attempt: int = 0
    token: str = ""
    heartbeat: float = 0.0

    @classmethod
    def here(cls, stage: str, owner: str | None, attempt: int) -> Holder:
        now = dt.datetime.now(dt.UTC)
        return cls(stage, socket.gethostname(), os.getpid(), now.isoformat(timespec="seconds"), owner, attempt,
                   uuid.uuid4().hex, now.timestamp())

    def describe(self) -> str:
        task = f", task {self.owner} attempt {self.attempt}" if self.owner else ""
        return f"stage {self.stage} (pid {self.pid} on {self.host}, since {self.started}{task})"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError):
            return None


def stale_after() -> float:
    """The object-store lock timeout in seconds (``SDPO_LOCK_STALE_S``)."""
    value = os.environ.get(STALE_ENV, "")
    try:
        return float(value) if value else DEFAULT_STALE_S
    except ValueError:
        raise LockError(f"{STALE_ENV}={value!r}: expected a number of seconds") from None


def lock_uri(uri: str | os.PathLike) -> str:
    """Where the lock of the folder ``uri`` lives: ``PARENT/.NAME.lock``."""
    text = str(uri).rstrip("/")
    parent, _, name = text.rpartition("/")
    return fs.join(parent or ".", f".{name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(uri: str, holder: Holder | None, how: str) -> LockError:
    who = holder.describe() if holder else "another process (its details are not readable)"
    return LockError(f"{uri} is being written by {who}; refusing a second writer. Wait for it to finish; {how}")


# --- local folders ------------------------------------------------------------------------------------------


class _LocalLock:
    def __init__(self, uri: str, holder: Holder) -> None:
        from filelock import FileLock

        self.uri, self.holder = uri, holder
        self.path = Path(lock_uri(uri).removeprefix("file://"))
        self.info = self.path.with_name(self.path.name + HOLDER_SUFFIX)
        self.lock = FileLock(str(self.path))
        self.replaced: Holder | None = None

    def acquire(self) -> None:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = Holder.parse(self.info.read_bytes()) if self.info.is_file() else None
            raise _refusal(self.uri, holder, "the lock goes when that process ends, however it ends") from None
        if self.info.is_file():  # a holder that crashed: the kernel released its lock, its details stayed
            self.replaced = Holder.parse(self.info.read_bytes())
        fs.write_bytes(self.info, self.holder.to_json())

    def release(self) -> bool:
        try:
            current = Holder.parse(self.info.read_bytes()) if self.info.is_file() else None
            if current is not None and current.token == self.holder.token:
                self.info.unlink(missing_ok=True)
        finally:
            self.lock.release()
        return False


# --- object stores ------------------------------------------------------------------------------------------


def _status(err: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an s3fs/botocore exception (``("", 0)`` if there is none)."""
    seen: BaseException | None = err
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return str(response["Error"].get("Code", "")), int(status or 0)
        seen = seen.__cause__ or seen.__context__
    return "", 0


def _precondition_failed(err: BaseException) -> bool:
    code, status = _status(err)
    return status == 412 or code == "PreconditionFailed" or isinstance(err, FileExistsError)


_CONDITIONAL: dict[str, bool] = {}  # bucket -> whether the store honours If-None-Match


@dataclass
class _Seen:
    holder: Holder | None
    etag: str
    age: float


class _ObjectLock:
    def __init__(self, uri: str, holder: Holder, timeout: float) -> None:
        self.uri, self.holder, self.timeout = uri, holder, timeout
        self.key_uri = lock_uri(uri)
        self.fs, path = fs.filesystem(self.key_uri)
        self.bucket, _, self.key = path.partition("/")
        self.etag = ""
        self.replaced: Holder | None = None
        self.lost: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def _put(self, holder: Holder, key: str | None = None, **condition: str) -> str:
        return self._call("put_object", Key=key or self.key, Body=holder.to_json(), **condition)["ETag"]

    def _conditional(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` put (probed once per bucket)."""
        if self.bucket not in _CONDITIONAL:
            probe = f"{self.key}.probe-{uuid.uuid4().hex[:8]}"
            self._put(self.holder, probe, IfNoneMatch="*")
            try:
                self._put(self.holder, probe, IfNoneMatch="*")
                honoured = False
            except Exception as err:
                if not _precondition_failed(err):
                    raise
                honoured = True
            finally:
                self._call("delete_object", Key=probe)
            _CONDITIONAL[self.bucket] = honoured
            if not honoured:
                warnings.warn(f"s3://{self.bucket}: the store ignores conditional writes, so writer locks there are "
                              "best-effort (check, write, read back)", stacklevel=3)
        return _CONDITIONAL[self.bucket]

    def _read(self) -> _Seen | None:
        try:
            head = self._call("head_object", Key=self.key)
        except Exception as err:
            if isinstance(err, FileNotFoundError) or _status(err)[1] == 404:
                return None
            raise
        try:
            body = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return _Seen(Holder.parse(body), head["ETag"], now - head["LastModified"].timestamp())

    def _stale(self, seen: _Seen) -> str | None:
        h = seen.holder
        if h is None:
            return "unreadable lock" if seen.age > self.timeout else None
        if h.host == self.holder.host and not _alive(h.pid):
            return f"pid {h.pid} is gone from this host"
        if h.owner and h.owner == self.holder.owner and h.attempt < self.holder.attempt:
            return f"attempt {h.attempt} of this task was retried"
        if seen.age > self.timeout:
            return f"not refreshed for {seen.age:.0f} s (timeout {self.timeout:g} s, {STALE_ENV})"
        return None

    def acquire(self) -> None:
        try:
            self._acquire()
        except SdpoError:
            raise
        except Exception as err:  # network, credentials, permissions: one line naming the lock
            raise fs.StoreError(f"{self.key_uri}: cannot take the writer lock: {type(err).__name__}: {err}") from None

    def _acquire(self) -> None:
        conditional = self._conditional()
        for _ in range(3):
            if conditional:
                try:
                    self.etag = self._put(self.holder, IfNoneMatch="*")
                    break
                except Exception as err:
                    if not _precondition_failed(err):
                        raise
            seen = self._read()
            if seen is None:
                if conditional:
                    continue  # released in between: try to create it again
                self.etag = self._put(self.holder)
                break
            why = self._stale(seen)
            if why is None:
                raise _refusal(self.uri, seen.holder, f"if that process is gone, its lock {self.key_uri} is taken "
                                                      f"over once it is {self.timeout:g} s old ({STALE_ENV})")
            try:
                self.etag = self._put(self.holder, **({"IfMatch": seen.etag} if conditional else {}))
            except Exception as err:
                if not _precondition_failed(err):
                    raise
                continue  # someone else recovered it first: look again
            self.replaced = seen.holder
            print(f"{self.uri}: took over a stale writer lock ({why}) from "
                  f"{seen.holder.describe() if seen.holder else 'an unknown holder'}")
            break
        else:
            seen = self._read()
            raise _refusal(self.uri, seen.holder if seen else None, "the lock changed hands while this one waited")
        if not conditional:
            seen = self._read()
            if seen is None or seen.holder is None or seen.holder.token != self.holder.token:
                raise _refusal(self.uri, seen.holder if seen else None, "another writer won the race")
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.key_uri}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        interval = max(self.timeout / 5, 0.05)
        while not self._stop.wait(interval):
            holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                self.etag = self._put(holder, IfMatch=self.etag)
            except Exception as err:
                if _precondition_failed(err):
                    seen = self._read()
                    self.lost = seen.holder if seen and seen.holder else self.holder
                    return
                # a network hiccup: try again at the next beat; the lock goes stale only after `timeout`

    def release(self) -> bool:
        """Stop refreshing and delete the lock if it is still ours; True when it had been taken over."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.lost is not None:
            return True
        seen = self._read()
        if seen is None or seen.holder is None or seen.holder.token != self.holder.token:
            self.lost = seen.holder if seen is not None and seen.holder is not None else None
            return True
        try:
            self._call("delete_object", Key=self.key, IfMatch=seen.etag)
        except Exception as err:
            if _precondition_failed(err):  # changed hands between the read and the delete
                return True
            self._call("delete_object", Key=self.key)  # a store without conditional deletes: it was ours just now
        return False


# --- the public API -----------------------------------------------------------------------------------------

_held = threading.local()


@contextlib.contextmanager
def writer_lock(uri: str | os.PathLike, stage: str, *, owner: str | None = None, attempt: int = 0,
                timeout: float | None = None) -> Iterator[Holder]:
    """Hold the writer lock of the folder ``uri`` for the block; :class:`LockError` when another writer has it.

    Re-entrant within one thread (a stage that calls another stage on the same folder). ``owner``/``attempt``
    identify an orchestrator task, so that its retry can take over the lock of the attempt that died.
    """
    key = str(uri).rstrip("/")
    held: dict[str, tuple[Holder, int]] = _held.__dict__.setdefault("locks", {})
    if key in held:
        holder, count = held[key]
        held[key] = (holder, count + 1)
        try:
            yield holder
        finally:
            holder, count = held[key]
            held[key] = (holder, count - 1)
        return
    holder = Holder.here(stage, owner, attempt)
    lock = _ObjectLock(key, holder, stale_after() if timeout is None else timeout) if fs.is_remote(key) \
        else _LocalLock(key, holder)
    lock.acquire()
    held[key] = (holder, 1)
    failed = False
    try:
        yield holder
    except BaseException:
        failed = True
        raise
    finally:
        del held[key]
        lost = lock.release()
        if lost and not failed:
            by = lock.lost.describe() if isinstance(lock, _ObjectLock) and lock.lost else "another writer"
            raise LockError(f"{key}: the writer lock was taken over by {by} while {stage} was writing (it was not "
                            f"refreshed for the {STALE_ENV} timeout): the outputs may be mixed; run the stage again")


F = TypeVar("F", bound=Callable[..., Any])


def writes(stage: str, target: Callable[..., str]) -> Callable[[F], F]:
    """Decorate a stage ``fn(ctx, ...)``: hold the writer lock of ``target(ctx, ...)`` while it runs.

    The owner of the lock is the orchestrator task when ``ctx.tags`` names one (``metaflow.run_id``) and
    ``ctx.attempt`` its retry number, so that a retried task takes over from its dead attempt.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def locked(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            uri = target(ctx, *args, **kwargs)
            run = getattr(ctx, "tags", {}).get("metaflow.run_id")
            owner = f"metaflow:{run}:{stage}:{uri}" if run else None
            with writer_lock(uri, stage, owner=owner, attempt=getattr(ctx, "attempt", 0)):
                return fn(ctx, *args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
