"""Resume from the newest complete checkpoint of a Train run, and leave no orphans behind.

A worker uploads its checkpoint folder, then Train's controller registers it in
``checkpoint_manager_snapshot.json``; a kill between the two left a complete checkpoint that Train
did not know: the restarted run resumed from an older one (or from scratch, after the first epoch)
and the newer folder stayed behind for ever (num_to_keep only deletes what it registered). A kill
during the upload left a partial folder.

Every checkpoint EchoTune writes ends with ``complete.json`` (the size of each file in it). At start,
rank 0 lists the run's checkpoint folders and resumes from the newest *complete* one, registered or
not; partial folders and unregistered ones older than that are deleted. An unregistered checkpoint
that was resumed from is deleted once the run has reported a newer one (which Train registers).
Registered checkpoints are never touched here: Train refuses to restart a run whose snapshot
names a missing folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from trainables.data import storage

COMPLETE_FILE, SNAPSHOT_FILE = "complete.json", "checkpoint_manager_snapshot.json"
log = logging.getLogger("echotune.checkpoints")


def mark_complete(folder: Path, next_epoch: int) -> None:
    """Write the completion marker last, with the size of every other file in the folder."""
    files = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name != COMPLETE_FILE}
    (Path(folder) / COMPLETE_FILE).write_text(json.dumps({"next_epoch": next_epoch, "files": files}))


@dataclass
class Found:
    path: str  # inside the run's filesystem
    next_epoch: int
    registered: bool


def _complete(fs, path: str) -> int | None:
    """``next_epoch`` of a complete checkpoint folder, else None (missing marker or size mismatch)."""
    try:
        marker = json.loads(fs.cat_file(f"{path}/{COMPLETE_FILE}"))
        for name, size in marker["files"].items():
            if fs.info(f"{path}/{name}")["size"] != size:
                return None
        return int(marker["next_epoch"])
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def _registered(fs, run: str) -> set[str]:
    try:
        snapshot = json.loads(fs.cat_file(f"{run}/{SNAPSHOT_FILE}"))
    except (FileNotFoundError, OSError, ValueError):
        return set()
    return {c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])}


def _rm(fs, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def tidy(run_uri: str, s3_endpoint: str | None = None, delete: bool = True) -> Found | None:
    """Delete partial and stale unregistered checkpoints of a run (only where ``delete``: rank 0);
    return the one to resume from."""
    fs, run = storage.open_fs(run_uri, s3_endpoint)
    try:
        folders = [p.rstrip("/") for p in fs.ls(run, detail=False) if p.rstrip("/").rsplit("/", 1)[-1]
                   .startswith("checkpoint_") and fs.isdir(p)]
    except FileNotFoundError:
        return None
    registered = _registered(fs, run)
    found = []
    for path in folders:
        name = path.rsplit("/", 1)[-1]
        epoch = _complete(fs, path)
        if epoch is None and name not in registered:
            if delete:
                log.warning("removing partial checkpoint %s (a kill during its upload)", path)
                _rm(fs, path)
        elif epoch is not None:
            found.append(Found(path, epoch, name in registered))
    if not found:
        return None
    newest = max(found, key=lambda f: (f.next_epoch, f.registered))
    for f in found:
        if not f.registered and f is not newest and delete:
            log.warning("removing checkpoint %s: Train never registered it and %s is newer", f.path, newest.path)
            _rm(fs, f.path)
    return newest


def fetch(run_uri: str, found: Found, dest: Path, s3_endpoint: str | None = None) -> Path:
    fs, _ = storage.open_fs(run_uri, s3_endpoint)
    fs.get(found.path + "/", str(dest) + "/", recursive=True)
    return dest


def remove(run_uri: str, found: Found, s3_endpoint: str | None = None) -> None:
    fs, _ = storage.open_fs(run_uri, s3_endpoint)
    _rm(fs, found.path)
