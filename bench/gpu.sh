#!/usr/bin/env bash
# GPU checks and benchmarks in one go, for a lent GPU machine (see the device tool):
#   bash bench/gpu.sh            # writes logs and JSON lines under ${OUT:-/tmp/echotune-gpu}
# Installs the project into .venv if needed, runs the gpu-marked tests, then the step and loader
# benchmarks; every benchmark's last line is its JSON summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/echotune-gpu}
mkdir -p "$out"
test -x .venv/bin/python || make .venv/.echotune-installed >"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
.venv/bin/python -m pytest -m gpu -q 2>&1 | tee "$out/gpu-tests.log" | tail -5
.venv/bin/python bench/step.py --device cuda --batch 4 2>&1 | tee "$out/step.log" | tail -1
.venv/bin/python bench/step.py --device cuda --encoder panecho --batch 4 2>&1 | tee "$out/step-panecho.log" | tail -1
.venv/bin/python bench/loader.py --quick 2>&1 | tee "$out/loader.log" | tail -1
