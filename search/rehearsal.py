"""Scheduling rehearsal: the whole search machinery with trials that sleep instead of training.

    python -m search.run --address auto --trainable rehearsal --space selective_ft --max-concurrent 4

Before spending GPU hours on a new cluster, check that trial drivers land on the TRAIN_DRIVER
node, Train workers on GPU nodes, the autoscaler adds GPU nodes, concurrency follows the GPUs,
and ASHA-stopped trials free their GPUs so later trials start. Every trial is a real Ray Train
run (same scaling config and placement as training) whose workers sleep for each "epoch" and
report made-up metrics (marked ``rehearsal: 1``) plus where they ran.
"""

from __future__ import annotations

import os
import time
import zlib

EPOCH_S = float(os.environ.get("ECHOTUNE_REHEARSAL_EPOCH_S", "2"))


def fake_error(params: dict, epoch: int) -> float:
    """A deterministic, decreasing curve per configuration (no meaning beyond scheduling)."""
    h = zlib.crc32(repr(sorted(params.items())).encode()) % 1000 / 1000
    return 4 + 6 * h + 8 / epoch


def rehearsal_worker(config: dict) -> None:
    import ray
    import ray.train

    ctx = ray.train.get_context()
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(EPOCH_S)
        metrics = {"epoch": epoch, "val_px_error": fake_error(config["params"], epoch),
                   "trainable_params": 1000 * (1 + zlib.crc32(str(config["params"].get("n_unfrozen")).encode()) % 7),
                   "total_params": 10000, "rehearsal": 1,
                   "worker_node": ray.get_runtime_context().get_node_id(),
                   "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                   "world_size": ctx.get_world_size(), "driver_node": config["driver_node"]}
        ray.train.report(metrics)


def run_rehearsal(params: dict, trial_cfg: dict) -> None:
    """The rehearsal trial driver (a Tune trainable body)."""
    import ray
    import ray.train
    import ray.tune
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.data import storage

    gpus = 1 if trial_cfg.get("use_gpu") else 0
    scaling = ray.train.ScalingConfig(num_workers=trial_cfg.get("workers", 1), use_gpu=bool(gpus),
                                      resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})})
    trial_id = ray.tune.get_context().get_trial_id()
    fs = storage.pyarrow_fs(trial_cfg["storage"], trial_cfg["data"].get("s3_endpoint"))
    driver_node = ray.get_runtime_context().get_node_id()  # where this trial's driver runs
    run_config = ray.train.RunConfig(name=f"train-{trial_id}", storage_path=fs[1] if fs else trial_cfg["storage"],
                                     storage_filesystem=fs[0] if fs else None, callbacks=[TuneReportCallback()])
    trainer = DataParallelTrainer(rehearsal_worker, train_loop_config={"epochs": trial_cfg["epochs"], "params": params,
                                                                       "driver_node": driver_node},
                                  scaling_config=scaling, run_config=run_config)
    trainer.fit()
