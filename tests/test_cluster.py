"""Cluster configurations, validated offline with Ray's own checks, and a simulated GPU cluster on one
machine (Ray's fake multi-node autoscaler) running a rehearsal search."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, stop_ray_cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    if cfg.get("provider", {}).get("type") == "fake_multinode":
        # The 2.60.0 wheel lacks this provider's defaults file, so prepare_config cannot run;
        # fake.yaml is written complete for that reason and goes straight to the schema check.
        validate_config(cfg)
        return cfg
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_cluster_yaml_passes_rays_validation(path):
    prepared = validate(yaml.safe_load(path.read_text()))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def gpu_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())


def test_gpu_yaml_shape():
    cfg = gpu_yaml()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("TRAIN_DRIVER", 0) >= 1 and head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}
    assert all(t["min_workers"] == 0 for t in gpu_types.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu_types.values())
    for t in types.values():
        assert all(isinstance(v, int) for v in t["resources"].values())
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    text = (ROOT / "cluster" / "gpu.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()  # instance profile only
    assert "--dashboard-host=127.0.0.1" in text  # reachable through `ray dashboard` port forwarding only
    assert "pip install" in " ".join(cfg["setup_commands"])


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c.__setitem__("max_worker", c.pop("max_workers")), "Additional properties are not allowed"),
    (lambda c: c["available_node_types"]["gpu_1x24gb"]["resources"].__setitem__("GPU", 0.5), "is not of type 'integer'"),
    (lambda c: c.pop("head_node_type"), "head_node_type"),
])
def test_validation_catches_mistakes(break_it, message):
    cfg = gpu_yaml()
    break_it(cfg)
    with pytest.raises(Exception, match=message):
        validate(cfg)


def test_onprem_typo_is_caught():
    cfg = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    cfg["setup_comands"] = cfg.pop("setup_commands")
    with pytest.raises(Exception, match="Additional properties are not allowed"):
        validate(cfg)


def test_default_concurrency_follows_the_gpus():
    from types import SimpleNamespace

    from search.run import concurrency

    args = SimpleNamespace(max_concurrent=None, gpus_per_worker=1, workers_per_trial=1)
    assert concurrency(args, {"GPU": 8, "CPU": 96}) == 8
    args.workers_per_trial = 4
    assert concurrency(args, {"GPU": 8, "CPU": 96}) == 2
    args.max_concurrent = 3
    assert concurrency(args, {"GPU": 8}) == 3


# --- a simulated GPU cluster ------------------------------------------------------------------------

def ray_cli(*args, env=None, timeout=120):
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def fake_cluster(tmp_path):
    """A head (2 CPUs, TRAIN_DRIVER) whose autoscaler adds fake GPU nodes from cluster/fake.yaml."""
    port = free_port()
    cfg = yaml.safe_load((ROOT / "cluster" / "fake.yaml").read_text())
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # fake nodes join this head, on loopback
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # A one-machine test cluster: token auth off on both sides (clients would need the head's token).
    # The cluster inherits a State API address pinned by a local Ray instance that is long gone, as
    # a `ray start` after an earlier search (or after this suite's in-process tests) does: Train's
    # placement-group cleaner must still reach this cluster's dashboard (trainables.driver).
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled",
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{free_port()}")
    env.pop("RAY_ADDRESS", None)
    started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                      '--resources={"TRAIN_DRIVER": 8}', f"--autoscaling-config={config}",
                      f"--dashboard-port={free_port()}", env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_cluster(f"127.0.0.1:{port}")  # this cluster only (and the "current cluster" file naming it)


JOIN_PROBE = """
import json, os, sys
import ray
from trainables.driver import init_ray

init_ray(sys.argv[1])

@ray.remote(num_cpus=0)
def probe():  # what Train's placement-group cleaner does in a job process: ask the State API
    from ray.util.state import list_nodes
    return os.environ.get("RAY_API_SERVER_ADDRESS"), len(list_nodes(timeout=10))

print(json.dumps([os.environ.get("RAY_API_SERVER_ADDRESS"), *ray.get(probe.remote())]))
"""


def test_joining_a_cluster_pins_its_own_state_api(tmp_path):
    """A cluster head started with a stale RAY_API_SERVER_ADDRESS in its environment (left by a local
    instance long gone), joined by a driver with another stale one: the driver and its job processes
    reach the cluster's own dashboard (else Train's placement groups leak and a search hangs)."""
    port, dash, bystander = free_port(), free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{free_port()}")
    env.pop("RAY_ADDRESS", None)
    # Another Ray instance on the machine (a user's, another test's): stopping ours must leave it running.
    other = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={bystander}", "--num-cpus=1",
                    "--include-dashboard=false", env=env, timeout=180)
    assert other.returncode == 0, other.stdout + other.stderr
    started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{free_port()}"
        proc = subprocess.run([sys.executable, "-c", JOIN_PROBE, f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=180, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        driver, worker, nodes = json.loads(proc.stdout.strip().splitlines()[-1])
        assert driver == worker == f"http://127.0.0.1:{dash}" and nodes == 1
    finally:
        stop_ray_cluster(f"127.0.0.1:{port}")
        current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        # a bare ray.init() no longer joins the stopped cluster
        assert not current.exists() or not current.read_text().strip().endswith(f":{port}")
        try:
            status = ray_cli("status", f"--address=127.0.0.1:{bystander}", env=env, timeout=60)
            assert status.returncode == 0 and "1.0 CPU" in status.stdout, status.stdout + status.stderr
        finally:
            stop_ray_cluster(f"127.0.0.1:{bystander}")


def trial_results(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for f in folder.glob("trial_*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


# slow (~90 s with the fake cluster's start and stop): `make test-all`
@pytest.mark.slow
def test_simulated_gpu_cluster_runs_a_rehearsal_search(fake_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = dict(os.environ, PYTHONUNBUFFERED="1", ECHOTUNE_REHEARSAL_EPOCH_S="2",
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{free_port()}")  # stale here too
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "search.run", "--address", fake_cluster, "--trainable", "rehearsal",
           "--space", "smoke", "--num-samples", "6", "--max-epochs", "3", "--gpus-per-worker", "1",
           "--max-concurrent", "2", "--storage", str(tmp_path), "--name", "sim", "--seed", "1"]
    proc = subprocess.run(cmd + ["--shared-storage"], capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    import ray

    ray.init(address=fake_cluster)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        head = next(n["NodeID"] for n in nodes if n["Resources"].get("TRAIN_DRIVER"))
        gpu_nodes = {n["NodeID"] for n in nodes if n["Resources"].get("GPU")}
    finally:
        ray.shutdown()
    assert len(gpu_nodes) >= 2, "the autoscaler added no GPU nodes"

    results = trial_results(tmp_path / "sim")
    assert len(results) == 6  # stopped trials freed their GPUs: every later trial started and ended
    spans = []
    for rows in results.values():
        assert all(r["driver_node"] == head for r in rows)  # trial drivers on the TRAIN_DRIVER head
        assert all(r["worker_node"] in gpu_nodes and r["gpu_ids"] for r in rows)  # Train workers on GPU nodes
        spans.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
    assert any(len(rows) < 3 for rows in results.values()), "ASHA stopped no trial"
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2  # as many trials at once as there are GPUs for them

    # Now that the cluster has several nodes, a head-local storage path is refused.
    refused = subprocess.run(cmd[:-4] + ["--name", "sim2"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "local folder" in refused.stderr and "s3://" in refused.stderr
