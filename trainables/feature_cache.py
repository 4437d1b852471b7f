"""Frozen-prefix feature cache: what a trial does not train is computed once per node, not every epoch.

When the encoder has a frozen prefix (split > 0: k < n_blocks, or LoRA whose first adapted block is
not block 0), the prefix's output is a pure function of (weights, clip): frozen modules run in eval
mode under no_grad and draw no random numbers (``LandmarkModel.prefix``). When the clip is
deterministic too (aug_strength 0, or ``cache_views`` fixed augmented views per video, and always in
validation), that output is computed once per node and reused across epochs and trials; only the
trainable suffix (blocks >= split, the final group, the head) runs every step. k = 0 caches the
embedding itself.

Layout, under ``<cache_dir>/features/`` (beside the shard cache's ``objects/``)::

    <model>/model.json          the model key, readable
    <model>/<hh>/<entry>.feat   one sample's prefix output: a JSON header line, then raw tensor bytes
    <model>/locks/<hhh>.lock    file locks, each guarding 1/4096 of the entries
    evict.lock

* ``<model>`` = sha256 of the model key (``model_key``): cache format version, encoder registry name,
  weights identity (sha256 of the weights file's bytes, the torchvision weights URL, or
  ``random-init:seed=<seed>``), split, ``preprocess_version``, storage dtype (bf16 where the encoder
  runs under bf16 autocast, else fp32), device type, torch and torchvision versions. A change in any
  of them is another folder, so it can never hit a stale entry.
* ``<entry>`` = sha256 of (shard sha256, video file name, the 16 clip indices, view tag). The shard is
  the manifest sha256 of the Parquet file that holds the video, so another shard set with the same
  file names never hits; the view tag names the augmentation (strength, version) and view index.
* Each entry's header holds its key, dtype, shape and the sha256 of its bytes, checked on every
  read; a damaged entry is reported (``FeatureCacheWarning``), removed and computed again. Writes go
  to a temporary file renamed into place, so readers take no lock. A process that misses takes the
  missing entries' locks (in sorted order: no deadlock), looks again, computes what is still missing
  in one batch and writes it, so concurrent trials compute an entry once.
* Size cap ``data.feature_cache_gb`` (else ``$ECHOTUNE_FEATURE_CACHE_GB``, else 8 GB) over the whole
  folder, least recently used first: a hit touches its entry's mtime; each time a process has written
  another 5 % of the cap it scans the folder and removes the oldest entries down to 90 % of the cap.
* ``cache_views`` (``ViewDataset``): view v of a video is the augmentation drawn from
  ``rng(VIEW_SEED, v, video)``, the same in every trial with the same aug_strength (so trials share
  them); epoch e of a trial shows view ``choose_view(seed, e, video, N)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import filelock
import numpy as np
import torch
from filelock import FileLock

FORMAT_VERSION = 1
VIEWS_VERSION = 1  # bump when augment.py changes what a view of a given (strength, v, video) is
VIEW_SEED = 0x7E1E_C0DE  # the views' random stream; not the trial seed, so trials share views
VIEW_CHOICE = 0x5E1EC7  # extra word of the per-epoch view choice, apart from stream.sample_rng
DEFAULT_GB, ENV_GB = 8.0, "ECHOTUNE_FEATURE_CACHE_GB"
LOCK_TIMEOUT_S = 600
ALIGN = 64  # the tensor bytes start at a multiple of this (the header line is padded)
EVICT_EVERY, LOW_WATER = 0.05, 0.9  # scan after writing this share of the cap; evict down to this share
STALE_TMP_S = 3600  # temporary files older than this were left by a killed writer
DTYPES = {_t: getattr(torch, _t) for _t in ("float32", "bfloat16", "float16", "float64")}


class FeatureCacheWarning(UserWarning):
    """A feature-cache entry was damaged (it is computed again) or could not be written."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cap_bytes(gb: float | None = None) -> int:
    """The size cap: ``gb``, else ``$ECHOTUNE_FEATURE_CACHE_GB``, else 8 GB."""
    if gb is None:
        env = os.environ.get(ENV_GB)
        try:
            gb = float(env) if env else DEFAULT_GB
        except ValueError:
            raise ValueError(f"${ENV_GB}={env!r} is not a number of GB") from None
    if not gb > 0:
        raise ValueError(f"feature cache size cap {gb} GB must be > 0")
    return int(gb * 2**30)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

