"""Pretrain the ``tiny`` encoder once on a *different* synthetic task, so that the embedded default
has a foundation model of its own: frozen, selective and full fine-tuning then start from useful
but imperfect features and differ meaningfully, as they do for EchoPrime and PanEcho.

Pretext task: from a clip, regress EF and the ventricle's centroid and area at ED and ES (seven
numbers) on synthetic videos of another seed than the demo data - not the 80 landmark points.

    python -m trainables.pretrain [--out FILE]   (default: <cache>/tiny-pretrained-v1.pt)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from trainables.data.stream import EchoClipDataset, default_cache_dir, make_loader

VERSION = 1
SEED = 9001


def pretrained_path(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"tiny-pretrained-v{VERSION}.pt"


def pretext_targets(landmarks: torch.Tensor, ef: torch.Tensor) -> torch.Tensor:
    """(B, 2, 40, 2) landmarks and EF -> (B, 7): EF/100, centroid x/y and area at ED and ES."""
    x, y = landmarks[..., 0], landmarks[..., 1]
    area = 0.5 * (x * torch.roll(y, -1, -1) - y * torch.roll(x, -1, -1)).sum(-1).abs()  # (B, 2)
    centroid = landmarks.mean(2)  # (B, 2, 2)
    return torch.cat([ef[:, None] / 100, centroid.flatten(1), area * 10], 1).float()


def pretrain(out: Path, n_videos: int = 96, epochs: int = 8, progress: bool = True) -> Path:
    from trainables.data.shard import write_shards
    from trainables.data.synthetic import write_synthetic
    from trainables.models.encoders import build_encoder

    torch.manual_seed(SEED)
    encoder = build_encoder("tiny")
    probe = torch.nn.Linear(encoder.embed_dim, 7)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=1e-3)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp) / "echonet", n_videos, seed=SEED, max_frames=36)
        write_shards(Path(tmp) / "echonet", str(Path(tmp) / "shards"))
        ds = EchoClipDataset(str(Path(tmp) / "shards"), "train", seed=SEED, cache_dir=Path(tmp) / "cache")
        for epoch in range(epochs):
            losses = []
            for batch in make_loader(ds, batch_size=4, epoch=epoch):
                loss = F.mse_loss(probe(encoder(batch["clip"])), pretext_targets(batch["landmarks"], batch["ef"]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if progress:
                print(f"pretraining tiny encoder: epoch {epoch + 1}/{epochs} loss {np.mean(losses):.4f} "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    torch.save(encoder.state_dict(), tmp_out)
    os.replace(tmp_out, out)
    return out


def ensure_pretrained(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The cached pretrained tiny weights, made on first use (one process at a time)."""
    path = pretrained_path(cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            pretrain(path, progress=progress)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="weights file (default: the cache's tiny-pretrained file)")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args(argv)
    out = pretrain(Path(args.out) if args.out else pretrained_path(), epochs=args.epochs)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
