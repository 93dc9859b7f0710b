"""Item 6: orchestration overhead, the default flow's wall time vs the same library calls made directly.

Both sides run as fresh processes, each in its own temporary folder (data root, toy-base cache, Metaflow datastore,
MLflow SQLite store), with the same tiny settings as dotted overrides of the default params.yaml:

- ``flow``: ``python flows/sdpo_flow.py run --set "..."`` (``data.root`` in the work folder);
- ``library``: ``python -m bench.bench_orchestration --library DIR --set ...``, which calls the functions of
  :mod:`sdpo.stages` that the flow's steps call, in the flow's order, one after the other in one process.

The figure is ``ratio_flow_vs_library`` (the flow runs its foreach branches in parallel processes; the library
baseline runs them one after the other). ``flow_task_s`` (each Metaflow task's seconds, per step, from the flow's
log) and ``library_call_s`` (each direct call's seconds, grouped by the step it stands for) show where the
difference goes. Without ``flows/sdpo_flow.py`` nothing runs and the item says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "flows" / "sdpo_flow.py"

TINY_OVERRIDES = (
    "data.synthetic.train_pairs=48", "data.synthetic.heldout_pairs=16", "model.toy.vae_steps=5",
    "model.toy.unet_steps=5", "model.toy.batch_size=8", "train.steps=3", "train.batch_size=8",
    "train.heldout_every=3", "train.heldout_pairs=8", "eval.seeds_per_prompt=2", "eval.num_inference_steps=2",
    "eval.bootstrap_samples=50", "registry.model_name=sdpo-bench",
)


def _overrides(workdir: Path) -> list[str]:
    """The tiny settings, with every output (data, toy-base cache) inside ``workdir``."""
    return [*TINY_OVERRIDES, f"data.root={workdir / 'data'}", f"model.toy.cache_dir={workdir / 'toy-cache'}"]


def _environment(workdir: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # the same CPU thread policy for both sides (the flow's steps honour SDPO_NUM_THREADS, torch OMP_NUM_THREADS)
        "OMP_NUM_THREADS": str(threads),
        "SDPO_NUM_THREADS": str(threads),
        "METAFLOW_USER": env.get("METAFLOW_USER", "sdpo-bench"),
        "USERNAME": env.get("USERNAME", "sdpo-bench"),
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(workdir / "metaflow"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    return env


_TASK_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \[\w+/(?P<step>\w+)/(?P<task>\w+) \(pid \d+\)\] "
    r"Task (?P<event>is starting|finished successfully)\.$"
)


def _run_process(command: list[str], workdir: Path, threads: int) -> tuple[float, str]:
    """Wall seconds and stdout of ``command`` run in ``workdir``; RuntimeError with its stderr if it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=_environment(workdir, threads), capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed in {workdir}:\n{done.stderr[-4000:]}")
    return seconds, done.stdout


def flow_task_seconds(log: str) -> dict[str, list[float]]:
    """Seconds of each task per step, from the start/finish lines Metaflow prints (one entry per foreach branch)."""
    started: dict[str, datetime] = {}
    seconds: dict[str, list[float]] = {}
    for line in log.splitlines():
        match = _TASK_LINE.match(line.strip())
        if not match:
            continue
        stamp = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S.%f")
        key = f"{match['step']}/{match['task']}"
        if match["event"] == "is starting":
            started[key] = stamp
        elif key in started:
            seconds.setdefault(match["step"], []).append(round((stamp - started.pop(key)).total_seconds(), 2))
    return seconds


def flow_command(workdir: Path) -> list[str]:
    return [sys.executable, str(FLOW), "run", "--set", " ".join(_overrides(workdir))]


def library_command(workdir: Path) -> list[str]:
    command = [sys.executable, "-m", "bench.bench_orchestration", "--library", str(workdir / "run")]
    for item in _overrides(workdir):
        command += ["--set", item]
    return command


def run_library_sequence(root: Path, overrides: list[str]) -> dict[str, list[float]]:
    """The flow's steps as direct calls of :mod:`sdpo.stages`, sequentially, with ``data.root`` at ``root``.

    Returns the seconds of each call, grouped by the flow step it stands for.
    """
    from sdpo import stages
    from sdpo.layout import BASE_ARM

    seconds: dict[str, list[float]] = {}

    def timed(step: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds.setdefault(step, []).append(round(time.perf_counter() - start, 2))
        return value

    ctx = timed("start", stages.StageContext.load, ROOT / "params.yaml", [*overrides, f"data.root={root}"])
    parts: dict[str, list[str]] = {}
    for item in timed("start", stages.ingest_plan, ctx):
        if item["synthetic"]:
            timed("ingest", stages.synth, ctx, item["split"])
        parts.setdefault(item["split"], []).append(timed("ingest", stages.ingest_part, ctx, item))
    for split, uris in parts.items():
        timed("join_ingest", stages.publish_split, ctx, split, uris)
    base = timed("base", stages.base, ctx)["uri"]
    for arm in ctx.cfg.train.variants:
        timed("train", stages.train, ctx, arm, base=base, overwrite=True)
    for arm in [*ctx.cfg.train.variants, BASE_ARM]:
        timed("evaluate", stages.evaluate, ctx, arm, base=base)
    for arm in ctx.cfg.train.variants:
        timed("compare", stages.compare, ctx, arm)
    timed("register", stages.register, ctx)
    timed("register", stages.promote, ctx)
    return seconds


def measure(work: Path, *, repeats: int, threads: int = 1) -> dict[str, Any]:
    """Alternate flow and library runs ``repeats`` times; medians and their ratio."""
    from bench.common import median

    if not FLOW.is_file():
        return {"measured": False, "reason": f"not measured: flow missing ({FLOW.relative_to(ROOT)})"}
    flow, library = [], []
    for r in range(repeats):
        seconds, log = _run_process(flow_command(work / f"flow-{r}"), work / f"flow-{r}", threads)
        flow.append(seconds)
        flow_tasks = flow_task_seconds(log)
        seconds, log = _run_process(library_command(work / f"library-{r}"), work / f"library-{r}", threads)
        library.append(seconds)
        library_calls = json.loads(log.strip().splitlines()[-1])
    return {
        "measured": True,
        "overrides": list(TINY_OVERRIDES),
        "torch_threads_per_process": threads,
        "flow_wall_s": flow,
        "library_wall_s": library,
        "ratio_flow_vs_library": median(flow) / median(library),
        "flow_overhead_s": median(flow) - median(library),
        "flow_task_s": flow_tasks,
        "library_call_s": library_calls,
    }


def run(out: dict, quick: bool, threads: int = 1) -> None:
    """Stores ``out["orchestration"]``."""
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        out["orchestration"] = measure(Path(tmp), repeats=1, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description="the pipeline as direct library calls (the flow's baseline)")
    parser.add_argument("--library", required=True, metavar="DIR", help="run folder: shards, models, evaluations")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the repository's params.yaml (repeatable)")
    args = parser.parse_args()
    print(json.dumps(run_library_sequence(Path(args.library).resolve(), args.overrides)))


if __name__ == "__main__":
    main()
