"""A stalled S3 endpoint fails every operation with a clear error within the documented bound.

The endpoint is a private moto server paused with SIGSTOP: its kernel still accepts connections
and buffers requests, but nothing answers - what a hung server, proxy or network path looks like.
The production timeouts are used (storage.STALL_BOUND_S); the operations run in parallel, so
the test costs one bound (~45 s), not one per operation. After SIGCONT the same calls succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from trainables.data import storage
from trainables.data.shard import write_shards
from trainables.data.stream import EchoClipDataset, ShardSet

SLACK_S = 20  # a loaded 2-core CI machine: thread start-up, scheduling, GIL

# (fault, the message fragment a user sees). ENDPOINT stands for the endpoint URL.
BAD_INPUTS = [
    ("S3 endpoint stalls while the shard manifest is read",
     "cannot read shard manifest from s3://stall/v1: S3 endpoint ENDPOINT did not answer in time: "
     "HeadObject s3://stall/v1/manifest.json gave up after"),
    ("S3 endpoint stalls while a shard is downloaded into the node cache",
     "cannot download shard s3://stall/v1/train/part-00000.parquet: "
     "S3 endpoint ENDPOINT did not answer in time"),
    ("S3 endpoint stalls during an upload (pipe / put / open('wb'), e.g. shards, TensorBoard)",
     "S3 endpoint ENDPOINT did not answer in time: PutObject s3://stall/up/small gave up after"),
    ("S3 endpoint stalls while shards are written",
     "cannot open shard output s3://stall/again: S3 endpoint ENDPOINT did not answer in time"),
    ("pyarrow S3 (Ray experiment storage) upload to a stalled endpoint",
     "AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 28, "
     "Timeout was reached"),
]
MESSAGE = dict(BAD_INPUTS)
# every StorageError above ends with what to do:
ADVICE = "Check that the endpoint is up and reachable from this machine (--s3-endpoint / AWS_ENDPOINT_URL)"


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory):
    """(url, process) of a moto server of this module alone: pausing it leaves the session server alone."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto-private") / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {url}; see {log.name}")
            time.sleep(0.2)
    yield url, proc
    os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM until continued
    proc.kill()
    proc.wait(10)
    log.close()


