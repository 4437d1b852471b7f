"""Record the learning curves of a grid of ``smoke``-like configurations on the synthetic task.

    python bench/record_curves.py [--out bench/data/curves.csv] [--epochs 6] [--only N] [--resume]

Each configuration is trained for real with the project's trainer, in-process and on the CPU
(``trainables.loop.Trial``; no Ray), on the embedded default's data (``search.run.embedded_data``:
120 synthetic EchoNet-format videos) from the ``tiny`` encoder pretrained on the synthetic pretext
task (``trainables.pretrain.ensure_pretrained``), batch 4 (the CPU default of ``search.run``), seed 0.
Every epoch's metrics are written as one CSV row with the configuration's columns; the table is
what ``bench/search.py`` replays through the real Tuner.

Grid (GRID below): n_unfrozen in {0, 1, 2, all} x head in {mlp, gcn} (the scientific cells) x
lr_head in {3e-4, 1e-3, 3e-3} (the ``smoke`` space's range) x aug_strength in {0, 0.5}
= 48 configurations x 6 epochs (6 rather than 8 keeps the recording under 20 minutes on a shared
2-core machine; ASHA with grace 1 and reduction factor 2 still has rungs at 1, 2 and 4).
Everything else is the trainer's default (heads with their default options, AdamW, encoder
stages at base_lr 1e-4, cosine schedule, no weight decay).

How ``bench/data/curves.csv`` was made (2026-12-06, re-recorded once the heads' output started at
the frame centre, trainables/models/heads.py ``start_at_frame_centre``; the table of 2026-11-30 had
heads started at the frame's corner, and its best configuration ended at 4.73 px where this one's
ends at 3.47): ``nice python bench/record_curves.py`` on a shared 2-core CPU machine (torch limited
to 1 thread, a test run beside it for part of the time): 48 configurations x 6 epochs in 595 s
(1-4 s per epoch; the feature cache serves the frozen prefix of k < all at aug 0). The
``seconds`` column is that machine's wall time per epoch (training + validation) under that load:
use it for relative costs only. The metrics do not depend on the load (seed 0, one thread,
deterministic data order). ``--resume`` keeps the rows
already in the CSV and trains only the missing configurations (the recording can be interrupted).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = {
    "n_unfrozen": [0, 1, 2, "all"],
    "head": ["mlp", "gcn"],
    "lr_head": [3e-4, 1e-3, 3e-3],
    "aug_strength": [0.0, 0.5],
}
CONFIG_COLUMNS = ("config_id", "encoder", *GRID)
METRIC_COLUMNS = ("epoch", "val_px_error", "val_px_error_ed", "val_px_error_es", "val_pct_error",
                  "val_dice_ed", "val_dice_es", "val_ef_mae_label", "val_ef_mae_contour", "train_loss",
                  "trainable_params", "encoder_trainable_params", "head_params", "total_params", "seconds")
COLUMNS = CONFIG_COLUMNS + METRIC_COLUMNS
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "curves.csv"


def grid() -> list[dict]:
    """Every configuration, in a stable order (the first parameter varies slowest)."""
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def config_id(params: dict) -> str:
    return f"k{params['n_unfrozen']}-{params['head']}-lr{params['lr_head']:g}-aug{params['aug_strength']:g}"


def trial_config(params: dict, data: str, weights: str, cache_dir: str | None, epochs: int):
    from trainables.config import DataCfg, EncoderCfg, HeadCfg, OptimCfg, TrialConfig

    return TrialConfig(encoder=EncoderCfg("tiny", weights=weights, n_unfrozen=params["n_unfrozen"]),
                       head=HeadCfg(params["head"]), optim=OptimCfg(lr={"head": params["lr_head"]}),
                       data=DataCfg(uri=data, cache_dir=cache_dir, batch_size=4),
                       aug_strength=params["aug_strength"], epochs=epochs, seed=0, tensorboard=False,
                       overlay_videos=0).validate()


def record_one(params: dict, data: str, weights: str, cache_dir: str | None, epochs: int) -> list[dict]:
    """Train one configuration; one row per epoch."""
    import torch

    from trainables.loop import Trial

    rows, clock = [], [time.perf_counter()]

    def report(metrics: dict, _folder) -> None:
        now = time.perf_counter()
        row = {"config_id": config_id(params), "encoder": "tiny", **params}
        for k in METRIC_COLUMNS:
            row[k] = metrics.get(k, "")
        row["seconds"] = round(now - clock[0], 3)
        clock[0] = now
        rows.append(row)
        print(f"  {row['config_id']} epoch {row['epoch']}: val_px_error {row['val_px_error']:.3f} "
              f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    trial = Trial(trial_config(params, data, weights, cache_dir, epochs), 0, 1, torch.device("cpu"), report)
    clock[0] = time.perf_counter()
    trial.run()
    return rows


def fmt(value) -> str:
    if isinstance(value, float):
        return repr(round(value, 6)) if math.isfinite(value) else str(value)
    return str(value)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--only", type=int, default=None, help="record only the first N configurations (timing)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, train the rest")
    p.add_argument("--cache-dir", default=None, help="data and weights cache (default: search.run's)")
    args = p.parse_args(argv)

    import torch

    from search.run import embedded_data
    from trainables.pretrain import ensure_pretrained

    torch.set_num_threads(1)
    data = embedded_data(args.cache_dir)
    weights = str(ensure_pretrained(args.cache_dir))
    configs = grid()[: args.only] if args.only else grid()
    rows = read_rows(args.out) if args.resume else []
    done = {r["config_id"] for r in rows if int(r["epoch"]) == args.epochs}
    rows = [r for r in rows if r["config_id"] in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, params in enumerate(configs):
        if config_id(params) in done:
            continue
        print(f"[{i + 1}/{len(configs)}] {config_id(params)} ({time.perf_counter() - t0:.0f} s so far)",
              file=sys.stderr, flush=True)
        rows += record_one(params, data, weights, args.cache_dir, args.epochs)
        tmp = args.out.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:  # rewritten after every configuration: --resume picks up here
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: fmt(r[k]) if not isinstance(r[k], str) else r[k] for k in COLUMNS})
        tmp.replace(args.out)
    elapsed = time.perf_counter() - t0
    print(f"recorded {len(configs)} configurations x {args.epochs} epochs in {elapsed:.0f} s "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
