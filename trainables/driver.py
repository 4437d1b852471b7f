"""One trial on Ray Train: build a TorchTrainer for a TrialConfig and fit it.

Two callers: ``trial_driver(config)`` is the Ray Tune trainable (Train V2 pattern: the Tune trial
is a driver function; metrics reach Tune through ``TuneReportCallback``), and
``python -m trainables.train`` runs one trial on its own. The Train run is named
``train-<trial_id>`` (or the config's ``name``) on shared storage with no timestamp, so a restarted
trial finds its checkpoints and resumes by itself.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from trainables.config import TrialConfig

# Worker groups start slowly on small machines and on autoscaled GPU pools (RAY.md §1.7).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
log = logging.getLogger("echotune.driver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_url(address: str) -> str | None:
    """The dashboard (State API) URL a running cluster recorded in its GCS, or None without one.
    Read directly with short timeouts: Ray's own helper retries for ~40 s and sets global state."""
    if "://" in address:  # a Ray Client address: the State API resolves it itself
        return None
    import time

    from ray._private import ray_constants
    from ray._raylet import GcsClient

    try:
        gcs = GcsClient(address=address)
        for _ in range(5):  # the dashboard registers itself a moment after the head starts
            url = gcs.internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(),
                                      ray_constants.KV_NAMESPACE_DASHBOARD, timeout=5)
            if url:
                return f"http://{url.decode()}"
            time.sleep(1)
    except Exception as exc:  # unreachable GCS: ray.init reports it properly next
        log.debug("could not read the dashboard address of %s: %s", address, exc)
        return None
    log.warning("the Ray cluster at %s has no dashboard: placement groups of trials that die uncleanly "
                "may not be freed (Train frees them through the State API)", address)
    return None


def init_ray(address: str | None) -> None:
    """Start (or, with ``address``, join) this program's own Ray instance.

    Without ``address`` a *new* local instance starts (``address="local"``), never one that
    ``ray start``, a notebook or another search left on the machine. Train V2 frees the placement
    groups of finished and stopped trials through the State API (RAY.md §1.7), whose client finds
    its server by looking for Ray instances on the machine and gives up when it sees several
    ("multiple active Ray instances"): the placement group leaks and the next trial waits forever.
    So the State API address is pinned, for this process and every Ray process it starts, before
    Ray starts.
    """
    import ray

    # Train's controller polls its workers (reports, the end of a run) every 2 s by default: a
    # fixed ~6 s per trial on the 2-core demo machine. Polling every 0.5 s costs nothing noticeable.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address:
        if address == "auto":
            from ray._private.services import canonicalize_bootstrap_address_or_die
            address = canonicalize_bootstrap_address_or_die(address)
        os.environ["RAY_ADDRESS"] = address  # the State API resolves the cluster from it
        env = {"RAY_ADDRESS": address, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
               os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
        # RAY_API_SERVER_ADDRESS wins over RAY_ADDRESS in the State API client. One left in this
        # process or in the cluster's own environment by an earlier local instance points at a dead
        # dashboard: every trial's placement group then leaked and the search hung. Pin the
        # cluster's real dashboard (from its GCS) for us and for every job process instead.
        api = _dashboard_url(address)
        if api:
            os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"] = api
        else:  # empty counts as unset: the State API falls back to RAY_ADDRESS
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            env["RAY_API_SERVER_ADDRESS"] = ""
        ray.init(address=address, include_dashboard=True, log_to_driver=True, runtime_env={"env_vars": env})
        return
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by Ray's processes
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=True)


def default_storage() -> str:
    return str(Path("results/train").resolve())


def resolve(cfg: TrialConfig, name: str | None = None) -> TrialConfig:
    """Fill in storage and run name, so workers (and checkpoints) see the final values."""
    cfg.storage = cfg.storage or default_storage()
    if "://" not in cfg.storage:  # Ray wants absolute local paths
        cfg.storage = str(Path(cfg.storage).resolve())
    cfg.name = name or cfg.name or "train-local"
    return cfg.validate()


def build_trainer(cfg: TrialConfig, callbacks=(), tune_epoch: int = 0):
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.data import storage
    from trainables.loop import train_loop_per_worker

    fs = storage.pyarrow_fs(cfg.storage, cfg.data.s3_endpoint)
    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=fs[1] if fs else cfg.storage, storage_filesystem=fs[0] if fs else None,
        callbacks=list(callbacks), failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                      resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})})
    return TorchTrainer(train_loop_per_worker, train_loop_config={"trial": cfg.to_dict(), "tune_epoch": tune_epoch},
                        scaling_config=scaling, run_config=run_config)


def trial_driver(config: dict, tune_epoch: int = 0) -> None:
    """Ray Tune trainable: ``config`` is a TrialConfig dict (possibly under the key ``trial``);
    ``tune_epoch`` is how many epochs Tune already holds for this trial (a restarted trial)."""
    import ray.tune

    from trainables.tune_report import ExactlyOnceReport

    cfg = TrialConfig.from_dict(config.get("trial", config))
    cfg = resolve(cfg, f"train-{ray.tune.get_context().get_trial_id()}")
    build_trainer(cfg, callbacks=[ExactlyOnceReport(tune_epoch)], tune_epoch=tune_epoch).fit()
