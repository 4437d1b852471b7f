"""Shared fixtures: a real S3 server on 127.0.0.1 (moto's server mode) and synthetic EchoNet data."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

# Dummy credentials: moto accepts any; the metadata flag stops SDK probes of the EC2 endpoint.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_of(stdout: str) -> dict:
    """The result JSON that `trainables.train` and `search.replay` print last (found by its shape, so
    a stray log line after it cannot break a test)."""
    import json

    return json.loads(next(line for line in reversed(stdout.strip().splitlines()) if line.startswith('{"name"')))


def trial_rows(folder: Path) -> list[dict]:
    """The per-trial rows of an experiment's pareto.csv (search.pareto's export)."""
    import csv

    with (folder / "pareto.csv").open() as f:
        return list(csv.DictReader(f))


def _gone(p) -> bool:
    """A process that runs no code: exited, or a zombie (an orphan stays one until PID 1 reaps it)."""
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_ray_cluster(address: str, timeout: float = 60.0) -> None:
    """Stop the Ray cluster whose GCS listens at ``address`` (host:port) on this machine, and only it.
    ``ray stop --force`` kills every Ray process on the machine: another test's instance, a user's
    notebook, a benchmark running beside the suite. The cluster's processes are this user's Ray
    processes that name its GCS on their command line (``host:port`` with one of this machine's
    addresses, or the GCS's own ``--gcs_server_port``); their descendants (workers, renamed
    ``ray::IDLE``) go with them, never this process or its parents. Repeated until none is left
    (the autoscaler may start a node meanwhile). Ray's "current cluster" file (which a bare
    ``ray.init()`` would join) is removed only if it names this cluster."""
    import psutil
    from ray._common.utils import get_ray_address_file

    port = address.rsplit(":", 1)[1]
    hosts = {address.rsplit(":", 1)[0], "127.0.0.1", "localhost"} | {
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    mark = re.compile(rf"(?:(?<![\w.])(?:{'|'.join(map(re.escape, hosts))}):{port}|--gcs_server_port={port})(?!\d)")
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}

    def ours(p) -> bool:
        try:
            line = " ".join(p.cmdline())
            return p.uids().real == os.getuid() and "ray" in line and bool(mark.search(line))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    for _ in range(5):
        procs = {}
        for root in (p for p in psutil.process_iter() if p.pid not in spared and ours(p)):
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.update({p.pid: p for p in (root, *root.children(recursive=True)) if p.pid not in spared})
        procs = {pid: p for pid, p in procs.items() if not _gone(p)}
        if not procs:
            break
        for p in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.kill()
        _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
        assert all(_gone(p) for p in alive), f"still running after SIGKILL: {alive}"
    current = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):  # it names the head by the node's IP: compare the port
        if current.read_text().strip().rsplit(":", 1)[-1] == port:
            current.unlink()


def kill_everything(proc: subprocess.Popen) -> None:
    """kill -9 a process started with ``start_new_session=True`` and everything it started (driver,
    Ray's raylet and GCS, Train workers), as a machine crash would, and wait until none is left.
    Killing the process group alone is not enough: a Ray worker still finishing a checkpoint upload
    outlived it by a moment and wrote after the test had looked. The tree is frozen (SIGSTOP) until
    no new process appears, so none started meanwhile escapes, then killed."""
    import psutil

    def tree(pids):
        found = {}
        for pid in pids:
            try:
                root = psutil.Process(pid)
                for p in (root, *root.children(recursive=True)):
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        return found

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)
    seen: dict = {}
    while True:
        new = {pid: p for pid, p in tree([proc.pid, *seen]).items() if pid not in seen}
        if not new:
            break
        for p in new.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
        seen.update(new)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in seen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()

    deadline = time.time() + 30
    while (alive := [p for p in seen.values() if not _gone(p)]) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes survived kill -9: {alive}"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a moto S3 server started for this test session (a subprocess on a free port)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
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
    yield url
    proc.terminate()  # moto has been seen to ignore SIGTERM for seconds (DATA.md §3.1)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket; returns its s3:// URI."""
    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic EchoNet-format root with every defect; returns (path, {file_name: defect})."""
    from trainables.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("echonet")
    defects = write_synthetic(root, n_videos=12, seed=7, defects=True, max_frames=70)
    return root, defects


@pytest.fixture(scope="session")
def s3_shards(s3_endpoint, synthetic_root):
    """The synthetic root sharded onto the loopback S3 server: (uri, manifest)."""
    import s3fs

    from trainables.data.shard import write_shards

    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir("session-shards")
    uri = "s3://session-shards/echonet/v1"
    manifest = write_shards(synthetic_root[0], uri, rows_per_file=3, row_group_size=2, s3_endpoint=s3_endpoint)
    return uri, manifest
