"""Shards on a real S3 server (moto on 127.0.0.1): round trip, cache, corruption, re-runs, bad endpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import s3fs

from tests.conftest import free_port
from trainables.data import storage, stream
from trainables.data.echonet import read_echonet
from trainables.data.shard import write_shards
from trainables.data.stream import EchoClipDataset, ShardError, ShardSet, ed_es_clip_indices


def opencv_frames(avi: Path) -> list[np.ndarray]:
    """OpenCV's own demux (raw packets) and decode of every frame of an AVI, as grey."""
    cap = cv2.VideoCapture(str(avi))
    cap.set(cv2.CAP_PROP_FORMAT, -1)  # raw mode: read() returns the encoded packet
    frames = []
    while True:
        ok, packet = cap.read()
        if not ok:
            return frames
        frames.append(cv2.imdecode(packet.reshape(-1), cv2.IMREAD_GRAYSCALE))


def opencv_luma(avi: Path) -> list[np.ndarray]:
    """VideoCapture's FFmpeg decode, Y plane (no colour conversion)."""
    cap = cv2.VideoCapture(str(avi))
    cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame)


def test_s3_round_trip_matches_the_avis(s3_endpoint, s3_shards, synthetic_root, tmp_path):
    uri, manifest = s3_shards
    samples = {s.file_name: s for s in read_echonet(synthetic_root[0])[0]}
    assert sum(manifest["splits"].values()) == len(samples) == 12
    seen = set()
    for split in ("train", "val", "test"):
        ds = EchoClipDataset(uri, split, s3_endpoint=s3_endpoint, cache_dir=tmp_path / "cache")
        assert len(ds) == manifest["splits"][split] and ds.synthetic
        for i in range(len(ds)):
            item = ds[i]
            s = samples[item["file_name"]]
            seen.add(s.file_name)
            idx = ed_es_clip_indices(s.ed_frame, s.es_frame)
            assert item["clip_indices"].tolist() == idx.tolist()
            assert item["clip_indices"][0] == s.ed_frame and item["clip_indices"][15] == s.es_frame
            assert item["reversed"] == (s.es_frame < s.ed_frame)
            ref, luma = opencv_frames(s.avi_path), opencv_luma(s.avi_path)
            assert item["clip"].dtype == np.uint8 and item["clip"].shape == (16, 112, 112)
            for j, t in enumerate(idx):
                assert np.array_equal(item["clip"][j], ref[t]), (s.file_name, t)
                assert np.abs(item["clip"][j].astype(int) - luma[t]).max() <= 1  # FFmpeg's IDCT may differ by 1
            expected = np.stack([s.ed_points, s.es_points]) / 112
            assert item["landmarks"].dtype == np.float32
            np.testing.assert_allclose(item["landmarks"], expected, rtol=0, atol=1e-6)
            assert item["ef"] == pytest.approx(s.ef, rel=1e-6)
    assert seen == set(samples)


