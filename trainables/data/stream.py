"""Stream landmark clips from shards: node-local cache, deterministic rank-sharded order, exact resume.

Inside a Ray Train worker::

    ds = EchoClipDataset("s3://bucket/echonet/v1", "train", seed=cfg.seed)
    loader = make_loader(ds, batch_size=8, epoch=epoch, rank=ctx.get_world_rank(),
                         world_size=ctx.get_world_size(), start_step=step, num_workers=2)

* Cache: each shard is downloaded once per node into ``cache_dir`` (default ``$ECHOTUNE_CACHE_DIR`` or
  ``~/.cache/echotune``), content-addressed by its manifest sha256, under a file lock, renamed into
  place only after the checksum matches; every trial on the node shares it. It is then converted
  to an uncompressed Arrow IPC file that is memory-mapped, so random access costs no copy. The
  .arrow file's size and sha256 go into ``<sha256>.arrow.json`` when it is written and are checked
  the first time a process maps it; a damaged entry is reported (``CacheWarning`` naming the shard),
  removed and fetched again.
* Order: epoch e is the permutation ``rng(seed, e)`` of the split, dealt round-robin to ranks and cut
  to equal lengths (training) or kept whole (evaluation, so every video is scored once).
* Per-sample randomness: ``rng(seed, epoch, crc32(file_name))``, so a sample's clip does not depend
  on rank, world size, worker count or resume point; resuming at (epoch, step) skips indices, no I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Callable

import filelock
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock

from trainables.data import storage
from trainables.data.echonet import FRAME_SIZE, ROWS_PER_FRAME, rows_to_points
from trainables.data.mjpeg import decode_gray
from trainables.data.shard import SCHEMA_VERSION, SPLITS

CLIP_LEN = 16
LABEL_COLUMNS = ("file_name", "fps", "n_frames", "ef", "ed_frame", "es_frame", "ed_lines", "es_lines", "win_start")
LOCK_TIMEOUT_S = 600


class ShardError(RuntimeError):
    """A shard set is incomplete, corrupt or of an unknown schema; the message names the file."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ECHOTUNE_CACHE_DIR") or Path.home() / ".cache" / "echotune")


# ---------------------------------------------------------------------------------------------
# Pure functions: order and clip indices
# ---------------------------------------------------------------------------------------------