_WEIGHTS_SHA: dict[tuple, str] = {}  # (uri, size, mtime_ns) -> sha256, so a process hashes a file once


def weights_tag(cfg) -> str:
    """What the encoder's weights are, for the model key: ``sha256:<hex>`` of the weights file's
    bytes, ``torchvision:<url>``, or ``random-init:seed=<seed>`` (random init follows the seed)."""
    from trainables.models.weights import TORCHVISION, read_bytes

    uri = cfg.encoder.weights
    if not uri:
        return f"random-init:seed={cfg.seed}"
    if uri == TORCHVISION:
        import importlib

        from trainables.models.encoders import ENCODERS

        module, enum_name = ENCODERS[cfg.encoder.name].build.torchvision_weights
        return f"torchvision:{getattr(importlib.import_module(module), enum_name).DEFAULT.url}"
    if cfg.encoder.weights_sha256:  # checked against the bytes when the weights were loaded
        return f"sha256:{cfg.encoder.weights_sha256.lower()}"
    path = Path(uri)
    if not path.is_file():  # an object-store URI
        return f"sha256:{hashlib.sha256(read_bytes(uri, cfg.data.s3_endpoint)).hexdigest()}"
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if stamp not in _WEIGHTS_SHA:
        _WEIGHTS_SHA[stamp] = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"sha256:{_WEIGHTS_SHA[stamp]}"


def model_key(encoder, weights: str, dtype: torch.dtype, device_type: str) -> dict:
    """Everything the prefix output of a given clip depends on, besides the clip."""
    import torchvision

    return {"format": FORMAT_VERSION, "encoder": encoder.registry_name, "weights": weights,
            "split": encoder.split, "preprocess": encoder.preprocess_version, "dtype": _dtype_name(dtype),
            "device": device_type, "torch": torch.__version__, "torchvision": torchvision.__version__}


def view_tag(strength: float) -> str:
    """The part of an entry key that names an augmented view's recipe (the index is appended)."""
    return f"views-v{VIEWS_VERSION}:aug={strength!r}"


def shard_map(dataset) -> dict[str, str]:
    """file name -> sha256 of the shard holding it (the node cache's ``<sha256>.arrow``)."""
    ds = getattr(dataset, "base", dataset)
    return {str(name): Path(ds.paths[f]).name.split(".")[0] for name, (f, _) in zip(ds.file_names, ds.where)}


def batch_keys(batch: dict, shards: dict[str, str], views: str | None) -> list[list]:
    """Entry keys of a collated batch: [shard, file name, clip indices, view tag or None]."""
    names = [str(n) for n in batch["file_name"]]
    indices = batch["clip_indices"].tolist()
    seen = batch["view"].tolist() if "view" in batch else [None] * len(names)
    return [[shards[n], n, [int(i) for i in ix], None if v is None else f"{views}/{int(v)}"]
            for n, ix, v in zip(names, indices, seen)]


# ---------------------------------------------------------------------------------------------
# Samples: a tensor, or a tuple (tensor, plain values...) such as MViT's (tokens, thw)
# ---------------------------------------------------------------------------------------------

def _pack(sample) -> tuple[torch.Tensor, list | None]:
    if isinstance(sample, torch.Tensor):
        return sample, None
    tensor, *rest = sample
    return tensor, [list(r) if isinstance(r, tuple) else r for r in rest]


def _unpack(tensor: torch.Tensor, extra: list | None):
    if extra is None:
        return tensor
    return (tensor, *[tuple(r) if isinstance(r, list) else r for r in extra])


