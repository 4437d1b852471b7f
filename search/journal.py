"""Everything ``--resume`` needs lives with the experiment in its storage.

An experiment is ``<storage>/<name>/``: Tune's own state and trial folders, the Train runs, and
three files of ours that this module keeps there:

* ``search_config.json`` — the search settings (written once);
* ``optuna.db`` — the Optuna study (SQLite cannot live on S3, so the head works on a local copy in
  ``results/<name>/`` and uploads a consistent snapshot after every trial result);
* ``scheduler.json`` — the stratified ASHA's rungs and stop decisions (Tune does not save a
  scheduler's state; without it a resumed search forgot which trials were stopped).

For a local ``--storage`` the local folder *is* the experiment folder and nothing is copied. On
``--resume`` with ``s3://`` storage, ``pull`` restores the files to the local folder first, so a
replacement head resumes where the old one stopped; ``journal.json`` (a push counter) tells a head
whether the storage is ahead of its own copies.

Tune pickles the searcher and scheduler into the experiment and unpickles them on restore, possibly
on another machine; they find this head's folder through ``folder()`` (set by ``search.run``)
rather than a path baked into the pickle.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from trainables.data import storage as store

SETTINGS_FILE, STUDY_FILE, SCHEDULER_FILE = "search_config.json", "optuna.db", "scheduler.json"
# A counter raised by every push, in the storage (GENERATION_FILE) and, as the last generation this
# head pushed or pulled, in its local folder (SYNCED_FILE): a resume pulls only when the storage is
# ahead of this head. Row counts cannot tell: a resume reopens study trials (fewer rows), so a
# lagging remote copy could look newer than the head's own.
GENERATION_FILE, SYNCED_FILE = "journal.json", ".journal-synced.json"
log = logging.getLogger("echotune.search")
FILES = (SETTINGS_FILE, STUDY_FILE, SCHEDULER_FILE)

_STATE: dict = {"folder": None, "searcher": None, "journal": None}


def set_folder(folder: Path) -> None:
    _STATE["folder"] = Path(folder).resolve()


def folder() -> Path:
    if _STATE["folder"] is None:
        raise RuntimeError("search.journal.set_folder() was not called: no experiment folder on this head")
    return _STATE["folder"]


def register_searcher(searcher) -> None:
    _STATE["searcher"] = searcher


def searcher():
    return _STATE["searcher"]


def active() -> "Journal | None":
    return _STATE["journal"]


class Journal:
    """The local folder and the experiment URI, and copying our files between them."""

    def __init__(self, local: Path, experiment: str, s3_endpoint: str | None = None):
        self.local, self.experiment, self.s3_endpoint = Path(local).resolve(), experiment.rstrip("/"), s3_endpoint
        self.remote = store.is_remote(experiment) and Path(experiment).resolve() != self.local
        self.last_push = 0.0
        set_folder(self.local)
        _STATE["journal"] = self

    def _fs(self):
        return store.open_fs(self.experiment, self.s3_endpoint)

    def push(self, names: tuple[str, ...] = FILES) -> None:
        """Upload our files (the study as a consistent snapshot) to the experiment storage."""
        if not self.remote:
            return
        fs, base = self._fs()
        for name in names:
            path = self.local / name
            if not path.exists():
                continue
            try:
                if name == STUDY_FILE:
                    with tempfile.TemporaryDirectory() as tmp:
                        snapshot = Path(tmp) / name
                        sqlite_snapshot(path, snapshot)
                        fs.put_file(str(snapshot), f"{base}/{name}")
                else:
                    fs.put_file(str(path), f"{base}/{name}")
            except Exception as exc:
                raise store.storage_error(f"{self.experiment}/{name}", self.s3_endpoint, exc, "upload") from exc
        try:  # last: a kill before this leaves the storage's generation at the older, complete push
            generation = max(self._synced() or 0, self._remote_generation(fs, base) or 0) + 1
            fs.pipe_file(f"{base}/{GENERATION_FILE}", json.dumps({"generation": generation}).encode())
        except Exception as exc:
            raise store.storage_error(f"{self.experiment}/{GENERATION_FILE}", self.s3_endpoint, exc, "upload") from exc
        self._set_synced(generation)
        self.last_push = time.time()

    def _synced(self) -> int | None:
        try:
            return int(json.loads((self.local / SYNCED_FILE).read_text())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _set_synced(self, generation: int) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        write_json(self.local / SYNCED_FILE, {"generation": generation})

    def _remote_generation(self, fs, base: str) -> int | None:
        try:
            return int(json.loads(fs.cat_file(f"{base}/{GENERATION_FILE}"))["generation"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none yet, or not ours
            return None

    def pull(self) -> list[str]:
        """Bring this head's copies of our files up to the experiment storage's; returns the names
        taken. A head that pushed or pulled the storage's newest generation keeps its own copies
        (they hold at least as much); when the storage is ahead (another head went on) its copies
        replace the head's; a head that never synced (a new one) takes what it lacks or holds less of."""
        if not self.remote:
            return []
        fs, base = self._fs()
        self.local.mkdir(parents=True, exist_ok=True)
        try:
            remote, synced = self._remote_generation(fs, base), self._synced()
        except Exception as exc:
            raise store.storage_error(f"{self.experiment}/{GENERATION_FILE}", self.s3_endpoint, exc, "download") from exc
        if remote is not None and synced is not None and remote <= synced:
            return []
        ahead = remote is not None and synced is not None
        got = []
        for name in FILES:
            tmp = self.local / f".{name}.part{os.getpid()}"
            try:
                if not fs.exists(f"{base}/{name}"):
                    continue
                fs.get_file(f"{base}/{name}", str(tmp))
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise store.storage_error(f"{self.experiment}/{name}", self.s3_endpoint, exc, "download") from exc
            local = self.local / name
            if ahead or not local.exists() or progress(tmp) >= progress(local):
                os.replace(tmp, local)
                got.append(name)
            else:
                tmp.unlink()
        if remote is not None:
            self._set_synced(remote)
        return got

    def exists_remotely(self, name: str = SETTINGS_FILE) -> bool:
        fs, base = self._fs()
        return fs.exists(f"{base}/{name}")