class Timed(threading.Thread):
    """Runs ``fn`` in a thread; ``elapsed`` and ``error`` afterwards."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error, self.elapsed = fn, None, None

    def run(self):
        t0 = time.monotonic()
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        self.elapsed = time.monotonic() - t0


def _write_through_open(fs, path: str) -> None:
    with fs.open(path, "wb") as f:  # S3File uploads on close
        f.write(b"y" * 1000)


def _pyarrow_upload(url: str, key: str, size: int) -> None:
    fs, base = storage.pyarrow_fs("s3://stall/ray", url)
    with fs.open_output_stream(f"{base}/{key}") as f:
        f.write(os.urandom(size))


def test_documented_bound():
    assert storage.STALL_BOUND_S <= 60
    # a stalled request makes BOTO_ATTEMPTS x S3_RETRIES attempts of READ_TIMEOUT_S each
    assert storage.BOTO_ATTEMPTS * storage.S3_RETRIES * storage.READ_TIMEOUT_S < storage.REQUEST_DEADLINE_S
    assert storage.PA_ATTEMPTS * storage.PA_REQUEST_TIMEOUT_S < storage.STALL_BOUND_S
    # a download that stalls half-way: one read timeout, then a re-request within the deadline
    assert storage.REQUEST_DEADLINE_S + storage.READ_TIMEOUT_S <= storage.STALL_BOUND_S
    assert f"STALL_BOUND_S = {storage.STALL_BOUND_S} s" in storage.__doc__


# slow (~50 s: it waits out the stall bound): `make test-all`
@pytest.mark.slow
def test_stalled_endpoint_fails_clearly_in_time_then_a_rerun_succeeds(private_s3, synthetic_root, tmp_path):
    url, proc = private_s3
    fs, _ = storage.open_fs("s3://stall", url)
    fs.mkdir("stall")
    manifest = write_shards(synthetic_root[0], "s3://stall/v1", rows_per_file=4, s3_endpoint=url)
    entry = next(f for f in manifest["files"] if f["split"] == "train")
    loaded = ShardSet("s3://stall/v1", s3_endpoint=url, cache_dir=tmp_path / "early")  # manifest read before
    local = tmp_path / "tb"
    local.mkdir()
    (local / "events.out").write_bytes(os.urandom(50_000))

    def upload(fs_call):
        return lambda: fs_call(storage.open_fs("s3://stall", url)[0])

    ops = {
        "manifest": lambda: ShardSet("s3://stall/v1", s3_endpoint=url, cache_dir=tmp_path / "c1"),
        "download": lambda: loaded.local_arrow(entry),
        "pipe_small": upload(lambda f: f.pipe_file("stall/up/small", b"x" * 1000)),
        # 12 MB: more than the stopped server's receive window takes, so sending the body stalls
        # (ended by the write timeout, TCP_USER_TIMEOUT); the small bodies wait for an answer instead
        "pipe_large": upload(lambda f: f.pipe_file("stall/up/large", os.urandom(12 << 20))),
        "put_dir": upload(lambda f: f.put(str(local) + "/", "stall/up/tb/", recursive=True)),
        "open_write": upload(lambda f: _write_through_open(f, "stall/up/opened")),
        "write_shards": lambda: write_shards(synthetic_root[0], "s3://stall/again", rows_per_file=4,
                                             s3_endpoint=url),
        "pyarrow_upload": lambda: _pyarrow_upload(url, "ckpt.bin", 1000),
    }
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        threads = {name: Timed(fn) for name, fn in ops.items()}
        for t in threads.values():
            t.start()
        for t in threads.values():
            t.join(storage.STALL_BOUND_S + 3 * SLACK_S)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    report = {name: (round(t.elapsed or -1), repr(t.error)[:300]) for name, t in threads.items()}
    print("stall bounds (s):", {name: r[0] for name, r in report.items()})
    for name, t in threads.items():
        assert t.elapsed is not None, f"{name} still waiting after {storage.STALL_BOUND_S + 3 * SLACK_S} s"
        assert t.elapsed < storage.STALL_BOUND_S + SLACK_S, report
        assert t.error is not None, f"{name} succeeded against a stopped server?"
    for name in ops:
        if name != "pyarrow_upload":
            err = threads[name].error
            assert isinstance(err, storage.StorageError), (name, err)
            assert url in str(err) and ADVICE in str(err) and "testing" not in str(err), (name, str(err))
    msg = {name: str(threads[name].error).replace(url, "ENDPOINT") for name in ops}
    assert MESSAGE["S3 endpoint stalls while the shard manifest is read"] in msg["manifest"]
    assert MESSAGE["S3 endpoint stalls while a shard is downloaded into the node cache"] in msg["download"]
    upload_case = "S3 endpoint stalls during an upload (pipe / put / open('wb'), e.g. shards, TensorBoard)"
    assert MESSAGE[upload_case] in msg["pipe_small"]
    assert MESSAGE["S3 endpoint stalls while shards are written"] in msg["write_shards"]
    assert MESSAGE["pyarrow S3 (Ray experiment storage) upload to a stalled endpoint"] \
        in msg["pyarrow_upload"]
    assert not list((tmp_path / "early").glob("objects/*.parquet*"))  # no half download left in the cache

    # The endpoint is back: the same calls succeed.
    ds = EchoClipDataset("s3://stall/v1", "train", s3_endpoint=url, cache_dir=tmp_path / "c2")
    assert len(ds) == manifest["splits"]["train"] and ds[0]["clip"].shape == (16, 112, 112)
    assert loaded.local_arrow(entry).is_file()
    again_fs = storage.open_fs("s3://stall", url)[0]
    again_fs.pipe_file("stall/up/large", b"z" * (1 << 20))
    again_fs.put(str(local) + "/", "stall/up/tb/", recursive=True)
    assert again_fs.cat_file("stall/up/tb/events.out") == (local / "events.out").read_bytes()
    assert write_shards(synthetic_root[0], "s3://stall/again", rows_per_file=4, s3_endpoint=url)["files"]
    _pyarrow_upload(url, "ckpt.bin", 1000)


def test_refused_connection_fails_at_once(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    fs, _ = storage.open_fs("s3://nobody", dead)
    t0 = time.monotonic()
    refused = r"S3 endpoint http://127\.0\.0\.1:\d+ failed: PutObject"
    with pytest.raises(storage.StorageError, match=refused) as err:
        fs.pipe_file("nobody/x", b"1")
    assert time.monotonic() - t0 < 15 and ADVICE in str(err.value)


def test_messages_never_show_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    exc = RuntimeError("signature s3cr3t-value in https://h/b/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA")
    text = str(storage.storage_error("s3://b/k", "https://user:pw@h:9000", exc, "read"))
    assert "s3cr3t" not in text and "abc123" not in text and "AKIA" not in text and "pw@" not in text
    assert "https://h:9000" in text


def test_filesystem_survives_pickling():
    import pickle

    fs, _ = storage.open_fs("s3://b/k", "http://127.0.0.1:9")
    copy = pickle.loads(pickle.dumps(fs))
    assert type(copy) is storage.BoundedS3FileSystem and copy.retries == storage.S3_RETRIES


def test_every_fault_is_tested():
    assert len(MESSAGE) == len(BAD_INPUTS) == 5
    assert Path(__file__).read_text().count("MESSAGE[") >= len(MESSAGE)
