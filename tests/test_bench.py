"""The benchmark suite runs end to end and its baseline is a faithful implementation (no timing assertions)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import bench_orchestration  # noqa: E402
from bench.bench_modes import MODES  # noqa: E402
from bench.common import interleaved_timings, ratio_of_medians  # noqa: E402
from bench.gpu import RESULT_KEYS, peak_bf16_tflops  # noqa: E402
from bench.reference_safeguard import autograd_batch_lambda, reference_dpo_loss  # noqa: E402
from sdpo.objectives import ObjectiveConfig, compute_objective, safeguard_lambda  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}


def _pairs(seed: int, batch: int = 5, shape=(4, 6, 6)):
    """Predictions with winner/loser errors of both alignments, their targets, and reference predictions."""
    g = torch.Generator().manual_seed(seed)
    target_w, target_l = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
    err_w = torch.randn(batch, *shape, generator=g)
    coef = torch.linspace(-1.0, 2.0, batch).reshape(-1, 1, 1, 1)
    err_l = coef * err_w + 0.3 * torch.randn(batch, *shape, generator=g)
    pred = torch.cat([target_w + err_w, target_l + err_l])
    ref_pred = pred + 0.1 * torch.randn(pred.shape, generator=g)
    return pred, ref_pred, target_w, target_l


@pytest.mark.parametrize(("seed", "mu"), [(0, 0.9), (1, 0.5), (2, 0.0), (3, 1.0)])
def test_reference_autograd_lambda_equals_closed_form_batch_mode(seed, mu):
    pred, _, target_w, target_l = _pairs(seed)
    leaf = pred.clone().requires_grad_(True)
    pred_w, pred_l = leaf.chunk(2)
    got = autograd_batch_lambda(pred_w, pred_l, target_w, target_l, mu)
    expected = safeguard_lambda(pred_w - target_w, pred_l - target_l, mu, "batch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_reference_autograd_lambda_is_one_when_errors_are_opposed():
    pred, _, target_w, target_l = _pairs(4)
    err_w = pred[:5] - target_w
    opposed = torch.cat([pred[:5], target_l - err_w]).requires_grad_(True)
    pred_w, pred_l = opposed.chunk(2)
    assert autograd_batch_lambda(pred_w, pred_l, target_w, target_l, mu=0.9).item() == 1.0


def test_reference_loss_and_gradient_match_sdpo_batch_mode():
    pred, ref_pred, target_w, target_l = _pairs(5)
    ours_leaf, theirs_leaf = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    cfg = ObjectiveConfig(method="dpo", safeguard="batch", beta=50.0, mu=0.7)
    pw, pl = ours_leaf.chunk(2)
    rw, rl = ref_pred.chunk(2)
    ours = compute_objective(cfg, pw, target_w, pl, target_l, rw, rl)
    theirs, metrics = reference_dpo_loss(theirs_leaf, ref_pred, target_w, target_l, beta=50.0, mu=0.7)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(theirs, ours.loss)
    torch.testing.assert_close(theirs_leaf.grad, ours_leaf.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(metrics["lambda_mean"], ours.lam)


def test_interleaved_timings_rotate_the_order_and_drop_warmup():
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    cpu: dict[str, list[float]] = {}
    samples = interleaved_timings(variants, rounds=3, warmup=1, cpu_seconds=cpu)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert {k: len(v) for k, v in cpu.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratio_of_medians_interval_contains_the_ratio():
    result = ratio_of_medians([2.0, 2.2, 1.8, 2.1, 1.9], [1.0, 1.1, 0.9, 1.0, 1.0])
    assert result["ratio"] == pytest.approx(2.0)
    low, high = result["ci95"]
    assert low <= result["ratio"] <= high


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 125.0), ("NVIDIA L40S", None),
     ("cpu", None)],
)
def test_peak_bf16_table(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_orchestration_without_a_flow_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_orchestration, "FLOW", bench_orchestration.ROOT / "flows" / "no_such_flow.py")
    result = bench_orchestration.measure(tmp_path, repeats=1)
    assert result == {"measured": False, "reason": "not measured: flow missing (flows/no_such_flow.py)"}
    assert not list(tmp_path.iterdir())


def test_gpu_script_cpu_smoke_writes_documented_keys(tmp_path):
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "out"), "--cpu-smoke"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert set(RESULT_KEYS) <= set(report)
    overhead = report["overhead"]
    for key in ("ratio_sdpo_pair_vs_dpo", "ratio_reference_vs_dpo"):
        assert overhead[key] > 0
    assert set(overhead["step_s"]) == {"dpo", "sdpo_pair", "reference_autograd"}
    assert report["mfu"]["step_tflop"] > 0 and report["mfu"]["mfu"] is None  # no peak for a CPU
    fractions = report["breakdown"]["workers_0"]["fractions"]
    parts = [v for k, v in fractions.items() if k != "policy_forward_backward"]
    assert sum(parts) == pytest.approx(1.0)
    reference = report["reference"]
    assert reference["lora_disabled"]["trainable_params"] < reference["frozen_copy"]["trainable_params"]
    assert reference["frozen_copy"]["peak_rss_mib"] > 0
    assert report["cache"]["ratio_cached_vs_on_the_fly"] > 0
    # item 8 at the tiny SDXL shape (Adafactor + gradient checkpointing), with MFU per mode; the tiny SD1.5 shape is
    # test_modes_quick_writes_documented_keys
    assert set(report["modes"]) == {"tiny-sdxl"}
    modes = report["modes"]["tiny-sdxl"]
    _check_modes(modes)
    for mode in MODES:
        assert modes[mode]["step_flops"] > 0 and modes[mode]["achieved_tflops"] > 0
        assert modes[mode]["mfu"] is None  # no peak for a CPU
    assert modes["gradient_checkpointing"] is True


def _check_modes(modes: dict) -> None:
    """The documented keys of one size of item 8, ratios positive and finite, and what is in memory per mode."""
    for key in ("step_time_cached_vs_live", "step_time_precomputed_vs_live", "peak_rise_cached_vs_live",
                "peak_rise_precomputed_vs_live"):
        assert math.isfinite(modes[key]) and modes[key] > 0, key
    assert modes["encode_s"] > 0 and modes["cache_pairs"] > 0
    for mode in MODES:
        assert modes[mode]["step_s_median"] > 0 and modes[mode]["peak_rss_mib"] > 0
        assert modes[mode]["params"]["denoiser"] > 0
    live, cached, precomputed = (modes[mode] for mode in MODES)
    assert live["encoders_in_memory"] and live["params"]["encoders"] > 0 and live["reference_in_memory"]
    assert not cached["encoders_in_memory"] and cached["reference_in_memory"]
    assert not precomputed["encoders_in_memory"] and not precomputed["reference_in_memory"]
    assert precomputed["params"]["reference"] == 0 and precomputed["precomputed_reference"]
    assert modes["reference_in_memory_precomputed"] is False


def test_modes_quick_writes_documented_keys(tmp_path):
    out = tmp_path / "modes.json"
    done = subprocess.run([sys.executable, "-m", "bench", "modes", "--quick", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    _check_modes(report["results"]["modes"]["tiny"])
    assert "modes.tiny.step_time_precomputed_vs_live" in done.stdout


def test_overhead_quick_writes_ratio_keys(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, "-m", "bench", "overhead", "--quick", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "sdpo-bench/1" and report["quick"] is True
    assert report["machine"]["cpu_count"] >= 1
    overhead = report["results"]["overhead"]
    for key in ("ratio_sdpo_pair_vs_dpo", "ratio_reference_vs_dpo", "cpu_time_ratio_sdpo_pair_vs_dpo",
                "cpu_time_ratio_reference_vs_dpo"):
        assert overhead[key] > 0, key
    assert overhead["objective_only"]["lambda_closed_form_ms"] > 0
    assert "ratio_sdpo_pair_vs_dpo" in done.stdout


def test_flow_task_seconds_from_a_metaflow_log():
    log = "\n".join([
        "2026-11-26 14:25:32.893 Workflow starting (run-id 17):",
        "2026-11-26 14:25:37.417 [17/ingest/2 (pid 27690)] Task is starting.",
        "2026-11-26 14:25:37.431 [17/ingest/3 (pid 27691)] Task is starting.",
        "2026-11-26 14:25:43.291 [17/ingest/3 (pid 27691)] Task finished successfully.",
        "2026-11-26 14:25:43.417 [17/ingest/2 (pid 27690)] Task finished successfully.",
        "2026-11-26 14:25:43.422 [17/end/4 (pid 27718)] Task is starting.",
    ])
    assert bench_orchestration.flow_task_seconds(log) == {"ingest": [5.86, 6.0]}