def progress(path: Path) -> int:
    """How much of an experiment's history a copy of one of our files holds. The study and the
    scheduler state only ever grow (one writer at a time), so more rows means newer."""
    if STUDY_FILE in path.name:  # optuna.db, or the downloaded .optuna.db.part<pid>
        try:
            with sqlite3.connect(str(path)) as db:
                return sum(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in (
                    "trials", "trial_values", "trial_intermediate_values", "trial_user_attributes")) + \
                    db.execute("SELECT COUNT(*) FROM trials WHERE state != 'RUNNING' AND state != 'WAITING'"
                               ).fetchone()[0]
        except sqlite3.Error:
            return -1
    if SCHEDULER_FILE in path.name:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return -1
        return len(state.get("stopped", {})) + sum(len(rec) for rungs in state.get("strata", {}).values()
                                                   for _, rec in rungs)
    return 0


def push_study() -> None:
    """Upload the study now (after a trial was asked for), if a search with remote storage runs."""
    j = active()
    if j is None:
        return
    try:
        j.push((STUDY_FILE,))
    except store.StorageError as exc:  # the next push tries again; the search goes on
        log.warning("could not copy the study to the experiment storage: %s", exc)


def sqlite_snapshot(src: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API, not a file copy)."""
    with sqlite3.connect(str(src)) as source, sqlite3.connect(str(dest)) as target:
        source.backup(target)


def write_json(path: Path, data) -> None:
    """Atomic JSON write: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def trial_error(trial) -> str:
    """The last lines of a Tune trial's error file, as a one-paragraph reason."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = next((line for line in reversed(lines) if not line.startswith((" ", "Failure #"))), "")
    return f"the trial errored: {tail or 'see its error.txt'}"[:1000]


def _complete_lines(data: bytes) -> bytes:
    """Everything up to the last newline (a kill can leave half a line)."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