def _decode(buf: bytearray, key: list, device: torch.device | str = "cpu"):
    """(sample on ``device``, '') from an entry's bytes, or (None, what is wrong)."""
    nl = buf.find(b"\n")
    if nl < 0:
        return None, "has no header (truncated)"
    try:
        head = json.loads(bytes(buf[:nl]))
        dtype, stored_as = DTYPES[head["as"]], DTYPES[head["dtype"]]
        shape, nbytes, digest = list(head["shape"]), int(head["nbytes"]), str(head["sha256"])
        extra = head["extra"]
    except (ValueError, KeyError, TypeError):
        return None, "has an unreadable header"
    if head.get("format") != FORMAT_VERSION or head.get("key") != key:
        return None, "holds another entry or format"
    if len(buf) != nl + 1 + nbytes:
        return None, f"is {len(buf)} bytes, {nl + 1 + nbytes} when written (truncated or overwritten)"
    if hashlib.sha256(memoryview(buf)[nl + 1:]).hexdigest() != digest:
        return None, "does not match the sha256 recorded when it was written (bit rot or overwritten)"
    count = nbytes // torch.empty((), dtype=stored_as).element_size()
    tensor = torch.frombuffer(buf, dtype=stored_as, offset=nl + 1, count=count).reshape(shape)
    return _unpack(tensor.to(device).to(dtype), extra), ""  # the cast after the copy: fewer bytes to move


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

