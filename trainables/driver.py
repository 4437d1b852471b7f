"""One trial on Ray Train: build a TorchTrainer for a TrialConfig and fit it.

Two callers: ``trial_driver(config)`` is the Ray Tune trainable (Train V2 pattern: the Tune trial
is a driver function; metrics reach Tune through ``TuneReportCallback``), and
``python -m trainables.train`` runs one trial on its own. The Train run is named
``train-<trial_id>`` (or the config's ``name``) on shared storage with no timestamp, so a restarted
trial finds its checkpoints and resumes by itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainables.config import TrialConfig

# Worker groups start slowly on small machines and on autoscaled GPU pools (RAY.md §1.7).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def default_storage() -> str:
    return str(Path("results/train").resolve())


def resolve(cfg: TrialConfig, name: str | None = None) -> TrialConfig:
    """Fill in storage and run name, so workers (and checkpoints) see the final values."""
    cfg.storage = cfg.storage or default_storage()
    if "://" not in cfg.storage:  # Ray wants absolute local paths
        cfg.storage = str(Path(cfg.storage).resolve())
    cfg.name = name or cfg.name or "train-local"
    return cfg.validate()


def build_trainer(cfg: TrialConfig, callbacks=()):
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
    return TorchTrainer(train_loop_per_worker, train_loop_config=cfg.to_dict(), scaling_config=scaling,
                        run_config=run_config)


def trial_driver(config: dict) -> None:
    """Ray Tune trainable: ``config`` is a TrialConfig dict (possibly under the key ``trial``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrialConfig.from_dict(config.get("trial", config))
    cfg = resolve(cfg, f"train-{ray.tune.get_context().get_trial_id()}")
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