def restore_trial_logs(trial) -> dict:
    """Before a restarted trial runs again: put the result.json / progress.csv it already has in
    storage back into its (new) local folder, and return the result of the last epoch they hold
    (empty when they hold none).

    Tune restores a trial's logs only when it has a Tune checkpoint (ray.tune.logger._restore_from_
    remote); our trials keep their state in the Train run instead, so without this the restarted
    trial's logger started an empty result.json and the next sync replaced the stored one,
    dropping every epoch reported before the kill.
    """
    trial.init_local_path()
    fs, remote = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    for name in ("result.json", "progress.csv"):
        local = Path(trial.local_path, name)
        if not (local.exists() and local.stat().st_size):
            try:
                with fs.open_input_stream(f"{remote}/{name}") as f:
                    data = _complete_lines(f.read())
            except (FileNotFoundError, OSError):
                continue
            local.write_bytes(data)
    last: dict = {}
    for row in _logged_rows(trial):
        try:
            if int(row.get("epoch", 0)) > int(last.get("epoch", 0)):
                last = row
        except (ValueError, TypeError):
            continue
    return last


def restore_tensorboard(trial, held: int) -> None:
    """Make a restarted trial's stored TensorBoard files hold its epochs 1..``held`` once each, as its
    restored result.json does (Tune's TensorBoard step is the epoch): the trial reports the later
    ones again, into a new file. A kill's upload can carry an event file ahead of the result.json
    beside it (seen in the S3 new-head resume test: steps 1, 2, 2, 3), or behind it (steps 3 only):
    steps after ``held`` are dropped, and what the result.json holds but no event file does (a whole
    epoch, or the tags of an epoch whose upload was cut) is written from it, as Tune's TensorBoard
    logger writes a result. A failure here is logged, not raised: the curves are a view of the
    logs, and must not stop a resume."""
    try:
        _restore_tensorboard(trial, held)
    except Exception as exc:  # noqa: BLE001 (storage errors, unreadable files: the search goes on)
        log.warning("could not restore the TensorBoard files of trial %s (%s: %s); its curves may miss or "
                    "repeat epochs up to %d", trial.trial_id, type(exc).__name__, exc, held)


def _restore_tensorboard(trial, held: int) -> None:
    import pyarrow.fs

    fs = trial.storage.storage_filesystem
    # The head's own staging copy too (a resume on the same head): Tune's next sync uploads it over
    # the stored files, and the epochs it holds need not be written again.
    places = [(fs, trial.storage.trial_fs_path), (pyarrow.fs.LocalFileSystem(), str(trial.local_path))]
    present: set[tuple[int, str]] = set()  # (step, tag)
    for place_fs, folder in places:
        for info in place_fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
            if info.base_name.startswith("events.out.tfevents") and info.type == pyarrow.fs.FileType.File:
                present |= _trim_event_file(place_fs, info.path, held)
    rows = {_step(row): row for row in _logged_rows(trial) if 0 < _step(row) <= held}  # the last of each epoch
    records, first = _event_records([rows[step] for step in sorted(rows)], present)
    if records:
        # named by when its first epoch was reported (else now): it sorts after the older files and
        # before the file the restarted trial writes
        stamp = int(first.get("timestamp") or time.time() - 1)
        name = f"events.out.tfevents.{stamp:010d}.echotune-restored"
        with fs.open_output_stream(f"{trial.storage.trial_fs_path}/{name}") as f:
            f.write(records)


def _step(row: dict) -> int:
    """Tune's TensorBoard step of a result (ray.tune.logger.tensorboardx: timesteps_total, else the iteration)."""
    from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

    return int(row.get(TIMESTEPS_TOTAL) or row.get(TRAINING_ITERATION) or 0)


