"""``python -m bench ITEM [--quick] [--out FILE.json]``: run benchmark items, print tables, write JSON.

Items: overhead (1), breakdown (2), reference (3), cache (4), ingest (5), orchestration (6), models (7), modes (8:
live encoders and reference vs the latent cache vs the cache with precomputed reference errors), or all.
The GPU items run through ``bench/gpu.sh`` (bench/gpu.py). bench/README.md explains every figure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                      ("TOKENIZERS_PARALLELISM", "false"), ("DVC_NO_ANALYTICS", "1")):
    os.environ.setdefault(_name, _value)

from bench.common import flat_figures, format_table, machine_info, timed_section, write_json  # noqa: E402

SCHEMA = "sdpo-bench/1"
ITEMS = ("overhead", "breakdown", "reference", "cache", "ingest", "orchestration", "models", "modes")
SKIPPABLE = (*ITEMS, "sd15")


def _runner(item: str, args: argparse.Namespace) -> Callable[[dict], None]:
    """``fn(results)`` running one item; imports stay inside so ``--help`` is fast."""
    if item == "ingest":
        def run_ingest(results: dict) -> None:
            from bench import bench_ingest

            figures: dict[str, Any] = {}
            bench_ingest.run(figures, args.quick)
            results["ingest"] = figures

        return run_ingest
    if item == "reference":
        from bench import bench_reference

        return lambda results: bench_reference.run(results, args.quick, threads=args.threads)
    if item == "orchestration":
        from bench import bench_orchestration

        return lambda results: bench_orchestration.run(results, args.quick, threads=args.threads)
    if item == "modes":
        from bench import bench_modes

        return lambda results: bench_modes.run(results, args.quick, threads=args.threads,
                                               sizes=tuple(args.size) if args.size else None)
    if item == "models":
        from bench import bench_models

        return lambda results: bench_models.run(results, args.quick, sd15="sd15" not in args.skip)
    module = importlib.import_module(f"bench.bench_{item}")
    return lambda results: module.run(results, args.quick)


HEADLINES: tuple[tuple[str, str], ...] = (
    ("overhead.ratio_sdpo_pair_vs_dpo", "step time, DPO + our pair safeguard / plain DPO (goal <= 1.02)"),
    ("overhead.cpu_time_ratio_sdpo_pair_vs_dpo", "the same in process CPU time (less noisy on a shared CPU)"),
    ("overhead.ratio_reference_vs_dpo", "step time, DPO + reference autograd safeguard / plain DPO"),
    ("overhead.objective_only.added_sdpo_pair_ms", "ms our safeguard adds to the objective"),
    ("breakdown.workers_0.data_loading_share", "data loading share of a step, 0 workers (limit 0)"),
    ("breakdown.workers_1.data_loading_share", "data loading share of a step, 1 worker (limit 0)"),
    ("reference.step_time_lora_vs_frozen", "step time, LoRA (adapters off) / frozen copy"),
    ("reference.peak_rss_rise_lora_vs_frozen", "peak memory rise, LoRA / frozen copy"),
    ("cache.ratio_cached_vs_on_the_fly", "step time, cached latents / on-the-fly encoding"),
    ("ingest.ingest_vs_decode_512_jpg", "ingest 512 px jpg pairs/s / decode-only"),
    ("ingest.ingest_workers_2_vs_1", "ingest pairs/s, 2 workers / 1"),
    ("orchestration.ratio_flow_vs_library", "flow wall time / direct library calls"),
    ("models.sd15_shaped.ratio_sdpo_pair_vs_dpo", "SD1.5-shaped UNet: ours / plain DPO (CPU, indicative)"),
    *((f"modes.{size}.{key}", f"{size}: {meaning}") for size in ("tiny", "toy", "sd15-512-truncated")
      for key, meaning in (("step_time_cached_vs_live", "step time, cached / live encoders + reference"),
                           ("step_time_precomputed_vs_live", "step time, cache + precomputed reference / live"),
                           ("peak_rise_precomputed_vs_live", "peak memory rise, cache + precomputed / live"),
                           ("reference_in_memory_precomputed", "reference weights in memory with precomputed errors"))),
)


def headline_table(results: dict[str, Any]) -> str:
    """The main figures of whatever ran, one a row (reasons where an item was not measured)."""
    flat = dict(flat_figures(results))
    rows: list[tuple[Any, ...]] = [("figure", "value", "meaning")]
    for key, meaning in HEADLINES:
        if key in flat:
            rows.append((key, flat[key], meaning))
        else:
            item = key.rsplit(".", 1)[0]
            reason = flat.get(f"{item}.reason")
            if reason:
                rows.append((key, reason, meaning))
    for family in ("sd15", "sd2", "sdxl", "sd3"):
        key = f"models.families.{family}.step_s_sdpo_pair.median_s"
        if key in flat:
            rows.append((f"models.families.{family}", f"{flat[key]:.4f} s/step, ratio "
                         f"{flat[f'models.families.{family}.ratio_sdpo_pair_vs_dpo']:.3f}", "tiny family on CPU"))
    return format_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run sdpo's benchmark items: print tables of ratios against baselines measured in the same run, "
        "optionally write JSON. bench/README.md explains every figure.",
    )
    parser.add_argument("item", choices=(*ITEMS, "all"), help="which benchmark item to run (all: every item)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke: few rounds, small data, no SD1.5 UNet")
    parser.add_argument("--out", metavar="FILE.json", help="write the results as JSON here (folders are created)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads than idle cores "
                             "make timings erratic)")
    parser.add_argument("--skip", action="append", default=[], choices=SKIPPABLE, metavar="ITEM",
                        help=f"with 'all': leave out an item ({', '.join(SKIPPABLE)}; sd15 = the SD1.5-shaped "
                             "UNet of 'models'); repeatable")
    parser.add_argument("--size", action="append", default=[], metavar="SIZE",
                        help="item 'modes': which sizes (tiny, toy, sd15-512-truncated; default: toy and "
                             "sd15-512-truncated, --quick: tiny); repeatable")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    items = [i for i in ITEMS if i not in args.skip] if args.item == "all" else [args.item]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(),
        "wall": {},
        "results": {},
    }
    start = time.perf_counter()
    for item in items:
        print(f"== {item} ==", flush=True)
        with timed_section(report["wall"], item):
            _runner(item, args)(report["results"])
        print(format_table([("figure", "value"), *flat_figures(report["results"].get(item, {}))]), flush=True)
    report["wall"]["total_s"] = round(time.perf_counter() - start, 1)
    print("\n== summary ==")
    print(headline_table(report["results"]))
    print(f"total wall time {report['wall']['total_s']} s, load average now {machine_info()['load_1min']}")
    if args.out:
        print(f"wrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
