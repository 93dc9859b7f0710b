#!/usr/bin/env bash
# Items 1-4 of the benchmark on one GPU (SD1.5-shaped model, 512 px, bf16) plus MFU, and item 8 (live encoders +
# reference vs latent cache vs precomputed reference errors) at SD1.5 and SDXL shapes; writes OUTDIR/gpu.json.
# Usage: bench/gpu.sh OUTDIR [--cpu-smoke] [--pairs N] [--rounds N] [--budget-s S] [--modes-only]
# PYTHON selects the interpreter (default: python3); it needs CUDA PyTorch and the project installed
# (bench/README.md: bringing the pure-Python dependencies as wheels).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bench/gpu.sh OUTDIR [--cpu-smoke] [--pairs N] [--rounds N] [--budget-s S] [--modes-only]" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu "$@"