def _trim_event_file(fs, path: str, held: int) -> set[tuple[int, str]]:
    """Drop the summaries after step ``held`` from a stored event file; the (step, tag) pairs it keeps.
    A file cut by the kill's upload, or damaged, keeps the records read before the damage (TensorBoard
    stops reading a file there) and is rewritten without the rest, whose epochs up to ``held`` are
    then written again from the logs; a whole record that is no event is dropped alone."""
    from google.protobuf.message import DecodeError
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "events")
        with fs.open_input_stream(path) as f:
            size = local.write_bytes(f.read())
        raw = list(RawEventFileLoader(str(local)).Load())  # stops at a cut or a checksum that fails
    events = []
    for record in raw:
        try:
            events.append((record, event_pb2.Event.FromString(record)))
        except (DecodeError, ValueError):  # ValueError: bad UTF-8 under protobuf's pure-Python backend
            continue
    kept = [(r, e) for r, e in events if e.step <= held]
    # every record framed as 8 + 4 + data + 4 bytes: a file read to its end adds up to its size
    if len(kept) < len(raw) or sum(16 + len(r) for r in raw) != size:
        with fs.open_output_stream(path) as f:
            f.write(_event_file_bytes(r for r, _ in kept))
    return {(e.step, v.tag) for _, e in kept if e.HasField("summary") for v in e.summary.value}


def _logged_rows(trial) -> list[dict]:
    """The results in the trial's (restored) local result.json, in order."""
    path = Path(trial.local_path, "result.json")
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _event_records(rows: list[dict], present: set[tuple[int, str]]) -> tuple[bytes, dict]:
    """An event file holding what ``rows`` add to ``present`` as Tune's TensorBoard logger writes a
    result (every finite number of the flattened result under ``ray/tune/``, at the result's step),
    and the first row it uses; (b"", {}) when they add nothing."""
    import numpy as np
    from ray.tune.logger.tensorboardx import VALID_SUMMARY_TYPES
    from ray.tune.result import TIME_TOTAL_S, TRAINING_ITERATION
    from ray.tune.utils import flatten_dict
    from tensorboard.compat.proto import event_pb2, summary_pb2

    events, first = [], {}
    for row in rows:
        step = _step(row)
        flat = flatten_dict({k: v for k, v in row.items()
                             if k not in ("config", "pid", "timestamp", TIME_TOTAL_S, TRAINING_ITERATION)},
                            delimiter="/")
        values = [summary_pb2.Summary.Value(tag=f"ray/tune/{k}", simple_value=float(v)) for k, v in flat.items()
                  if isinstance(v, tuple(VALID_SUMMARY_TYPES)) and not np.isnan(v)
                  and (step, f"ray/tune/{k}") not in present]
        if values:
            first = first or row
            events.append(event_pb2.Event(wall_time=float(row.get("timestamp") or time.time()), step=step,
                                          summary=summary_pb2.Summary(value=values)))
    if not events:
        return b"", {}
    header = event_pb2.Event(wall_time=events[0].wall_time, file_version="brain.Event:2")
    return _event_file_bytes(e.SerializeToString() for e in [header, *events]), first


def _event_file_bytes(records) -> bytes:
    """An event file's bytes holding the serialized events ``records``, in order."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    out = io.BytesIO()
    writer = RecordWriter(out)
    for record in records:
        writer.write(record)
    return out.getvalue()


class JournalCallback(Callback):
    """After every trial result and end: store error reasons in the study, push our files."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._push()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._push()

    def on_trial_error(self, iteration, trials, trial, **info):
        s = searcher()
        if s is not None:
            s.note_error(trial.trial_id, trial_error(trial))
        self._push()

    def on_experiment_end(self, trials, **info):
        s = searcher()
        if s is not None:
            s.finalize()
        self._push()

    def _push(self) -> None:
        j = active()
        if j is None:
            return
        try:
            j.push()
        except store.StorageError as exc:  # the next result pushes again; the search goes on
            log.warning("could not copy the study and search state to the experiment storage: %s", exc)
