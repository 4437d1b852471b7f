"""Convert an EchoNet-Dynamic root into Parquet shards on any fsspec URI (DATA.md §6).

    python -m trainables.data.shard --echonet-root DIR --out URI [--rows-per-file N] [--s3-endpoint URL]

Layout: ``<out>/{train,val,test}/part-NNNNN.parquet`` and ``<out>/manifest.json``, written last.
One row per video: the AVI's own MJPEG packets for the traced ED..ES segment plus a margin (no
re-encode), the raw tracing rows and the FileList labels. Videos are pre-shuffled with a fixed
seed so that contiguous files approximate a global shuffle.

Re-running is safe: an output whose manifest matches the source and settings is skipped; any
other output is replaced whole (manifest removed first, old parts deleted, manifest last), so a
reader never sees a mix of two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.data import storage
from trainables.data.echonet import EchoNetLayoutError, EchoSample, read_echonet, rejection_code
from trainables.data.mjpeg import decode_gray, read_packets

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MARGIN = 4  # frames kept on each side of ED..ES for temporal jitter
SHUFFLE_SEED = 20260101

SCHEMA = pa.schema([
    ("file_name", pa.string()), ("split", pa.string()), ("fps", pa.float32()), ("n_frames", pa.int32()),
    ("height", pa.int16()), ("width", pa.int16()),
    ("ef", pa.float32()), ("edv", pa.float32()), ("esv", pa.float32()),
    ("ed_frame", pa.int32()), ("es_frame", pa.int32()),
    # Raw X1,Y1,X2,Y2 tracing rows in file order, flattened (21 x 4); landmarks are derived in code.
    ("ed_lines", pa.list_(pa.float64())), ("es_lines", pa.list_(pa.float64())),
    ("win_start", pa.int32()), ("win_jpeg", pa.list_(pa.binary())),
])


class RejectVideo(ValueError):
    """A video found defective while sharding; the message is a rejection reason ``code: detail``."""


def window(sample: EchoSample, margin: int = MARGIN) -> tuple[int, int]:
    """[start, stop) of the frames kept: both traced frames, everything between, and a margin."""
    lo, hi = sorted((sample.ed_frame, sample.es_frame))
    return max(0, lo - margin), min(sample.n_frames, hi + margin + 1)


def _row(sample: EchoSample, margin: int) -> dict:
    packets, _ = read_packets(sample.avi_path)
    if len(packets) != sample.n_frames:
        raise RejectVideo(f"frame_count: {len(packets)} packets on re-read, {sample.n_frames} when probed")
    start, stop = window(sample, margin)
    for i in range(start, stop):
        try:
            img = decode_gray(packets[i])
        except ValueError as exc:
            raise RejectVideo(f"corrupt_frame: frame {i} of {sample.avi_path.name}: {exc}") from None
        if img.shape != (112, 112):
            raise RejectVideo(f"frame_size: frame {i} decodes to {img.shape}")
    return dict(file_name=sample.file_name, split=sample.split, fps=sample.fps, n_frames=sample.n_frames,
                height=112, width=112, ef=sample.ef, edv=sample.edv, esv=sample.esv,
                ed_frame=sample.ed_frame, es_frame=sample.es_frame,
                ed_lines=np.asarray(sample.ed_rows, np.float64).ravel().tolist(),
                es_lines=np.asarray(sample.es_rows, np.float64).ravel().tolist(),
                win_start=start, win_jpeg=packets[start:stop])


def _parquet_bytes(rows: list[dict], row_group_size: int) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    # JPEG bytes are already entropy-coded: no compression, dictionary or statistics for them.
    pq.write_table(table, buf, row_group_size=row_group_size,
                   compression={c: ("NONE" if c == "win_jpeg" else "ZSTD") for c in SCHEMA.names},
                   use_dictionary=["split"], write_statistics=[c for c in SCHEMA.names if c != "win_jpeg"])
    return buf.getvalue()


def _fingerprint(root: Path, params: dict) -> str:
    """Identity of the source and settings: CSV contents, AVI names and sizes, parameters."""
    h = hashlib.sha256(json.dumps({"schema": SCHEMA_VERSION, **params}, sort_keys=True).encode())
    try:
        for name in ("FileList.csv", "VolumeTracings.csv"):
            h.update((root / name).read_bytes())
        for avi in sorted((root / "Videos").glob("*.avi")):
            h.update(f"{avi.name}:{avi.stat().st_size}:{avi.stat().st_mtime_ns}".encode())
    except OSError:
        return ""  # an incomplete root: read_echonet below names what is missing
    return h.hexdigest()


def _existing_manifest(fs, base: str) -> dict | None:
    try:
        manifest = json.loads(fs.cat_file(f"{base}/manifest.json"))
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, or not even UTF-8: treat the output as stale and replace it whole
        return None
    return manifest if isinstance(manifest, dict) else None


def _up_to_date(fs, base: str, manifest: dict | None, fingerprint: str) -> bool:
    if not manifest or manifest.get("source", {}).get("fingerprint") != fingerprint:
        return False
    try:
        return all(fs.size(f"{base}/{f['path']}") == f["size"] for f in manifest["files"])
    except FileNotFoundError:
        return False
    except (KeyError, TypeError):  # a manifest of another shape: replace the output whole
        return False


def _clear(fs, base: str) -> None:
    """Remove a previous run: manifest first (so the set is invalid), then every part file."""
    if fs.exists(f"{base}/manifest.json"):
        fs.rm_file(f"{base}/manifest.json")
    for split in SPLITS:
        for path in fs.glob(f"{base}/{split}/part-*.parquet"):
            fs.rm_file(path)


def write_shards(echonet_root: str | Path, out: str, *, rows_per_file: int = 128, row_group_size: int = 32,
                 margin: int = MARGIN, s3_endpoint: str | None = None, force: bool = False,
                 progress: bool = False) -> dict:
    """Shard ``echonet_root`` to ``out``; returns the manifest (also written to ``out/manifest.json``)."""
    if rows_per_file < 1 or row_group_size < 1:
        raise ValueError("--rows-per-file and --row-group-size must be at least 1")
    root = Path(echonet_root)
    params = dict(rows_per_file=rows_per_file, row_group_size=row_group_size, margin=margin,
                  shuffle_seed=SHUFFLE_SEED)
    try:
        fs, base = storage.open_fs(out, s3_endpoint)
        previous = _existing_manifest(fs, base)
    except Exception as exc:  # botocore/aiohttp errors share no base class with OSError
        raise storage.storage_error(out, s3_endpoint, exc, "open shard output") from exc
    fingerprint = _fingerprint(root, params)
    if fingerprint and not force and _up_to_date(fs, base, previous, fingerprint):
        _log(progress, f"{out}: shards already up to date with {root}; nothing to do (use --force to rewrite)")
        return previous | {"skipped": True}

    bar = _bar(progress, "reading", _count_rows(root))
    samples, rejected = read_echonet(root, progress=bar.update)
    bar.close()
    try:
        manifest = _write_all(fs, base, root, samples, rejected, params, fingerprint, progress)
    except Exception as exc:
        raise storage.storage_error(out, s3_endpoint, exc, "write shards to") from exc
    return manifest


def _write_all(fs, base: str, root: Path, samples: list[EchoSample], rejected: list, params: dict,
               fingerprint: str, progress: bool) -> dict:
    _clear(fs, base)
    margin, rows_per_file, row_group_size = params["margin"], params["rows_per_file"], params["row_group_size"]
    files, counts = [], {s: 0 for s in SPLITS}
    bar = _bar(progress, "sharding", len(samples))
    for split in SPLITS:
        todo = [s for s in samples if s.split == split]
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(todo))
        rows, part = [], 0
        for k, i in enumerate(order):
            try:
                rows.append(_row(todo[i], margin))
            except RejectVideo as exc:
                rejected.append((todo[i].file_name, str(exc)))
            except Exception as exc:  # e.g. the AVI changed since it was probed: still one video's defect
                rejected.append((todo[i].file_name, f"unreadable_avi: {type(exc).__name__}: {exc}"))
            bar.update()
            if rows and (len(rows) == rows_per_file or k == len(order) - 1):
                files.append(_put_part(fs, base, split, part, rows, row_group_size))
                counts[split] += len(rows)
                rows, part = [], part + 1
    bar.close()
    manifest = _manifest(root, params, fingerprint, files, counts, rejected)
    fs.pipe_file(f"{base}/manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _put_part(fs, base: str, split: str, part: int, rows: list[dict], row_group_size: int) -> dict:
    data = _parquet_bytes(rows, row_group_size)
    rel = f"{split}/part-{part:05d}.parquet"
    fs.makedirs(f"{base}/{split}", exist_ok=True)
    fs.pipe_file(f"{base}/{rel}", data)
    groups = [min(row_group_size, len(rows) - i) for i in range(0, len(rows), row_group_size)]
    return dict(path=rel, split=split, rows=len(rows), size=len(data),
                sha256=hashlib.sha256(data).hexdigest(), row_groups=groups)


def _manifest(root: Path, params: dict, fingerprint: str, files: list, counts: dict, rejected: list) -> dict:
    synthetic = root / "synthetic.json"
    return dict(
        schema_version=SCHEMA_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        writer={"echotune": _version(), "pyarrow": pa.__version__},
        source=dict(root_name=root.name, fingerprint=fingerprint,
                    filelist_sha256=hashlib.sha256((root / "FileList.csv").read_bytes()).hexdigest(),
                    synthetic=synthetic.is_file()),
        params=params, splits=counts, files=files,
        rejected=[{"file_name": n, "reason": r} for n, r in rejected],
    )


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("echotune")
    except Exception:
        return "unknown"


def _count_rows(root: Path) -> int | None:
    try:
        with (root / "FileList.csv").open() as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return None


def _bar(enabled: bool, desc: str, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not enabled, file=sys.stderr)


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr)


def summarize_rejections(rejected: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejected:
        code = rejection_code(r["reason"] if isinstance(r, dict) else r[1])
        out[code] = out.get(code, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.data.shard", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--echonet-root", required=True, help="folder with FileList.csv, VolumeTracings.csv, Videos/")
    p.add_argument("--out", required=True, help="output URI: a local folder or s3://bucket/prefix (any fsspec URI)")
    p.add_argument("--rows-per-file", type=int, default=128, help="videos per Parquet file (default 128)")
    p.add_argument("--row-group-size", type=int, default=32, help="videos per row group (default 32)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--force", action="store_true", help="rewrite even if the output is up to date")
    args = p.parse_args(argv)
    try:
        m = write_shards(args.echonet_root, args.out, rows_per_file=args.rows_per_file,
                         row_group_size=args.row_group_size, s3_endpoint=args.s3_endpoint,
                         force=args.force, progress=True)
    except (EchoNetLayoutError, storage.StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not m.get("skipped"):
        size = sum(f["size"] for f in m["files"])
        print(f"wrote {len(m['files'])} files ({size / 1e6:.1f} MB) to {args.out}: "
              + ", ".join(f"{s} {n}" for s, n in m["splits"].items()))
        if m["rejected"]:
            print(f"rejected {len(m['rejected'])} videos: "
                  + ", ".join(f"{c} {n}" for c, n in summarize_rejections(m["rejected"]).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
