"""Loader benchmark: clips/s of the shard stream vs the EchoNet-style baseline, on the same videos.

    python bench/loader.py [--quick] [--videos N] [--seconds S]

Baseline (what echonet/dynamic's dataset does per item): decode the whole AVI with
cv2.VideoCapture, then take the 16 ED->ES frames. Stream: EchoClipDataset over local shards with
a warm node cache, through a DataLoader with 1 and 2 spawn workers. Worker start-up is excluded:
the clock starts at the first batch and the loader runs several epochs back to back.
Ends with one JSON line; ``ratio`` is the 1-worker stream over the baseline (goal >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.data.echonet import read_echonet  # noqa: E402
from trainables.data.shard import write_shards  # noqa: E402
from trainables.data.stream import EchoClipDataset, ed_es_clip_indices, rank_order  # noqa: E402
from trainables.data.synthetic import write_synthetic  # noqa: E402

GOAL = 10.0


def baseline_clip(avi: Path, ed: int, es: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(avi))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame[..., 0])
    video = np.stack(frames)
    return video[ed_es_clip_indices(ed, es)]


def time_baseline(samples, seconds: float) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    while True:
        for s in samples:
            baseline_clip(s.avi_path, s.ed_frame, s.es_frame)
            n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed, n


def time_stream(ds: EchoClipDataset, workers: int, seconds: float, per_epoch_s: float) -> tuple[float, int]:
    # Enough back-to-back epochs to run ~`seconds` after the first batch.
    epochs = max(2, int(seconds / max(per_epoch_s, 1e-3)) + 1)
    keys = [(e, int(i)) for e in range(epochs) for i in rank_order(len(ds), seed=0, epoch=e)]
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=keys, num_workers=workers,
                                         multiprocessing_context="spawn" if workers else None)
    it = iter(loader)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["file_name"])
    elapsed = time.perf_counter() - t0
    del first
    return n / elapsed, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, under a minute")
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default 96, quick 24)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per path (default 15, quick 4)")
    args = p.parse_args()
    n_videos = args.videos or (24 if args.quick else 96)
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {n_videos} synthetic videos (release-like lengths) ...", file=sys.stderr)
        write_synthetic(tmp / "echonet", n_videos, seed=0)
        write_shards(tmp / "echonet", str(tmp / "shards"))
        samples = [s for s in read_echonet(tmp / "echonet")[0] if s.split == "train"]
        ds = EchoClipDataset(str(tmp / "shards"), "train", cache_dir=tmp / "cache")
        for i in range(len(ds)):  # warm cache and page cache
            ds[i]
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        per_epoch = time.perf_counter() - t0
        base, n_base = time_baseline(samples, seconds)
        print(f"baseline (cv2 full decode + take 16): {base:8.1f} clips/s", file=sys.stderr)
        results = {}
        for workers in (1, 2):
            rate, n = time_stream(ds, workers, seconds, per_epoch)
            results[workers] = rate
            print(f"stream, {workers} worker(s):            {rate:8.1f} clips/s ({rate / base:.1f}x)", file=sys.stderr)
        frames = np.mean([s.n_frames for s in samples])
    detail = {"baseline_clips_per_s": round(base, 1), "stream_1_worker_clips_per_s": round(results[1], 1),
              "stream_2_workers_clips_per_s": round(results[2], 1), "ratio_2_workers": round(results[2] / base, 2),
              "train_videos": len(samples), "mean_frames_per_video": round(float(frames), 1),
              "cpus": os.cpu_count(), "quick": args.quick}
    print(json.dumps({"bench": "loader", "ratio": round(results[1] / base, 2), "goal": GOAL, "detail": detail}))


if __name__ == "__main__":
    main()
