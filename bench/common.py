"""Timing, statistics and reporting shared by the benchmark items.

Every figure is a ratio, or comes with its baseline measured in the same run: variants are interleaved round by
round (the order rotates, so none always runs first), warm-up rounds are dropped, and medians are compared.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Samples = dict[str, list[float]]


def synchronizer(device: Any) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU), for honest wall-clock timings."""
    import torch

    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_timings(
    variants: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    cpu_seconds: Samples | None = None,
) -> Samples:
    """Wall seconds per call of each variant over ``rounds`` rounds; every round runs every variant once.

    The order rotates from round to round (ABC, BCA, CAB, ...) so that drifts of a shared machine hit all variants
    alike. ``warmup`` rounds run first and are not recorded. If ``cpu_seconds`` is given it receives the process CPU
    time of each call too: on a shared CPU that is far less noisy than wall time, since time spent waiting for a
    core is not counted (meaningless on a GPU, where the host waits for the device).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
        sync()
    samples: Samples = {name: [] for name in names}
    cpu = cpu_seconds if cpu_seconds is not None else {}
    for name in names:
        cpu[name] = []
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return samples


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (seconds) of repeated timings, and how many there were."""
    arr = np.asarray(values, dtype=float)
    return {
        "median_s": float(np.median(arr)),
        "p25_s": float(np.percentile(arr, 25)),
        "p75_s": float(np.percentile(arr, 75)),
        "n": len(arr),
    }


def ratio_of_medians(num: Sequence[float], den: Sequence[float], *, boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``median(num) / median(den)`` with a 95% bootstrap interval over rounds (rounds resampled as pairs)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    value = float(np.median(a) / np.median(b))
    if len(a) != len(b) or len(a) < 3:
        return {"ratio": value, "ci95": None}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(boot, len(a)))
    ratios = np.median(a[picks], axis=1) / np.median(b[picks], axis=1)
    return {"ratio": value, "ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]}


def load_average() -> float | None:
    """The 1-minute load average (how busy the shared machine was), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@contextmanager
def timed_section(out: dict[str, Any], name: str) -> Iterator[None]:
    """Record wall seconds and the load average before/after under ``out[name + "_wall_s"]`` etc."""
    before = load_average()
    start = time.perf_counter()
    try:
        yield
    finally:
        out[f"{name}_wall_s"] = round(time.perf_counter() - start, 2)
        out[f"{name}_load_before"] = before
        out[f"{name}_load_after"] = load_average()


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` of ``/proc/self/status`` where there is one.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that maximum across ``exec``, so a worker started by
    ``subprocess`` from a large parent reports the parent's peak (measured here: three workers holding 0.1 to 0.9 GB
    of weights all reported the parent's 2026 MiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB (macOS: bytes)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU count, memory, load, library versions, accelerator."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_1min": load_average(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    """Rows of cells as an aligned text table; the first row is the header."""
    text = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in text) for i in range(len(text[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def flat_figures(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` for every number or string in a nested result dict, with dotted keys."""
    rows: list[tuple[str, Any]] = []
    for key, value in results.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in flat_figures(value)]
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            rows.append((key, "[" + ", ".join(_cell(v) for v in value) + "]"))
        else:
            rows.append((key, value))
    return rows


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
