"""Feature-cache benchmark: epoch time with vs without the frozen-prefix cache, side by side.

    python bench/cache.py [--quick] [--encoders echoprime] [--ks 0,4] [--videos N] [--batch B]
                          [--epochs E] [--device cpu|cuda]

For each encoder and k, two trials (``trainables.loop.Trial``, in-process) on the same synthetic
shards with the same seed: one with the feature cache (a fresh cache folder), one without. Epoch 1
of each runs first (the cached arm fills the cache: ``fill_epoch_s``); then epochs 2..E of the two
arms alternate, the order swapped every epoch, so the shared machine's load falls on both. An epoch
is ``train_epoch`` + ``validate`` (validation uses the cache too); each arm's figure is the median
over its epochs >= 2; ``fetch_s`` is the part spent in cache lookups (reads and checksums).
k = "all" trains everything, so the cache does not apply: one arm only.

``ratio`` = cached / uncached epoch time of the first encoder at k = 0 (goal <= 0.05); ``detail``
has every (encoder, k): epoch, train and validation seconds, training samples/s, peak GPU memory
and the cache's hits/misses; k = 4's goal is <= 0.2. ``floor_ratio`` is the cached epoch less its
lookups over the uncached epoch: the trained blocks, head, optimiser and loader, which both arms run,
so no cache, however fast its lookups, goes below it by more than the loader's share (small: it is
part of the whole k = 0 cached epoch). On CPU the default is EchoPrime at its real
input size (16x224x224, resized from 112) on a handful of synthetic videos; ``bench/gpu.sh`` runs it
on a GPU with bf16, a larger batch and PanEcho too. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.config import DataCfg, EncoderCfg, HeadCfg, OptimCfg, TrialConfig  # noqa: E402
from trainables.data.shard import write_shards  # noqa: E402
from trainables.data.synthetic import write_synthetic  # noqa: E402
from trainables.loop import Trial  # noqa: E402

GOAL, GOAL_K4 = 0.05, 0.2


def make_shards(where: Path, n_videos: int) -> str:
    write_synthetic(where, n_videos=n_videos, seed=0, max_frames=32)
    write_shards(where, str(where / "shards"), rows_per_file=16)
    return str(where / "shards")


def make_trial(args, uri: str, cache: Path, encoder: str, k, cached: bool, device: torch.device) -> Trial:
    cfg = TrialConfig(encoder=EncoderCfg(encoder, n_unfrozen=k), head=HeadCfg("mlp"),
                      optim=OptimCfg(base_lr=1e-4),
                      data=DataCfg(uri=uri, cache_dir=str(cache), batch_size=args.batch, feature_cache=cached,
                                   num_workers=args.num_workers),
                      epochs=args.epochs, seed=0, tensorboard=False).validate()
    trial = Trial(cfg, 0, 1, device, report=lambda m, folder: None)
    trial.model.to(device)  # in place: the optimiser keeps the same parameters
    trial.fetch_s = 0.0
    if trial.features is not None:  # time spent in cache lookups (reads, checksums, misses' prefix)
        fetch = trial.features.fetch

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fetch(*a, **kw)
            finally:
                trial.fetch_s += time.perf_counter() - t0
        trial.features.fetch = timed
    return trial


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch(trial: Trial, device: torch.device) -> dict:
    """One epoch as ``Trial.run`` does it (training then validation), timed."""
    trial.set_lr()
    trial.cache_counts, trial.fetch_s = [0, 0], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    trial.train_epoch()
    sync(device)
    t1 = time.perf_counter()
    trial.validate()
    sync(device)
    t2 = time.perf_counter()
    trial.epoch += 1
    return {"epoch_s": t2 - t0, "train_s": t1 - t0, "val_s": t2 - t1, "fetch_s": trial.fetch_s,
            "hits": trial.cache_counts[0],
            "misses": trial.cache_counts[1],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def summary(epochs: list[dict], n_train: int) -> dict:
    med = {k: statistics.median(e[k] for e in epochs) for k in ("epoch_s", "train_s", "val_s", "fetch_s")}
    peaks = [e["peak_mem_gib"] for e in epochs if e["peak_mem_gib"] is not None]
    return {**{k: round(v, 4) for k, v in med.items()}, "samples_per_s": round(n_train / med["train_s"], 2),
            "peak_mem_gib": round(max(peaks), 3) if peaks else None,
            "hits": sum(e["hits"] for e in epochs), "misses": sum(e["misses"] for e in epochs),
            "epochs_s": [round(e["epoch_s"], 3) for e in epochs]}


def compare(args, uri: str, tmp: Path, encoder: str, k, device: torch.device) -> dict:
    arms = {"uncached": make_trial(args, uri, tmp / "no-cache", encoder, k, False, device)}
    if arms["uncached"].core.has_prefix:
        cached = make_trial(args, uri, tmp / f"cache-{encoder}-{k}", encoder, k, True, device)
        arms = {"cached": cached, **arms}
    n_train = len(arms["uncached"].train_ds)
    first = {name: epoch(trial, device) for name, trial in arms.items()}  # the cached arm fills the cache
    seen: dict[str, list[dict]] = {name: [] for name in arms}
    for e in range(1, args.epochs):
        for name in list(arms)[:: 1 if e % 2 else -1]:  # alternate which arm goes first
            seen[name].append(epoch(arms[name], device))
    out = {name: summary(epochs, n_train) | {"fill_epoch_s": round(first[name]["epoch_s"], 3)}
           for name, epochs in seen.items()}
    if "cached" in out:
        out["ratio"] = round(out["cached"]["epoch_s"] / out["uncached"]["epoch_s"], 4)
        out["epoch_pair_ratios"] = [round(c["epoch_s"] / u["epoch_s"], 4)  # each pair ran back to back
                                    for c, u in zip(seen["cached"], seen["uncached"])]
        out["train_ratio"] = round(out["cached"]["train_s"] / out["uncached"]["train_s"], 4)
        # What no cache can remove: the cached epoch less its lookups is the trained blocks, the head,
        # the optimiser and the loader, which the uncached epoch runs as well.
        out["floor_ratio"] = round((out["cached"]["epoch_s"] - out["cached"]["fetch_s"])
                                   / out["uncached"]["epoch_s"], 4)
    else:
        out["ratio"] = None
        out["note"] = "nothing frozen (k = all): the cache does not apply"
    out["trainable_params"], out["train_videos"] = arms["uncached"].trainable, n_train
    del arms
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_k(value: str):
    return value if value == "all" else int(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer videos and epochs (< 5 min on 2 cores)")
    p.add_argument("--encoders", default="echoprime", help="comma-separated; the first gives `ratio`")
    p.add_argument("--ks", default="0,4", help="comma-separated unfrozen-block counts; 'all' runs one arm")
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default 8, quick 6)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="per arm, the first untimed (default 6, quick 4)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (spawned every epoch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    args.videos = args.videos or (6 if args.quick else 8)
    args.epochs = args.epochs or (4 if args.quick else 6)
    if args.epochs < 2:
        p.error("--epochs must be >= 2: epoch 1 fills the cache, later ones are timed")
    device = torch.device(args.device)
    encoders, ks = args.encoders.split(","), [parse_k(k) for k in args.ks.split(",")]
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="echotune-bench-cache-") as tmp:
        uri = make_shards(Path(tmp) / "data", args.videos)
        for encoder in encoders:
            results[encoder] = {}
            for k in ks:
                r = compare(args, uri, Path(tmp), encoder, k, device)
                results[encoder][str(k)] = r
                line = " | ".join(f"{a}: {r[a]['epoch_s']:.3f} s/epoch, {r[a]['samples_per_s']} samples/s"
                                  + (f", peak {r[a]['peak_mem_gib']} GiB" if r[a]["peak_mem_gib"] else "")
                                  for a in ("cached", "uncached") if a in r)
                ratio_text = (f" -> ratio {r['ratio']} (floor {r['floor_ratio']}: the epoch less its lookups)"
                              if r["ratio"] is not None else "")
                print(f"{encoder} k={k}: {line}{ratio_text}", file=sys.stderr, flush=True)
    first = results[encoders[0]]
    ratio = first.get("0", {}).get("ratio")
    k4, k4_floor = first.get("4", {}).get("ratio"), first.get("4", {}).get("floor_ratio")
    detail = {"encoders": encoders, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "input": "16x112x112 clips (encoders resize, EchoPrime/PanEcho to 224x224)",
              "videos": args.videos, "train_videos": next(iter(first.values()))["train_videos"],
              "batch": args.batch, "epochs": args.epochs,
              "timed": "median of epochs >= 2, arms interleaved", "k4_ratio": k4, "goal_k4": GOAL_K4,
              "k4_meets_goal": None if k4 is None else k4 <= GOAL_K4, "k4_floor_ratio": k4_floor,
              "per_encoder": results,
              "quick": args.quick, "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps({"bench": "cache", "ratio": ratio, "goal": GOAL, "detail": detail}))


if __name__ == "__main__":
    main()