def rank_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               shuffle: bool = True, equal: bool = True) -> np.ndarray:
    """Indices of the split that ``rank`` visits in ``epoch``, in order.

    ``equal=True`` (training) cuts every rank to ``n // world_size`` items so DDP ranks run the
    same number of steps; the dropped tail changes every epoch with the permutation.
    ``equal=False`` (evaluation) keeps all: ranks are disjoint and cover the split.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = perm[rank::world_size]
    return mine[: n // world_size] if equal else mine


def ed_es_clip_indices(ed: int, es: int, n: int = CLIP_LEN) -> np.ndarray:
    """``round(linspace(ed, es, 16))``: index 0 = ED, 15 = ES; runs backwards when ES precedes ED."""
    return np.round(np.linspace(ed, es, n)).astype(np.int64)


def sample_rng(seed: int, epoch: int, file_name: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(file_name.encode())])


# ---------------------------------------------------------------------------------------------
# Shard set: manifest + node-local verified cache
# ---------------------------------------------------------------------------------------------

class ShardSet:
    """The manifest of a shard URI and verified local copies of its files."""

    def __init__(self, uri: str, *, s3_endpoint: str | None = None, cache_dir: str | Path | None = None):
        self.uri, self.s3_endpoint = str(uri).rstrip("/"), s3_endpoint
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.manifest = self._load_manifest()

    def _fs(self):
        return storage.open_fs(self.uri, self.s3_endpoint)

    def _load_manifest(self) -> dict:
        where = storage.describe(self.uri, self.s3_endpoint)
        try:
            fs, base = self._fs()
            raw = fs.cat_file(f"{base}/manifest.json")
        except FileNotFoundError:
            raise ShardError(f"{where}: no manifest.json - not a shard set, or sharding did not finish; "
                             f"run python -m trainables.data.shard --echonet-root DIR --out {self.uri}") from None
        except Exception as exc:
            raise storage.storage_error(self.uri, self.s3_endpoint, exc, "read shard manifest from") from exc
        try:
            manifest = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8 at all
            raise ShardError(f"{where}/manifest.json is not valid JSON ({exc}); re-run the shard command") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise ShardError(f"{where}/manifest.json has schema_version {version!r}; this echotune reads "
                             f"{SCHEMA_VERSION}. Re-shard with this version.")
        problem = _manifest_problem(manifest)
        if problem:
            raise ShardError(f"{where}/manifest.json is damaged: {problem}; re-run the shard command")
        return manifest

    def files(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return [f for f in self.manifest["files"] if f["split"] == split]

    def local_arrow(self, entry: dict) -> Path:
        """Verified, memory-mappable local copy of one manifest file (downloaded once per node).

        The first call in a process checks the cached file's size and sha256 against its sidecar;
        a damaged or unrecorded entry is reported (CacheWarning naming the shard), removed and
        fetched again under the entry's file lock.
        """
        objects = self.cache_dir / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        arrow = objects / f"{entry['sha256']}.arrow"
        if _still_verified(arrow):
            return arrow
        if arrow.exists() and not _check_arrow(arrow, entry):
            _mark_verified(arrow)
            return arrow
        with self._lock(objects, entry):
            if arrow.exists():  # another trial on this node may have finished or repaired it meanwhile
                problem = _check_arrow(arrow, entry)
                if not problem:
                    _mark_verified(arrow)
                    return arrow
                self._discard(arrow, entry, problem)
            self._fill(arrow, entry, objects)
        _mark_verified(arrow)
        return arrow

    @contextlib.contextmanager
    def _lock(self, objects: Path, entry: dict):
        lock = FileLock(str(objects / f"{entry['sha256']}.lock"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except filelock.Timeout:
            raise ShardError(f"waited {LOCK_TIMEOUT_S} s for {lock.lock_file}, held by another process "
                             f"filling the cache with shard {self.uri}/{entry['path']}; if no other "
                             f"echotune runs on this node, delete that file and re-run") from None
        try:
            yield
        finally:
            lock.release()

    def _discard(self, arrow: Path, entry: dict, problem: str) -> None:
        warnings.warn(f"damaged cache entry for shard {self.uri}/{entry['path']}: {arrow} {problem}; "
                      f"removing it and fetching the shard again", CacheWarning, stacklevel=3)
        arrow.unlink(missing_ok=True)
        _sidecar(arrow).unlink(missing_ok=True)

    def _fill(self, arrow: Path, entry: dict, objects: Path) -> None:
        """Download, verify and convert one shard; the sidecar goes in before the .arrow file, so
        an .arrow in place always has its record (a crash leaves at most a stale sidecar)."""
        parquet = self._download(entry, objects)
        tmp = arrow.with_suffix(f".arrow.tmp{os.getpid()}")
        table = self._read_parquet(parquet, entry).combine_chunks()
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        record = {"size": tmp.stat().st_size, "sha256": _sha256(tmp), "parquet_sha256": entry["sha256"],
                  "shard": entry["path"]}
        side_tmp = _sidecar(arrow).with_suffix(f".json.tmp{os.getpid()}")
        side_tmp.write_text(json.dumps(record))
        os.replace(side_tmp, _sidecar(arrow))
        os.replace(tmp, arrow)
        parquet.unlink()

    def _download(self, entry: dict, objects: Path) -> Path:
        final = objects / f"{entry['sha256']}.parquet"
        if final.exists() and not _verify(final, entry):  # left by a run that died while converting
            return final
        final.unlink(missing_ok=True)
        remote = f"{self.uri}/{entry['path']}"
        tmp = objects / f"{entry['sha256']}.parquet.tmp{os.getpid()}"
        try:
            problem = ""
            for _attempt in range(2):  # one re-download absorbs a transfer that went wrong in flight
                self._get(entry, remote, tmp)
                problem = _verify(tmp, entry)
                if not problem:
                    os.replace(tmp, final)
                    return final
        finally:
            tmp.unlink(missing_ok=True)  # a failed or half-done transfer leaves nothing behind
        raise ShardError(f"corrupt shard {storage.describe(remote, self.s3_endpoint)}: {problem}. "
                         f"Re-run the shard command to rewrite the set.")

    def _get(self, entry: dict, remote: str, dest: Path) -> None:
        try:
            fs, base = self._fs()
            fs.get_file(f"{base}/{entry['path']}", str(dest))
        except FileNotFoundError:
            raise ShardError(f"{storage.describe(remote, self.s3_endpoint)}: listed in manifest.json "
                             f"but missing from the store") from None
        except Exception as exc:
            raise storage.storage_error(remote, self.s3_endpoint, exc, "download shard") from exc

    def _read_parquet(self, path: Path, entry: dict) -> pa.Table:
        try:
            table = pq.read_table(path, columns=list(LABEL_COLUMNS) + ["win_jpeg"])
        except Exception as exc:
            raise ShardError(f"shard {self.uri}/{entry['path']} does not read as Parquet: {exc}") from None
        if table.num_rows != entry["rows"]:
            raise ShardError(f"shard {self.uri}/{entry['path']}: {table.num_rows} rows, manifest says {entry['rows']}")
        return table


MANIFEST_FILE_KEYS = {"path": str, "split": str, "rows": int, "size": int, "sha256": str}


def _manifest_problem(manifest: dict) -> str:
    """'' when every file entry has the fields the loader needs, else what is wrong (first one)."""
    files = manifest.get("files")
    if not isinstance(files, list):
        return "no 'files' list"
    for k, f in enumerate(files):
        for key, kind in MANIFEST_FILE_KEYS.items():
            if not isinstance(f, dict) or not isinstance(f.get(key), kind):
                return f"files[{k}] has no valid {key!r}"
        if f["split"] not in SPLITS:
            return f"files[{k}] ({f['path']}) has unknown split {f['split']!r}"
    return ""


def _verify(path: Path, entry: dict) -> str:
    """'' when ``path`` matches the manifest entry, else what is wrong."""
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{size} bytes, manifest says {entry['size']} (truncated or replaced)"
    digest = _sha256(path)
    if digest != entry["sha256"]:
        return f"sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}... (checksum mismatch)"
    return ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cache self-check: <sha256>.arrow is recorded in <sha256>.arrow.json (size, sha256) when it is
# written, and checked against it the first time a process maps it.
# ---------------------------------------------------------------------------------------------

class CacheWarning(UserWarning):
    """A node-cache entry was damaged (or unrecorded) and is being fetched again."""


# path -> (size, mtime_ns, inode) of the file when this process checked it: later opens in the
# process only stat it, and spawned DataLoader workers inherit the record with the dataset.
_VERIFIED: dict[str, tuple[int, int, int]] = {}


def _sidecar(arrow: Path) -> Path:
    return arrow.with_name(arrow.name + ".json")


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _still_verified(arrow: Path) -> bool:
    key = _VERIFIED.get(str(arrow))
    return key is not None and key == _stat_key(arrow)


def _mark_verified(arrow: Path) -> None:
    _VERIFIED[str(arrow)] = _stat_key(arrow)


def _check_arrow(arrow: Path, entry: dict | None = None) -> str:
    """'' when ``arrow`` matches the size and sha256 recorded next to it, else what is wrong."""
    try:
        record = json.loads(_sidecar(arrow).read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "has no size/checksum record (written by an older echotune, or its writer was killed)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"has an unreadable size/checksum record {_sidecar(arrow).name} ({type(exc).__name__})"
    if entry is not None and record.get("parquet_sha256", entry["sha256"]) != entry["sha256"]:
        return "is recorded as another shard's copy"
    try:
        found = arrow.stat().st_size
        if found != size:
            return f"is {found} bytes, {size} when written (truncated or overwritten)"
        if _sha256(arrow) != digest:
            return "does not match the sha256 recorded when it was written (bit rot or overwritten)"
    except FileNotFoundError:  # another process is replacing it: the caller re-checks under the lock
        return "disappeared while being checked"
    return ""


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

class _Packets:
    """Zero-copy view of one memory-mapped file's ``win_jpeg`` column."""

    def __init__(self, path: Path):
        batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
        col = batch.column(batch.schema.get_field_index("win_jpeg"))
        self.row_offsets = col.offsets.to_numpy()
        _, offsets, data = col.values.buffers()  # BinaryArray: validity, int32 offsets, bytes
        self.value_offsets = np.frombuffer(offsets, np.int32)
        self.data = np.frombuffer(data, np.uint8)

    def packet(self, row: int, k: int) -> np.ndarray:
        j = self.row_offsets[row] + k
        return self.data[self.value_offsets[j]:self.value_offsets[j + 1]]


