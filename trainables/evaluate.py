"""Evaluate a trial checkpoint on a split and write the metrics as JSON.

    python -m trainables.evaluate --checkpoint URI --split test [--data URI] [--out metrics.json]

The checkpoint folder (local or any fsspec URI) holds ``state.pt`` and ``config.json``; the data
URI defaults to the one the trial trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from trainables.config import TrialConfig
from trainables.data import storage
from trainables.data.shard import SPLITS
from trainables.data.stream import EchoClipDataset, ShardError, make_loader
from trainables.loop import CHECKPOINT_FILE, CONFIG_FILE, build_model
from trainables.metrics import LandmarkMetrics


def fetch_checkpoint(uri: str, dest: Path, s3_endpoint: str | None = None) -> Path:
    fs, path = storage.open_fs(uri, s3_endpoint)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        try:
            fs.get_file(f"{path}/{name}", str(dest / name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no {name}; is this a trial checkpoint folder "
                                    f"(checkpoint_<...> under the Train run)?") from None
    return dest


@torch.no_grad()
def evaluate(folder: Path, split: str, data_uri: str | None = None, s3_endpoint: str | None = None,
             cache_dir: str | None = None, batch_size: int = 8) -> dict:
    cfg = TrialConfig.load(folder / CONFIG_FILE)
    model, _ = build_model(cfg, load_weights=False)  # the checkpoint holds every weight
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)  # our own file
    model.load_state_dict(state["model"])
    model.eval()
    ds = EchoClipDataset(data_uri or cfg.data.uri, split, seed=cfg.seed,
                         s3_endpoint=s3_endpoint or cfg.data.s3_endpoint, cache_dir=cache_dir or cfg.data.cache_dir)
    metrics = LandmarkMetrics()
    for batch in make_loader(ds, batch_size=batch_size, epoch=0, shuffle=False, equal=False):
        metrics.update(model(batch["clip"]), batch["landmarks"], batch["ef"])
    out = {k.replace("val_", f"{split}_"): v for k, v in metrics.compute().items()}
    return out | {"split": split, "epochs_trained": state["next_epoch"], "encoder": cfg.encoder.name,
                  "n_unfrozen": cfg.encoder.n_unfrozen, "head": cfg.head.type}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder: local path or URI")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--data", default=None, help="shard set URI (default: the trial's)")
    p.add_argument("--out", default=None, help="write the metrics JSON here (default: stdout only)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--cache-dir", default=None, help="node-local shard cache")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else \
                fetch_checkpoint(args.checkpoint, Path(tmp), args.s3_endpoint)
            result = evaluate(folder, args.split, args.data, args.s3_endpoint, args.cache_dir)
    except (OSError, ValueError, ShardError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
