"""One place for what the libraries print: loading progress bars, known-harmless warnings, and sdpo's own progress.

``configure_logging()`` is called by the ``sdpo`` command (``--verbose``) and at the top of every flow step.
``SDPO_LOG_LEVEL=DEBUG|INFO`` (or ``verbose=True``) keeps the libraries' bars and warnings.
:func:`progress` is the one progress bar of a long stage: a live bar on a terminal, one plain line every
``PROGRESS_INTERVAL_S`` seconds in a log (Metaflow, CI), where a carriage-return bar would arrive as one huge line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

PROGRESS_INTERVAL_S = 30.0
_configured: bool | None = None


def verbose_from_env() -> bool:
    return os.environ.get("SDPO_LOG_LEVEL", "").upper() in {"DEBUG", "INFO"}


def configure_logging(verbose: bool | None = None) -> bool:
    """Quiet the libraries' loading bars and known-harmless warnings unless ``verbose``; returns ``verbose``.

    Idempotent and cheap: the libraries it touches are configured only if they are installed.
    """
    global _configured
    verbose = verbose_from_env() if verbose is None else verbose
    if _configured is verbose:
        return verbose
    _configured = verbose
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return verbose
    # Read when MLflow downloads artifacts ("Downloading artifacts" bar on every model/pipeline fetch).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "Writing model shards" / "Loading weights" bars of huggingface_hub and transformers.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _filter_known_warnings()
    # On import, not now: importing diffusers costs seconds (torch with it), and the flow's light steps (start,
    # ingest, compare, end) never load a model. wrapt runs a hook at once when the library is already imported.
    import wrapt

    wrapt.register_post_import_hook(_quiet_diffusers, "diffusers")
    wrapt.register_post_import_hook(_quiet_transformers, "transformers")
    return verbose


def _quiet_diffusers(_module: Any) -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components"
    diffusers_logging.set_verbosity_error()


def _quiet_transformers(_module: Any) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights"
    transformers_logging.set_verbosity_error()


def _filter_known_warnings() -> None:
    """Warnings that say nothing about this run, each matched by module and message."""
    # torchvision is deliberately not installed: transformers falls back to the PIL image processors, which is what
    # sdpo uses anyway (diffusers' pipelines import CLIPImageProcessor at import time, before sdpo can choose).
    warnings.filterwarnings("ignore", message=r".*requires torchvision.*", module=r"transformers(\.|$)")


def is_interactive(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _LineBar:
    """A tqdm-compatible bar for logs: one ``desc: n/total (rate)`` line at most every ``interval`` seconds,
    and one at the end."""

    def __init__(self, total: int | None, desc: str, initial: int, interval: float, stream: Any) -> None:
        import time

        self._time = time.monotonic
        self.total, self.desc, self.n, self.interval, self.stream = total, desc, initial, interval, stream
        self._start = self._last = self._time()
        self._start_n = self._emitted_n = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._time()
        if now - self._last >= self.interval or (self.total is not None and self.n >= self.total):
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def write(self, s: str) -> None:
        print(s, file=self.stream, flush=True)

    def _emit(self, now: float) -> None:
        self._last, self._emitted_n = now, self.n
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        total = f"/{self.total}" if self.total is not None else ""
        extra = f" [{self._postfix}]" if self._postfix else ""
        print(f"{self.desc}: {self.n}{total} ({rate:.2f} it/s, {elapsed:.0f}s){extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._emitted_n:
                self._emit(self._time())

    def __enter__(self) -> _LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoBar(_LineBar):
    def __init__(self, total: int | None = None, initial: int = 0) -> None:
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, *, initial: int = 0, disable: bool = False,
             interval: float | None = None, stream: Any = None):
    """The progress bar of a long stage: tqdm on a terminal, periodic one-line updates otherwise.

    ``interval``: seconds between log lines when not interactive (default ``SDPO_PROGRESS_INTERVAL`` or 30).
    """
    if disable:
        return _NoBar(total, initial)
    stream = sys.stderr if stream is None else stream
    if is_interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)
    if interval is None:
        interval = float(os.environ.get("SDPO_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
    return _LineBar(total, desc, initial, interval, stream)