class EchoClipDataset(torch.utils.data.Dataset):
    """16-frame ED->ES clips with their landmarks, read from a shard URI.

    Items are keyed ``(epoch, index)`` (a plain ``index`` means epoch 0) and are dicts with
    ``clip`` uint8 (16, 112, 112) (0 = ED, 15 = ES), ``landmarks`` float32 (2, 40, 2) in [0, 1]
    (frame ED/ES, point, x/y), ``clip_indices`` int64 (16,), ``reversed`` (ES precedes ED),
    ``file_name`` and ``ef``. ``clip_fn(ed, es, rng)`` may replace the clip rule (temporal
    jitter); ``transform(item, rng)`` may change the item (augmentation); both get the sample's rng.
    """

    def __init__(self, uri: str, split: str, *, seed: int = 0, s3_endpoint: str | None = None,
                 cache_dir: str | Path | None = None, clip_fn: Callable | None = None,
                 transform: Callable | None = None):
        shards = ShardSet(uri, s3_endpoint=s3_endpoint, cache_dir=cache_dir)
        self.uri, self.split, self.seed = shards.uri, split, seed
        self.clip_fn, self.transform = clip_fn, transform
        entries = shards.files(split)
        self.paths = [shards.local_arrow(e) for e in entries]
        self.shard_names = [f"{shards.uri}/{e['path']}" for e in entries]
        self.verified = {str(p): _VERIFIED[str(p)] for p in self.paths}  # travels to spawned workers
        self.synthetic = bool(shards.manifest.get("source", {}).get("synthetic"))
        self._load_labels()
        self._packets: list[_Packets] | None = None

    def _load_labels(self) -> None:
        cols: dict[str, list] = {c: [] for c in LABEL_COLUMNS}
        where = []
        for k, path in enumerate(self.paths):
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            for c in LABEL_COLUMNS:
                cols[c].extend(table.column(c).to_pylist())
            where.extend((k, r) for r in range(table.num_rows))
        self.where = np.asarray(where, np.int64).reshape(-1, 2)
        self.file_names = np.asarray(cols["file_name"], dtype=object)
        for c in ("n_frames", "ed_frame", "es_frame", "win_start"):
            setattr(self, c, np.asarray(cols[c], np.int64))
        self.ef = np.asarray(cols["ef"], np.float32)
        self.ed_rows = np.asarray(cols["ed_lines"], np.float64).reshape(-1, ROWS_PER_FRAME, 4)
        self.es_rows = np.asarray(cols["es_lines"], np.float64).reshape(-1, ROWS_PER_FRAME, 4)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_packets"] = None  # memory maps are reopened in each DataLoader worker
        return state

    def __len__(self) -> int:
        return len(self.file_names)

    def _open_packets(self) -> list[_Packets]:
        # A spawned worker trusts a file that is still the one the dataset's process verified
        # (same size, mtime and inode); anything else is checked again before it is mapped.
        for path, shard in zip(self.paths, self.shard_names):
            if _stat_key(path) == self.verified.get(str(path)) or _still_verified(path):
                continue
            problem = _check_arrow(path) if path.exists() else "is missing"
            if problem:
                raise ShardError(f"cache file {path} of shard {shard} changed after it was verified: "
                                 f"{problem}. Re-run: the next start fetches the shard again.")
            _mark_verified(path)
        return [_Packets(p) for p in self.paths]

    def landmarks(self, i: int) -> np.ndarray:
        """(2, 40, 2) float32: ED then ES, landmarks normalised by the 112-px frame size."""
        pts = np.stack([rows_to_points(self.ed_rows[i]), rows_to_points(self.es_rows[i])])
        return (pts / FRAME_SIZE).astype(np.float32)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if self._packets is None:
            self._packets = self._open_packets()
        name = self.file_names[i]
        rng = sample_rng(self.seed, epoch, name)
        ed, es = int(self.ed_frame[i]), int(self.es_frame[i])
        idx = self.clip_fn(ed, es, rng) if self.clip_fn else ed_es_clip_indices(ed, es)
        f, row = self.where[i]
        packets = self._packets[f]
        clip = np.stack([decode_gray(packets.packet(row, int(t) - self.win_start[i])) for t in idx])
        item = dict(clip=clip, landmarks=self.landmarks(i), clip_indices=np.asarray(idx, np.int64),
                    reversed=es < ed, file_name=name, ef=self.ef[i])
        return self.transform(item, rng) if self.transform else item


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys of one rank's share of one epoch, from position ``start``."""

    def __init__(self, n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True, equal: bool = True):
        self.epoch = epoch
        self.order = rank_order(n, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                shuffle=shuffle, equal=equal)[start:]

    def __iter__(self):
        return iter([(self.epoch, int(i)) for i in self.order])

    def __len__(self) -> int:
        return len(self.order)


def make_loader(dataset: EchoClipDataset, *, batch_size: int, epoch: int, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, shuffle: bool = True, equal: bool = True,
                **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch of one rank, resuming after ``start_step`` batches.

    Workers use the spawn start method: s3fs and memory maps are not fork-safe (DATA.md §5).
    """
    sampler = EpochSampler(len(dataset), seed=dataset.seed, epoch=epoch, rank=rank, world_size=world_size,
                           start=start_step * batch_size, shuffle=shuffle, equal=equal)
    extra = dict(multiprocessing_context="spawn") if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, **extra, **kwargs)
