"""One trial on Ray Train: 2-worker DDP (gloo, CPU) on shards from the loopback S3 server, metrics each
epoch, checkpoints, a killed run that resumes at the next epoch, TensorBoard, evaluate; the tiny
encoder learns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import kill_everything, result_of
from trainables.config import DataCfg, EncoderCfg, HeadCfg, OptimCfg, TrialConfig
from trainables.data.shard import write_shards
from trainables.data.stream import EchoClipDataset
from trainables.data.synthetic import write_synthetic
from trainables.loop import lr_factor
from trainables.metrics import point_error_px

EPOCH_LINE = re.compile(r"\[epoch (\d+)/\d+\] (.*)")
REPORTED = ("epoch", "train_loss", "val_px_error", "val_px_error_ed", "val_px_error_es", "val_pct_error",
            "val_dice_ed", "val_dice_es", "val_dice_ed_pooled", "val_dice_es_pooled", "val_ef_mae_label",
            "val_ef_mae_contour", "trainable_params", "encoder_trainable_params", "head_params", "total_params",
            "samples_per_s")


@pytest.fixture(scope="module")
def trainer_data(s3_endpoint, tmp_path_factory):
    """150 short synthetic videos sharded onto the loopback S3 server."""
    import s3fs

    root = tmp_path_factory.mktemp("echonet-train")
    write_synthetic(root, n_videos=150, seed=21, max_frames=36)
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir("trainer")
    uri = "s3://trainer/v1"
    write_shards(root, uri, rows_per_file=40, s3_endpoint=s3_endpoint)
    return uri


def run_env() -> dict:
    env = dict(os.environ, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def epochs_in(log: str) -> list[int]:
    return sorted({int(m.group(1)) for m in EPOCH_LINE.finditer(log)})


def start_trial(cfg_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainables.train", "--config", str(cfg_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=run_env(), start_new_session=True)


def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders whose upload finished (complete.json is written last, with the sizes)."""
    from trainables.checkpoints import _complete

    import fsspec

    fs = fsspec.filesystem("file")
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir() and _complete(fs, str(p)) is not None)


def unregistered(run: Path) -> list[str]:
    """Checkpoint folders that Train's snapshot does not know (orphans)."""
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    known = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    return sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir() and p.name not in known)


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(70, 100, 0, "constant") == 1.0


def test_config_round_trip_and_validation():
    cfg = TrialConfig(encoder=EncoderCfg("echoprime", n_unfrozen=4), head=HeadCfg("gcn", channels=[8, 16]),
                      optim=OptimCfg(lr={"stage4": 1e-4, "head": 1e-3}), data=DataCfg(uri="s3://b/v1"))
    again = TrialConfig.from_json(cfg.to_json())
    assert again == cfg and again.validate() is again
    with pytest.raises(ValueError, match="n_unfrozen=17 is larger than the 16 blocks of encoder 'echoprime'"):
        TrialConfig(encoder=EncoderCfg("echoprime", n_unfrozen=17), data=DataCfg(uri="x")).validate()
    with pytest.raises(ValueError, match="choose one of mlp, gcn"):
        TrialConfig(head=HeadCfg("rnn"), data=DataCfg(uri="x")).validate()
    with pytest.raises(ValueError, match="data.uri is empty"):
        TrialConfig().validate()
    with pytest.raises(ValueError, match=r"unknown keys \['lr_head'\] in 'optim'"):
        TrialConfig.from_dict({"optim": {"lr_head": 1}})
    with pytest.raises(ValueError, match="learning rate head=-1"):
        TrialConfig(optim=OptimCfg(lr={"head": -1}), data=DataCfg(uri="x")).validate()