class FeatureCache:
    """One model key's entries under ``root`` (``<cache_dir>/features``).

    ``fetch(keys, compute, device)`` returns every key's sample on ``device``, computing the missing
    ones with ``compute(rows)`` (the rows of ``keys`` to compute, in order; on ``device``) and storing
    them in ``dtype``. A computed sample is returned as it was stored (rounded to ``dtype``, then cast
    back), so a miss and a later hit give the trainer the same numbers.
    """

    def __init__(self, root: str | Path, model: dict, *, cap: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.root, self.model, self.dtype = Path(root), model, dtype
        self.dir = self.root / _digest(model)[:32]
        self.cap = cap if cap is not None else cap_bytes()
        self.written = int(self.cap * EVICT_EVERY)  # the first write scans the folder
        (self.dir / "locks").mkdir(parents=True, exist_ok=True)
        if not (self.dir / "model.json").exists():
            _atomic_write(self.dir / "model.json", json.dumps(model, indent=1, sort_keys=True).encode())

    def path(self, key: list) -> Path:
        return self._path(_digest(key))

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / f"{name}.feat"

    def fetch(self, keys: list[list], compute: Callable[[list[int]], list],
              device: torch.device | str = "cpu") -> tuple[list, int, int]:
        """(samples, hits, misses) for ``keys``."""
        names = [_digest(k) for k in keys]
        out = [self._read(n, k, device) for n, k in zip(names, keys)]
        rows = [i for i, s in enumerate(out) if s is None]
        if rows:
            with self._locked(sorted({names[i][:3] for i in rows})):
                still = []
                for i in rows:  # another process may have written it while we waited for the lock
                    out[i] = self._read(names[i], keys[i], device)
                    if out[i] is None:
                        still.append(i)
                rows = still
                if rows:
                    for i, sample in zip(rows, compute(rows), strict=True):
                        out[i] = self._write(names[i], keys[i], sample)
        return out, len(keys) - len(rows), len(rows)

    @contextlib.contextmanager
    def _locked(self, shards: list[str]):
        with contextlib.ExitStack() as stack:
            for shard in shards:
                lock = FileLock(str(self.dir / "locks" / f"{shard}.lock"))
                try:
                    lock.acquire(timeout=LOCK_TIMEOUT_S)
                except filelock.Timeout:
                    raise RuntimeError(f"waited {LOCK_TIMEOUT_S} s for {lock.lock_file}, held by another "
                                       f"process computing frozen-prefix features; if no other echotune runs "
                                       f"on this node, delete {self.dir / 'locks'} and re-run") from None
                stack.callback(lock.release)
            yield

    def _read(self, name: str, key: list, device: torch.device | str = "cpu"):
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                n = f.readinto(buf)
        except FileNotFoundError:
            return None
        sample, problem = _decode(buf[:n] if n != len(buf) else buf, key, device)
        if problem:
            warnings.warn(f"damaged feature cache entry {path}: it {problem}; removing it and computing it "
                          f"again", FeatureCacheWarning, stacklevel=4)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # a use, for the LRU order (atime alone is unreliable under relatime)
        return sample

    def _write(self, name: str, key: list, sample):
        tensor, extra = _pack(sample)
        stored = tensor.detach().to(self.dtype)
        host = stored.to("cpu").contiguous()
        payload = host.reshape(-1).view(torch.uint8).numpy()
        head = json.dumps({"format": FORMAT_VERSION, "key": key, "dtype": _dtype_name(host.dtype),
                           "as": _dtype_name(tensor.dtype), "shape": list(host.shape), "extra": extra,
                           "nbytes": int(payload.nbytes), "sha256": hashlib.sha256(payload).hexdigest()})
        head = head.encode()
        head += b" " * (-(len(head) + 1) % ALIGN) + b"\n"
        path = self._path(name)
        try:
            path.parent.mkdir(exist_ok=True)
            _atomic_write(path, head, payload)
        except OSError as exc:  # a full disk slows the trial down; it must not fail it
            warnings.warn(f"could not write feature cache entry {path} ({exc}); going on without it",
                          FeatureCacheWarning, stacklevel=3)
        else:
            self.written += len(head) + payload.nbytes
            if self.written >= self.cap * EVICT_EVERY:
                self.written = 0
                evict(self.root, self.cap)
        return _unpack(stored.to(tensor.dtype), extra)


def _atomic_write(path: Path, *parts) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_size(root: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(root).glob("*/*/*.feat"))


def evict(root: str | Path, cap: int, low_water: float = LOW_WATER) -> int:
    """If the entries under ``root`` exceed ``cap`` bytes, remove the least recently used down to
    ``low_water * cap``; also removes temporary files a killed writer left. Returns the bytes
    removed (0 while another process is evicting)."""
    root = Path(root)
    lock = FileLock(str(root / "evict.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return 0
    try:
        entries, total, now = [], 0, time.time()
        for path in root.glob("*/*/*.feat*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if not path.name.endswith(".feat"):
                if now - st.st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
                continue
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, str(path)))
            total += st.st_size
        removed = 0
        if total > cap:
            for _, size, path in sorted(entries):
                if total - removed <= cap * low_water:
                    break
                Path(path).unlink(missing_ok=True)
                removed += size
        return removed
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# A trial's cache, and fixed augmented views
# ---------------------------------------------------------------------------------------------

def for_trial(cfg, model, device: torch.device) -> FeatureCache | None:
    """The cache of a trial's model, or None when it is off or nothing is frozen (split 0 or None)."""
    if not cfg.data.feature_cache or not model.has_prefix:
        return None
    from trainables.data.stream import default_cache_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's bf16 autocast on CUDA
    key = model_key(model.encoder, weights_tag(cfg), dtype, device.type)
    root = Path(cfg.data.cache_dir or default_cache_dir()) / "features"
    return FeatureCache(root, key, cap=cap_bytes(cfg.data.feature_cache_gb), dtype=dtype)


def choose_view(seed: int, epoch: int, file_name: str, n_views: int) -> int:
    """The view of ``file_name`` that epoch ``epoch`` of a trial with ``seed`` shows."""
    rng = np.random.default_rng([seed, epoch, zlib.crc32(file_name.encode()), VIEW_CHOICE])
    return int(rng.integers(n_views))


class ViewDataset(torch.utils.data.Dataset):
    """``n_views`` fixed augmented views per video; epoch e shows view ``choose_view(seed, e, ...)``.

    ``base`` is an ``EchoClipDataset`` with the augmentation, built with ``seed=VIEW_SEED``: its item
    ``(v, i)`` is view v of video i (the stream's per-sample rng is ``rng(VIEW_SEED, v, video)``).
    Items carry ``view``; ``seed`` is the trial's (the loader's epoch order uses it).
    """

    def __init__(self, base, n_views: int, seed: int):
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, not {n_views}")
        self.base, self.n_views, self.seed = base, n_views, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        v = choose_view(self.seed, epoch, str(self.base.file_names[i]), self.n_views)
        return self.base[(v, i)] | {"view": v}
