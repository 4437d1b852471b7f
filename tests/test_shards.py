"""Shards on a real S3 server (moto on 127.0.0.1): round trip, cache, corruption, re-runs, bad endpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import s3fs

from tests.conftest import free_port
from trainables.data import storage
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
