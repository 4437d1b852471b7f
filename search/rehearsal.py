"""Scheduling rehearsal: the whole search machinery with trials that sleep instead of training.

    python -m search.run --address auto --trainable rehearsal --space selective_ft --max-concurrent 4

Before spending GPU hours on a new cluster, check that trial drivers land on the TRAIN_DRIVER
node, Train workers on GPU nodes, the autoscaler adds GPU nodes, concurrency follows the GPUs,
and ASHA-stopped trials free their GPUs so later trials start. Every trial is a real Ray Train
run (same scaling config and placement as training) whose workers sleep for each "epoch" and
report made-up metrics (marked ``rehearsal: 1``) plus where they ran and the first epoch this run
trained (``run_first_epoch``: above 1 when it went on from a checkpoint), and checkpoint like real
trials, so killing and resuming a rehearsal exercises the same resume path.

``ECHOTUNE_REHEARSAL_DIVERGE=F`` (0..1) makes that fraction of configurations report a NaN loss at
their second epoch, to rehearse how the search handles diverging trials (they stop at once, are
FAIL in the study and ``infeasible`` in the export, and the search goes on).
"""

from __future__ import annotations

import os
import time
import zlib

EPOCH_S = float(os.environ.get("ECHOTUNE_REHEARSAL_EPOCH_S", "2"))
DIVERGE = float(os.environ.get("ECHOTUNE_REHEARSAL_DIVERGE", "0"))


def _hash(params: dict, salt: str = "") -> float:
    return zlib.crc32((salt + repr(sorted(params.items()))).encode()) % 1000 / 1000


def fake_error(params: dict, epoch: int) -> float:
    """A deterministic, decreasing curve per configuration (no meaning beyond scheduling);
    NaN from epoch 2 for the configurations that rehearse divergence."""
    if epoch >= 2 and _hash(params, "diverge") < DIVERGE:
        return float("nan")
    return 4 + 6 * _hash(params) + 8 / epoch


def fake_trainable_params(params: dict) -> int:
    """Grows with the unfrozen blocks (or LoRA depth) and the head, as real trainable parameters
    do, so that Pareto rules rehearse on the order they will meet (full fine-tuning costs most)."""
    depth = {"all": 12, None: 0}.get(params.get("n_unfrozen"), params.get("n_unfrozen"))
    depth = int(depth or 0) + int(params.get("lora_last") or 0) // 2
    return 1000 * (1 + depth) + (500 if params.get("head") == "gcn" else 0)


def rehearsal_worker(config: dict) -> None:
    """Sleeps per "epoch", reports made-up metrics, and checkpoints like the real loop (a tiny
    ``history.json``), so a killed and resumed rehearsal exercises the same resume path."""
    import json
    import tempfile
    from pathlib import Path

    import ray
    import ray.train

    from trainables import checkpoints

    ctx = ray.train.get_context()
    history, start, adopted = [], 1, None
    found = checkpoints.tidy(config["run"], config.get("s3_endpoint"), delete=ctx.get_world_rank() == 0)
    if found is not None:  # the newest complete checkpoint, registered by Train or not (checkpoints.py)
        fs, _ = checkpoints.storage.open_fs(config["run"], config.get("s3_endpoint"))
        history = json.loads(fs.cat_file(f"{found.path}/history.json"))
        start = history[-1]["epoch"] + 1 if history else 1
        adopted = None if found.registered or ctx.get_world_rank() else found
    for past in history:  # epochs this run finished before a kill but Tune never recorded (even the last)
        if past["epoch"] > config.get("tune_epoch", 0):
            ray.train.report(past | {"replayed": 1})
    if history and "non_finite" in history[-1]:
        return  # it had diverged: nothing more to run
    for epoch in range(start, config["epochs"] + 1):
        time.sleep(EPOCH_S)
        error = fake_error(config["params"], epoch)
        metrics = {"epoch": epoch, "val_px_error": error, "train_loss": 1.0 / epoch if error == error else error,
                   "trainable_params": fake_trainable_params(config["params"]),
                   "total_params": 20000, "rehearsal": 1, "run_first_epoch": start,
                   "worker_node": ray.get_runtime_context().get_node_id(),
                   "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                   "world_size": ctx.get_world_size(), "driver_node": config["driver_node"]}
        if error != error:
            metrics["non_finite"] = f"train_loss is nan at epoch {epoch}: rehearsed divergence"
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if ctx.get_world_rank() == 0:
                (Path(tmp) / "history.json").write_text(json.dumps(history))
                checkpoints.mark_complete(Path(tmp), epoch + 1)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                             if ctx.get_world_rank() == 0 else None)
        if adopted is not None:  # Train has registered a newer checkpoint: the adopted one can go
            checkpoints.remove(config["run"], adopted, config.get("s3_endpoint"))
            adopted = None
        if "non_finite" in metrics:
            return  # as the real loop: a diverged trial stops


def run_rehearsal(params: dict, trial_cfg: dict, tune_epoch: int = 0) -> None:
    """The rehearsal trial driver (a Tune trainable body)."""
    import ray
    import ray.train
    import ray.tune
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from trainables.data import storage
    from trainables.tune_report import ExactlyOnceReport

    gpus = 1 if trial_cfg.get("use_gpu") else 0
    scaling = ray.train.ScalingConfig(num_workers=trial_cfg.get("workers", 1), use_gpu=bool(gpus),
                                      resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})})
    trial_id = ray.tune.get_context().get_trial_id()
    fs = storage.pyarrow_fs(trial_cfg["storage"], trial_cfg["data"].get("s3_endpoint"))
    driver_node = ray.get_runtime_context().get_node_id()  # where this trial's driver runs
    run_config = ray.train.RunConfig(name=f"train-{trial_id}", storage_path=fs[1] if fs else trial_cfg["storage"],
                                     storage_filesystem=fs[0] if fs else None,
                                     callbacks=[ExactlyOnceReport(tune_epoch)],
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    endpoint = trial_cfg["data"].get("s3_endpoint")
    loop_config = {"epochs": trial_cfg["epochs"], "params": params, "driver_node": driver_node,
                   "run": f"{trial_cfg['storage'].rstrip('/')}/train-{trial_id}", "s3_endpoint": endpoint,
                   "tune_epoch": tune_epoch}
    trainer = DataParallelTrainer(rehearsal_worker, train_loop_config=loop_config,
                                  scaling_config=scaling, run_config=run_config)
    trainer.fit()
