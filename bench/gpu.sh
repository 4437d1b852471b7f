#!/usr/bin/env bash
# GPU checks and benchmarks in one go, for a lent GPU machine (see the device tool), in at most
# ECHOTUNE_GPU_BUDGET_S seconds (default 470, i.e. under 8 minutes) all steps together:
#   bash bench/gpu.sh            # logs, JSON lines and summary.txt under ${OUT:-/tmp/echotune-gpu}
# Steps, in order, each with its own time limit (cut to what is left of the budget):
#   gpu-tests     every gpu-marked test (bf16 steps, memory falling with k, the feature cache in bf16)
#   cache         bench/cache.py: samples/s and peak memory of echoprime and panecho at k in
#                 {0, 4, all}, bf16 autocast, batch 8, with and without the frozen-prefix feature cache
#   loader        bench/loader.py --quick: the shard loader's clips/s on this machine's CPUs
#   step, step-panecho   bench/step.py --quick: per-k step time and peak memory, batch 8
# A failing or timed-out step does not stop the others; summary.txt has one line per step (exit
# status, seconds, its JSON line) and the script exits 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/echotune-gpu}
budget=${ECHOTUNE_GPU_BUDGET_S:-470}
mkdir -p "$out"
: >"$out/summary.txt"
export PYTHONUNBUFFERED=1
start=$SECONDS
failed=0

step() {  # step NAME LIMIT_S CMD...: run CMD for at most min(LIMIT_S, budget left), log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    if ((left < 15)); then
        echo "$name: skipped, the ${budget}s budget is spent" | tee -a "$out/summary.txt"
        failed=$((failed + 1))
        return
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    ((rc != 0)) && failed=$((failed + 1))
    ((rc == 124 || rc == 137)) && echo "[gpu.sh] $name: stopped at its ${limit}s limit" >>"$out/$name.log"
    local last
    last=$(grep '^{"bench"' "$out/$name.log" | tail -1)
    [[ -z $last ]] && last=$(tail -1 "$out/$name.log")
    echo "$name: rc=$rc $((SECONDS - t0))s $last" | tee -a "$out/summary.txt"
}

if [[ ! -x .venv/bin/python ]]; then
    step install 240 make .venv/.echotune-installed
fi
py=.venv/bin/python
[[ -x $py ]] || py=$(command -v python3)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >"$out/gpu.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

step gpu-tests 90 "$py" -m pytest -m gpu -q -p no:cacheprovider tests
step cache 210 "$py" bench/cache.py --device cuda --encoders echoprime,panecho --ks 0,4,all --batch 8 \
    --videos 48 --epochs 4
step loader 60 "$py" bench/loader.py --quick
step step 45 "$py" bench/step.py --device cuda --batch 8 --quick
step step-panecho 45 "$py" bench/step.py --device cuda --encoder panecho --batch 8 --quick

echo "total $((SECONDS - start))s, $failed step(s) failed; logs in $out" | tee -a "$out/summary.txt"
((failed == 0))