def test_both_temporal_orders_and_short_gaps_reach_the_stream(s3_shards, s3_endpoint, tmp_path):
    ds = EchoClipDataset(s3_shards[0], "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    items = [ds[i] for i in range(len(ds))]
    assert {it["reversed"] for it in items} == {True, False}
    for it in items:  # index 0 is ED and 15 is ES even when time runs backwards
        step = np.diff(it["clip_indices"])
        assert (step <= 0).all() if it["reversed"] else (step >= 0).all()


def test_manifest_records_every_rejection_with_its_reason(s3_shards, synthetic_root):
    _, manifest = s3_shards
    rejected = {r["file_name"]: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == set(synthetic_root[1])
    assert all(":" in reason for reason in rejected.values())
    for f in manifest["files"]:
        assert set(f) >= {"path", "split", "rows", "size", "sha256", "row_groups"}
        assert sum(f["row_groups"]) == f["rows"]


def test_shards_store_the_original_packets_without_recompression(s3_shards, s3_endpoint, synthetic_root):
    import pyarrow.parquet as pq

    from trainables.data.mjpeg import read_packets

    uri, manifest = s3_shards
    fs, base = storage.open_fs(uri, s3_endpoint)
    entry = manifest["files"][0]
    with fs.open(f"{base}/{entry['path']}", "rb") as f:
        table = pq.read_table(f)
        meta = pq.ParquetFile(f).metadata
    row = table.slice(0, 1).to_pylist()[0]
    packets, _ = read_packets(synthetic_root[0] / "Videos" / f"{row['file_name']}.avi")
    assert row["win_jpeg"] == packets[row["win_start"]:row["win_start"] + len(row["win_jpeg"])]
    lo, hi = sorted((row["ed_frame"], row["es_frame"]))
    assert row["win_start"] <= lo and row["win_start"] + len(row["win_jpeg"]) > hi
    jpeg_col = table.schema.get_field_index("win_jpeg")
    assert meta.row_group(0).column(jpeg_col).compression == "UNCOMPRESSED"


def test_cache_is_shared_and_survives_without_the_store(s3_endpoint, synthetic_root, bucket, tmp_path):
    uri = f"{bucket}/v1"
    manifest = write_shards(synthetic_root[0], uri, rows_per_file=4, s3_endpoint=s3_endpoint)
    cache = tmp_path / "cache"
    first = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=cache)
    objects = sorted(p.name for p in (cache / "objects").glob("*.arrow"))
    assert objects == sorted(f"{f['sha256']}.arrow" for f in manifest["files"] if f["split"] == "train")
    assert not list((cache / "objects").glob("*.tmp*"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    for f in manifest["files"]:  # parts gone from the store: a second trial on the node still reads
        fs.rm(f"{uri}/{f['path']}")
    second = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=cache)
    assert np.array_equal(second[0]["clip"], first[0]["clip"])


def test_concurrent_trials_fill_one_cache(s3_endpoint, s3_shards, tmp_path):
    code = ("import sys; from trainables.data.stream import EchoClipDataset as D; "
            "d = D(sys.argv[1], 'train', s3_endpoint=sys.argv[2], cache_dir=sys.argv[3]); print(len(d))")
    procs = [subprocess.Popen([sys.executable, "-c", code, s3_shards[0], s3_endpoint, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    assert not list((tmp_path / "objects").glob("*.tmp*")) and not list((tmp_path / "objects").glob("*.parquet"))


def _damaged_set(s3_endpoint, synthetic_root, bucket, damage):
    uri = f"{bucket}/v1"
    manifest = write_shards(synthetic_root[0], uri, rows_per_file=4, s3_endpoint=s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    entry = next(f for f in manifest["files"] if f["split"] == "train")
    damage(fs, f"{uri}/{entry['path']}")
    return uri, entry["path"]


@pytest.mark.parametrize("damage, message", [
    (lambda fs, p: fs.pipe(p, bytes(len(fs.cat(p)))), "checksum mismatch"),
    (lambda fs, p: fs.pipe(p, fs.cat(p)[:1000]), "truncated"),
    (lambda fs, p: fs.rm(p), "missing from the store"),
])
def test_corrupt_shard_is_named(s3_endpoint, synthetic_root, bucket, tmp_path, damage, message):
    uri, path = _damaged_set(s3_endpoint, synthetic_root, bucket, damage)
    with pytest.raises(ShardError, match=message) as err:
        EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    assert path in str(err.value)
    assert not list(tmp_path.glob("objects/*.parquet*"))  # nothing unverified left in the cache


def test_missing_or_foreign_manifest(s3_endpoint, bucket, tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(f"{bucket}/empty", s3_endpoint=s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(f"{bucket}/future/manifest.json", json.dumps({"schema_version": 99, "files": []}).encode())
    with pytest.raises(ShardError, match="schema_version 99"):
        ShardSet(f"{bucket}/future", s3_endpoint=s3_endpoint)


def test_unknown_split_lists_the_choices(s3_shards, s3_endpoint):
    with pytest.raises(ValueError, match="train, val, test"):
        EchoClipDataset(s3_shards[0], "holdout", s3_endpoint=s3_endpoint)


def test_unreachable_endpoint_fails_fast_with_a_clear_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="127.0.0.1") as err:
        ShardSet("s3://nobody/v1", s3_endpoint=dead)
    assert time.monotonic() - t0 < 60
    assert "AWS_ENDPOINT_URL" in str(err.value) and "testing" not in str(err.value)
    port = dead.rsplit(":", 1)[1]
    assert MESSAGE["nothing listens at the S3 endpoint"].replace("PORT", port) in str(err.value)


def test_shard_cli_unreachable_endpoint(synthetic_root, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainables.data.shard", "--echonet-root", str(synthetic_root[0]),
                           "--out", "s3://nobody/v1", "--s3-endpoint", dead], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "cannot" in proc.stderr and dead in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 90


def test_aws_endpoint_url_is_honoured(s3_endpoint, s3_shards, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    ds = EchoClipDataset(s3_shards[0], "val", cache_dir=tmp_path)  # no s3_endpoint argument
    assert len(ds) == s3_shards[1]["splits"]["val"]


def test_rerun_skips_or_replaces_whole(s3_endpoint, synthetic_root, bucket):
    uri = f"{bucket}/v1"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(f"{uri}/train/part-00042.parquet", b"left over by a killed run")  # no manifest: incomplete
    first = write_shards(synthetic_root[0], uri, rows_per_file=2, s3_endpoint=s3_endpoint)
    again = write_shards(synthetic_root[0], uri, rows_per_file=2, s3_endpoint=s3_endpoint)
    assert again.get("skipped") and again["files"] == first["files"]
    replaced = write_shards(synthetic_root[0], uri, rows_per_file=5, s3_endpoint=s3_endpoint)
    on_store = sorted(p.split("/v1/", 1)[1] for p in fs.glob(f"{uri}/*/part-*.parquet"))
    assert on_store == sorted(f["path"] for f in replaced["files"])
    assert json.loads(fs.cat(f"{uri}/manifest.json"))["params"]["rows_per_file"] == 5


def test_shard_cli_local_and_bad_root(synthetic_root, tmp_path):
    out = tmp_path / "shards"
    ok = subprocess.run([sys.executable, "-m", "trainables.data.shard", "--echonet-root", str(synthetic_root[0]),
                         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "rejected 14 videos" in ok.stdout and (out / "manifest.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "trainables.data.shard", "--echonet-root", str(tmp_path / "none"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_csv_cells_reject_videos_and_the_shard_run_goes_on(synthetic_root, tmp_path):
    """A FileList row with a missing cell and text in a tracing's Y1 each cost one video, with a reason."""
    src = synthetic_root[0]
    root = tmp_path / "root"
    root.mkdir()
    (root / "Videos").symlink_to(src / "Videos")
    good = [s.file_name for s in read_echonet(src)[0]]
    filelist = (src / "FileList.csv").read_text().splitlines()
    filelist = [",".join(line.split(",")[:-1]) if line.startswith(good[0]) else line for line in filelist]
    (root / "FileList.csv").write_text("\n".join(filelist) + "\n")
    tracings = (src / "VolumeTracings.csv").read_text().splitlines()
    hit = next(i for i, line in enumerate(tracings) if line.startswith(good[1]))
    cells = tracings[hit].split(",")
    tracings[hit] = ",".join([cells[0], cells[1], "abc", *cells[3:]])
    (root / "VolumeTracings.csv").write_text("\n".join(tracings) + "\n")

    proc = subprocess.run([sys.executable, "-m", "trainables.data.shard", "--echonet-root", str(root),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "bad_filelist_row 1" in proc.stdout and "bad_value 1" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {r["file_name"]: r["reason"] for r in manifest["rejected"]}
    assert reasons[good[0]].startswith("bad_filelist_row: Split is missing")
    assert reasons[good[1]].startswith("bad_value: Y1 'abc' is not a number (VolumeTracings.csv line")
    assert sum(manifest["splits"].values()) == len(good) - 2
    assert len(manifest["rejected"]) == len(synthetic_root[1]) + 2


# ---------------------------------------------------------------------------------------------
# The node cache checks itself: damaged entries are reported, removed and fetched again
# ---------------------------------------------------------------------------------------------

def _truncate(arrow: Path) -> None:
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


def _flip_bit_keep_mtime(arrow: Path) -> None:
    """One flipped bit in the frame bytes, size and mtime unchanged: only the checksum can tell."""
    st = arrow.stat()
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x10
    arrow.write_bytes(bytes(data))
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns))


CACHE_DAMAGE = {
    "truncated .arrow in the node cache": _truncate,
    "bit-flipped .arrow in the node cache": _flip_bit_keep_mtime,
    "cache entry without its size/checksum record (older echotune, killed writer)":
        lambda arrow: (arrow.parent / (arrow.name + ".json")).unlink(),
    "garbled size/checksum record": lambda arrow: (arrow.parent / (arrow.name + ".json")).write_text("{oops"),
}

# (bad input or fault, the message fragment a user sees). SHARD stands for <uri>/<split>/part-NNNNN.parquet.
BAD_INPUTS = [
    ("truncated .arrow in the node cache",
     "CacheWarning: damaged cache entry for shard SHARD: <cache>/objects/<sha256>.arrow is 1234 bytes, "
     "2468 when written (truncated or overwritten); removing it and fetching the shard again"),
    ("bit-flipped .arrow in the node cache",
     "does not match the sha256 recorded when it was written (bit rot or overwritten); removing it and "
     "fetching the shard again"),
    ("cache entry without its size/checksum record (older echotune, killed writer)",
     "has no size/checksum record (written by an older echotune, or its writer was killed)"),
    ("garbled size/checksum record", "has an unreadable size/checksum record"),
    ("cache file changed under a running DataLoader worker",
     "cache file <cache>/objects/<sha256>.arrow of shard SHARD changed after it was verified"),
    ("shard on the store differs from the manifest", "corrupt shard SHARD (endpoint ...): sha256"),
    ("truncated shard on the store", "(truncated or replaced). Re-run the shard command to rewrite the set."),
    ("shard listed in the manifest but gone from the store",
     "listed in manifest.json but missing from the store"),
    ("no manifest.json at the URI", "no manifest.json - not a shard set, or sharding did not finish"),
    ("manifest of another schema version", "has schema_version 99; this echotune reads 1"),
    ("manifest that is not JSON (or not UTF-8)", "manifest.json is not valid JSON"),
    ("manifest with a damaged file list", "manifest.json is damaged: files[0] has no valid 'split'"),
    ("nothing listens at the S3 endpoint", "S3 endpoint http://127.0.0.1:PORT failed: HeadObject"),
    ("FileList row with a missing cell during sharding", "bad_filelist_row: Split is missing"),
    ("text in a VolumeTracings Y1 cell during sharding", "bad_value: Y1 'abc' is not a number"),
]
MESSAGE = dict(BAD_INPUTS)


def _clean_items(ds) -> list[tuple]:
    items = (ds[i] for i in range(len(ds)))
    return [(it["file_name"], it["clip"].tobytes(), it["landmarks"].tobytes()) for it in items]


@pytest.fixture(scope="module")
def clean_train(s3_shards, s3_endpoint, tmp_path_factory):
    cache = tmp_path_factory.mktemp("clean")
    ds = EchoClipDataset(s3_shards[0], "train", s3_endpoint=s3_endpoint, cache_dir=cache)
    return _clean_items(ds)


@pytest.mark.parametrize("what", list(CACHE_DAMAGE))
def test_damaged_cache_entry_is_refetched(s3_shards, s3_endpoint, clean_train, tmp_path, monkeypatch, what):
    uri, manifest = s3_shards
    entry = next(f for f in manifest["files"] if f["split"] == "train")
    EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)  # fills the cache
    arrow = tmp_path / "objects" / f"{entry['sha256']}.arrow"
    CACHE_DAMAGE[what](arrow)
    monkeypatch.setattr(stream, "_VERIFIED", {})  # a later run: nothing verified yet in this process
    with pytest.warns(stream.CacheWarning) as caught:
        ds = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    text = " ".join(str(w.message) for w in caught)
    assert f"{uri}/{entry['path']}" in text and str(arrow) in text  # names the shard and the cache file
    fragment = MESSAGE[what].replace("CacheWarning: ", "").replace("SHARD", f"{uri}/{entry['path']}")
    assert fragment.split(": <cache>")[0] in text
    assert _clean_items(ds) == clean_train  # the same frames and labels as a clean cache
    assert not stream._check_arrow(arrow, entry)  # repaired, with a fresh record
    assert not list((tmp_path / "objects").glob("*.tmp*")) and not list((tmp_path / "objects").glob("*.parquet"))


def test_cache_file_replaced_during_the_process_is_checked_again(s3_shards, s3_endpoint, clean_train,
                                                                 tmp_path):
    """Within a process a verified file is only stat()ed again; a changed size or mtime re-checks it."""
    uri = s3_shards[0]
    EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    _truncate(sorted((tmp_path / "objects").glob("*.arrow"))[0])
    with pytest.warns(stream.CacheWarning, match="truncated or overwritten"):
        ds = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    assert _clean_items(ds) == clean_train


def test_concurrent_trials_repair_a_damaged_entry_once(s3_shards, s3_endpoint, tmp_path):
    uri = s3_shards[0]
    EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    for arrow in (tmp_path / "objects").glob("*.arrow"):
        _truncate(arrow)
    code = ("import sys; from trainables.data.stream import EchoClipDataset as D; "
            "d = D(sys.argv[1], 'train', s3_endpoint=sys.argv[2], cache_dir=sys.argv[3]); "
            "print(d[0]['clip'].sum())")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, s3_endpoint, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0] for o in outs}) == 1
    n_files = len(list((tmp_path / "objects").glob("*.arrow")))
    assert sum(o[1].count("damaged cache entry") for o in outs) == n_files  # each entry repaired once
    assert not list((tmp_path / "objects").glob("*.tmp*")) and not list((tmp_path / "objects").glob("*.parquet"))


def test_truncation_message_gives_both_sizes(s3_shards, s3_endpoint, tmp_path):
    uri, manifest = s3_shards
    EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    arrow = sorted((tmp_path / "objects").glob("*.arrow"))[0]
    size = arrow.stat().st_size
    _truncate(arrow)
    with pytest.warns(stream.CacheWarning, match=rf"is {size // 2} bytes, {size} when written \(truncated"):
        EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)


def test_verified_files_are_not_hashed_again_in_the_process(s3_shards, s3_endpoint, tmp_path, monkeypatch):
    uri = s3_shards[0]
    first = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    calls = []
    real = stream._sha256
    monkeypatch.setattr(stream, "_sha256", lambda p: calls.append(p) or real(p))
    again = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    assert calls == [] and np.array_equal(again[0]["clip"], first[0]["clip"])
    monkeypatch.setattr(stream, "_VERIFIED", {})  # a new process checks each file once
    EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    assert len(calls) == len(again.paths)


def test_worker_refuses_a_cache_file_changed_after_verification(s3_shards, s3_endpoint, tmp_path,
                                                                monkeypatch):
    import pickle

    uri, manifest = s3_shards
    ds = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path)
    monkeypatch.setattr(stream, "_VERIFIED", {})  # what a spawned DataLoader worker starts with
    worker = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(worker[0]["clip"], ds[0]["clip"])  # unchanged file: trusted without hashing
    later = pickle.loads(pickle.dumps(ds))
    monkeypatch.setattr(stream, "_VERIFIED", {})
    _truncate(ds.paths[0])
    shard = ds.shard_names[0]
    with pytest.raises(ShardError, match=MESSAGE["cache file changed under a running DataLoader worker"]
                       .replace("<cache>/objects/<sha256>.arrow", re.escape(str(ds.paths[0])))
                       .replace("SHARD", re.escape(shard))):
        later[0]


@pytest.mark.parametrize("what, content", [
    ("manifest that is not JSON (or not UTF-8)", b"\xff\xfe\x00 binary"),
    ("manifest with a damaged file list",
     json.dumps({"schema_version": 1, "files": [{"path": "x"}]}).encode()),
])
def test_damaged_manifest_is_named_and_a_rerun_replaces_it(s3_endpoint, synthetic_root, bucket, what,
                                                           content):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(f"{bucket}/v1/manifest.json", content)
    with pytest.raises(ShardError, match=re.escape(MESSAGE[what])) as err:
        ShardSet(f"{bucket}/v1", s3_endpoint=s3_endpoint)
    assert f"{bucket}/v1" in str(err.value) and "re-run the shard command" in str(err.value)
    write_shards(synthetic_root[0], f"{bucket}/v1", rows_per_file=6, s3_endpoint=s3_endpoint)
    assert ShardSet(f"{bucket}/v1", s3_endpoint=s3_endpoint).files("train")


def test_every_bad_input_is_listed():
    assert set(CACHE_DAMAGE) < set(MESSAGE)