def test_ddp_trial_reports_checkpoints_resumes_and_evaluates(trainer_data, s3_endpoint, tmp_path):
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=2), head=HeadCfg("gcn"),
                      optim=OptimCfg(base_lr=1e-3, lr={"head": 2e-3}),
                      data=DataCfg(uri=trainer_data, s3_endpoint=s3_endpoint, cache_dir=str(tmp_path / "cache"),
                                   batch_size=8),
                      aug_strength=0.3, epochs=4, workers=2, storage=str(tmp_path / "runs"), name="ddp",
                      overlay_videos=2)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    run = tmp_path / "runs" / "ddp"

    first = start_trial(cfg_path, tmp_path / "first.log")
    deadline = time.time() + 400
    while not complete_checkpoints(run) and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    kill_everything(first)  # the whole driver session: Train controller, workers, Ray
    log1 = (tmp_path / "first.log").read_text()
    saved = [torch.load(p / "state.pt", weights_only=True)["next_epoch"] for p in complete_checkpoints(run)]
    assert saved, f"no checkpoint before the kill:\n{log1[-3000:]}"
    assert max(saved) < cfg.epochs, "the run finished before it could be killed; make it longer"

    second = start_trial(cfg_path, tmp_path / "second.log")
    assert second.wait(600) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log2 = (tmp_path / "second.log").read_text()
    # `epoch` counts completed epochs; the restarted run continues with the next one.
    assert epochs_in(log2) == list(range(max(saved) + 1, cfg.epochs + 1)), log2[-3000:]
    assert unregistered(run) == []  # no orphan checkpoint folder left behind

    result = result_of(log2)
    metrics = result["metrics"]
    assert metrics["epoch"] == cfg.epochs and set(REPORTED) <= set(metrics)
    assert {"lr/stage2", "lr/head"} == {k for k in metrics if k.startswith("lr/")}  # k=2: blocks 2-3 = stage2
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["val_n"] == len(EchoClipDataset(trainer_data, "val", s3_endpoint=s3_endpoint,
                                                   cache_dir=tmp_path / "cache"))  # whole split, both ranks
    assert Path(result["checkpoint"], "state.pt").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    tb.Reload()
    steps = [e.step for e in tb.Scalars("trial/val_px_error")]
    assert set(steps) == set(range(1, cfg.epochs + 1))
    overlays = [t for t in tb.Tags()["images"] if t.startswith("landmarks/")]
    assert len(overlays) == 2

    out = tmp_path / "test.json"
    ev = subprocess.run([sys.executable, "-m", "trainables.evaluate", "--checkpoint", result["checkpoint"],
                         "--split", "test", "--out", str(out)], capture_output=True, text=True, timeout=300,
                        env=run_env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    test_metrics = json.loads(out.read_text())
    assert test_metrics["split"] == "test" and test_metrics["epochs_trained"] == cfg.epochs
    assert test_metrics["test_n"] > 0 and np.isfinite(test_metrics["test_px_error"])


# slow (~50 s): `make test-all`; test_regimes checks the choice of checkpoint in-process
@pytest.mark.slow
def test_a_checkpoint_train_never_registered_is_resumed_and_not_left_behind(trainer_data, s3_endpoint, tmp_path):
    """A kill right after an epoch's report, before Train's controller registered the uploaded
    checkpoint (simulated exactly by removing the snapshot), used to restart the trial from scratch
    and leave the folder behind as an orphan."""
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=1), head=HeadCfg("mlp"), optim=OptimCfg(base_lr=1e-3),
                      data=DataCfg(uri=trainer_data, s3_endpoint=s3_endpoint, cache_dir=str(tmp_path / "cache"),
                                   batch_size=8),
                      epochs=4, workers=1, storage=str(tmp_path / "runs"), name="unreg", tensorboard=False)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    run = tmp_path / "runs" / "unreg"
    first = start_trial(cfg_path, tmp_path / "first.log")
    deadline = time.time() + 400
    while not complete_checkpoints(run) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_everything(first)
    done = [json.loads((p / "complete.json").read_text())["next_epoch"] for p in complete_checkpoints(run)]
    assert done and max(done) < cfg.epochs, "no checkpoint before the kill, or the run finished"
    (run / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)  # Train registered nothing
    second = start_trial(cfg_path, tmp_path / "second.log")
    assert second.wait(600) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log2 = (tmp_path / "second.log").read_text()
    assert epochs_in(log2) == list(range(max(done) + 1, cfg.epochs + 1)), log2[-3000:]
    assert unregistered(run) == [] and len(complete_checkpoints(run)) <= 2


# slow (~65 s): `make test-all`; every head learns in test_heads, the search end to end in test_search
@pytest.mark.slow
def test_tiny_encoder_learns(trainer_data, s3_endpoint, tmp_path):
    """Validation error falls well below the error of predicting the mean training landmarks."""
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen="all"), head=HeadCfg("mlp"), optim=OptimCfg(base_lr=1e-3),
                      data=DataCfg(uri=trainer_data, s3_endpoint=s3_endpoint, cache_dir=str(tmp_path / "cache"),
                                   batch_size=4),
                      epochs=12, workers=1, storage=str(tmp_path / "runs"), name="learn", tensorboard=False)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=900, env=run_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = result_of(proc.stdout)["metrics"]["val_px_error"]

    kw = dict(s3_endpoint=s3_endpoint, cache_dir=tmp_path / "cache")
    train, val = EchoClipDataset(trainer_data, "train", **kw), EchoClipDataset(trainer_data, "val", **kw)
    mean = np.mean([train.landmarks(i) for i in range(len(train))], axis=0)
    baseline = float(np.mean([point_error_px(mean, val.landmarks(i)).mean() for i in range(len(val))]))
    print(f"val error {final:.2f} px, predict-the-mean {baseline:.2f} px")
    assert final < 0.75 * baseline, f"val error {final:.2f} px vs predict-the-mean {baseline:.2f} px"


def test_train_cli_bad_config(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"encoder": {"name": "tiny", "n_unfrozen": 9}, "data": {"uri": "x"}}))
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "larger than the 4 blocks" in proc.stderr and "Traceback" not in proc.stderr
