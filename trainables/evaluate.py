"""Evaluate a trial checkpoint on a split and write the metrics as JSON.

    python -m trainables.evaluate --checkpoint URI --split test [--data URI] [--out metrics.json]
                                  [--merge-lora [--export merged.pt]]

The checkpoint folder (local or any fsspec URI) holds ``state.pt`` and ``config.json``; the data
URI defaults to the one the trial trained on. ``--merge-lora`` folds a LoRA trial's adapters into
the base weights before evaluating (``"merged_lora"`` in the output says how many modules);
``--export`` then writes the merged model's state dict, whose keys are the plain model's (no
``lora_*``): it loads into a model built with the same encoder and head and no LoRA config.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from trainables.config import TrialConfig
from trainables.data import storage
from trainables.data.shard import SPLITS
from trainables.data.stream import EchoClipDataset, ShardError, make_loader
from trainables.loop import CHECKPOINT_FILE, CONFIG_FILE, STOPPED_FILE, build_model, load_state
from trainables.metrics import LandmarkMetrics
from trainables.models.lora import merge_and_unload


def fetch_checkpoint(uri: str, dest: Path, s3_endpoint: str | None = None) -> Path:
    fs, path = storage.open_fs(uri, s3_endpoint)
    if fs.exists(f"{path}/{STOPPED_FILE}"):
        fs.get_file(f"{path}/{STOPPED_FILE}", str(dest / STOPPED_FILE))
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if name == CHECKPOINT_FILE and (dest / STOPPED_FILE).exists():
            continue
        try:
            fs.get_file(f"{path}/{name}", str(dest / name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no {name}; is this a trial checkpoint folder "
                                    f"(checkpoint_<...> under the Train run)?") from None
    return dest


def load_model(folder: Path, merge_lora: bool = False) -> tuple[torch.nn.Module, TrialConfig, dict, int]:
    """The trial's model with its checkpoint weights, in eval mode; with ``merge_lora`` its LoRA
    adapters folded into the base weights. Returns (model, config, state, modules merged)."""
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; is this a trial checkpoint folder "
                                f"(checkpoint_<...> under the Train run)?")
    cfg = TrialConfig.load(folder / CONFIG_FILE)
    if (folder / STOPPED_FILE).is_file():
        reason = json.loads((folder / STOPPED_FILE).read_text()).get("reason")
        raise ValueError(f"{folder}: this run stopped without a usable model ({reason}); nothing to evaluate")
    if not (folder / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CHECKPOINT_FILE}; is this a trial checkpoint folder "
                                f"(checkpoint_<...> under the Train run)?")
    model, _ = build_model(cfg, load_weights=False)  # the checkpoint holds every weight
    state = load_state(folder / CHECKPOINT_FILE)  # weights_only: no pickled code runs
    model.load_state_dict(state["model"])
    merged = 0
    if merge_lora:
        if cfg.encoder.lora is None:
            raise ValueError(f"{folder}: --merge-lora: this trial has no LoRA adapters (encoder.lora is null)")
        merged = merge_and_unload(model.encoder)
    return model.eval(), cfg, state, merged


@torch.no_grad()
def evaluate(folder: Path, split: str, data_uri: str | None = None, s3_endpoint: str | None = None,
             cache_dir: str | None = None, batch_size: int = 8, merge_lora: bool = False,
             export: str | None = None) -> dict:
    model, cfg, state, merged = load_model(folder, merge_lora)
    if export:
        torch.save(model.state_dict(), export)
    ds = EchoClipDataset(data_uri or cfg.data.uri, split, seed=cfg.seed,
                         s3_endpoint=s3_endpoint or cfg.data.s3_endpoint, cache_dir=cache_dir or cfg.data.cache_dir)
    metrics = LandmarkMetrics()
    for batch in make_loader(ds, batch_size=batch_size, epoch=0, shuffle=False, equal=False):
        metrics.update(model(batch["clip"]), batch["landmarks"], batch["ef"])
    out = {k.replace("val_", f"{split}_"): v for k, v in metrics.compute().items()}
    out |= {"split": split, "epochs_trained": state["next_epoch"], "encoder": cfg.encoder.name,
            "n_unfrozen": cfg.encoder.n_unfrozen, "head": cfg.head.type}
    if cfg.encoder.lora is not None:
        out |= {"lora": asdict(cfg.encoder.lora), "merged_lora": merged}
    return out | ({"exported": export} if export else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder: local path or URI")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--data", default=None, help="shard set URI (default: the trial's)")
    p.add_argument("--out", default=None, help="write the metrics JSON here (default: stdout only)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--cache-dir", default=None, help="node-local shard cache")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapters into the weights first")
    p.add_argument("--export", default=None, help="with --merge-lora: write the merged state dict here")
    args = p.parse_args(argv)
    if args.export and not args.merge_lora:
        p.error("--export writes the merged model: give --merge-lora too")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else \
                fetch_checkpoint(args.checkpoint, Path(tmp), args.s3_endpoint)
            result = evaluate(folder, args.split, args.data, args.s3_endpoint, args.cache_dir,
                              merge_lora=args.merge_lora, export=args.export)
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
