"""bench/cache.py end to end on the tiny encoder: both arms run, the cache is filled by the first
epoch and only hit afterwards, and the floor (the cached epoch less its lookups) is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cache.py"


def test_cache_bench_reports_both_arms_and_the_floor():
    run = subprocess.run([sys.executable, str(BENCH), "--encoders", "tiny", "--ks", "0,1,all", "--videos", "4",
                          "--epochs", "2", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["bench"] == "cache" and out["goal"] == 0.05
    per_k = out["detail"]["per_encoder"]["tiny"]
    assert out["ratio"] == per_k["0"]["ratio"] and out["detail"]["k4_ratio"] is None  # no k = 4 asked
    for k in ("0", "1"):
        r = per_k[k]
        assert r["cached"]["misses"] == 0 and r["cached"]["hits"] > 0, r  # epoch 1 filled it
        assert r["uncached"]["hits"] == r["uncached"]["misses"] == 0
        assert 0 < r["floor_ratio"] <= r["ratio"], r
        assert r["ratio"] == round(r["cached"]["epoch_s"] / r["uncached"]["epoch_s"], 4)
    assert per_k["all"]["ratio"] is None and "cached" not in per_k["all"]  # nothing frozen: one arm
    assert "tiny k=0" in run.stderr and "floor" in run.stderr  # progress lines per (encoder, k)
