"""Benchmarks of the sdpo training path: ratios against baselines measured in the same run (not timed tests).

Run ``python -m bench all --out bench/results/NAME.json`` (or one item, e.g. ``python -m bench overhead --quick``);
``bench/gpu.sh OUTDIR`` runs the GPU items. bench/README.md explains every figure.
"""
