"""Look at a shard set: what is in it, what was rejected, and whether the labels sit on the ventricle.

    python -m trainables.data.inspect URI [--split S] [--export-npz FILE] [--png DIR]

``--export-npz`` writes the split's items in stream order for seed 0, epoch 0, rank 0 of 1
(arrays ``clip``, ``landmarks``, ``clip_indices``, ``file_name``); ``--png`` draws the ED and ES
frames of a few videos with their 40 landmarks (green ED, red ES), magnified 4x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from trainables.data import storage
from trainables.data.shard import SPLITS, summarize_rejections
from trainables.data.stream import EchoClipDataset, ShardError, ShardSet, rank_order

SCALE = 4


def summary(manifest: dict, uri: str) -> str:
    lines = [f"shard set {uri}", f"  schema {manifest['schema_version']}, created {manifest.get('created', '?')}"]
    if manifest.get("source", {}).get("synthetic"):
        lines.append("  SYNTHETIC data (written by trainables.data.synthetic), not EchoNet-Dynamic")
    size = sum(f["size"] for f in manifest["files"])
    lines.append(f"  {len(manifest['files'])} files, {size / 1e6:.1f} MB")
    for split in SPLITS:
        n_files = sum(f["split"] == split for f in manifest["files"])
        lines.append(f"  {split:5s} {manifest['splits'].get(split, 0):6d} videos in {n_files} files")
    rejected = manifest.get("rejected", [])
    lines.append(f"  rejected {len(rejected)} videos" + (":" if rejected else ""))
    for code, n in summarize_rejections(rejected).items():
        example = next(r for r in rejected if r["reason"].startswith(code))
        lines.append(f"    {code:20s} {n:5d}   e.g. {example['file_name']}: {example['reason']}")
    return "\n".join(lines)


def export_npz(ds: EchoClipDataset, path: str) -> int:
    order = rank_order(len(ds), seed=0, epoch=0, rank=0, world_size=1)
    items = [ds[(0, int(i))] for i in order]
    np.savez_compressed(path, clip=np.stack([it["clip"] for it in items]),
                        landmarks=np.stack([it["landmarks"] for it in items]),
                        clip_indices=np.stack([it["clip_indices"] for it in items]),
                        file_name=np.asarray([it["file_name"] for it in items]))
    return len(items)


def magnify(frame: np.ndarray) -> np.ndarray:
    """A grey 112-px frame as a BGR image SCALE times larger (nearest neighbour)."""
    return cv2.cvtColor(cv2.resize(frame, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST),
                        cv2.COLOR_GRAY2BGR)


def draw_points(big: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Draw the open 40-point contour (normalised coordinates) on a magnified image, in place."""
    # Pixel centres are integer coordinates: pixel x spans [x*S, (x+1)*S) once magnified.
    px = np.round((points * 112 + 0.5) * SCALE).astype(np.int32)
    cv2.polylines(big, [px], False, colour, 1, cv2.LINE_AA)
    for k, (x, y) in enumerate(px):
        cv2.circle(big, (int(x), int(y)), 3 if k in (0, 39) else 2, colour, -1, cv2.LINE_AA)
    return big


def draw_landmarks(frame: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Magnified BGR copy of a grey frame with the landmarks drawn on it."""
    return draw_points(magnify(frame), points, colour)


def write_pngs(ds: EchoClipDataset, out: Path, n: int = 4) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(ds))):
        item = ds[(0, i)]
        ed = draw_landmarks(item["clip"][0], item["landmarks"][0], (0, 220, 0))
        es = draw_landmarks(item["clip"][-1], item["landmarks"][1], (0, 0, 255))
        path = out / f"{item['file_name']}.png"
        cv2.imwrite(str(path), np.hstack([ed, es]))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.data.inspect", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", help="shard set URI (local folder or s3://bucket/prefix)")
    p.add_argument("--split", default="val", choices=SPLITS, help="split for --export-npz / --png (default val)")
    p.add_argument("--export-npz", metavar="FILE", help="write the split's items in stream order to FILE")
    p.add_argument("--png", metavar="DIR", help="draw ED/ES frames with landmarks for a few videos into DIR")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--cache-dir", default=None, help="node-local shard cache (default $ECHOTUNE_CACHE_DIR "
                                                     "or ~/.cache/echotune)")
    args = p.parse_args(argv)
    try:
        shards = ShardSet(args.uri, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir)
        print(summary(shards.manifest, args.uri))
        if args.export_npz or args.png:
            ds = EchoClipDataset(args.uri, args.split, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir)
            if args.export_npz:
                print(f"wrote {export_npz(ds, args.export_npz)} {args.split} items to {args.export_npz}")
            if args.png:
                for path in write_pngs(ds, Path(args.png)):
                    print(f"drew {path}")
    except (ShardError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
