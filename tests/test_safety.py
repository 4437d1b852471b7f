"""Untrusted files never run code, non-finite trials never reach a front, credentials never leak."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainables.config import DataCfg, EncoderCfg, HeadCfg, TrialConfig
from trainables.loop import CHECKPOINT_FILE, CONFIG_FILE, Trial, load_state
from trainables.models.encoders import build_encoder


# (bad input, the message fragment a user sees)
BAD_INPUTS = [
    ("trial checkpoint (state.pt) carrying a pickled payload", "refused to load: it holds Python objects other than "
                                                               "tensors and plain data, which could run code"),
    ("encoder weights file carrying a pickled payload", "refused to load: the file holds Python objects other than "
                                                        "tensors and plain data, which could run code"),
    ("a learning rate that makes training diverge (1e8)", "training diverged (learning rates base=1e+08); lower the "
                                                          "learning rate"),
    ("a search whose trials all diverge", "FAILED: train_loss is nan at epoch 2"),
]
MESSAGE = dict(BAD_INPUTS)


class Payload:
    """Unpickling this runs a shell command (the attack a checkpoint file can carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, state: dict | None = None) -> None:
    torch.save((state or {}) | {"extra": Payload(marker)}, path)


def test_the_payload_would_run_without_weights_only(tmp_path):
    """Control: the planted file really carries code (so the refusals below mean something)."""
    plant(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_checkpoint_state_with_a_payload_is_refused(tmp_path):
    plant(tmp_path / CHECKPOINT_FILE, tmp_path / "ran")
    with pytest.raises(ValueError) as err:
        load_state(tmp_path / CHECKPOINT_FILE)
    assert MESSAGE["trial checkpoint (state.pt) carrying a pickled payload"] in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_trial_restore_refuses_a_payload(tmp_path):
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=0), data=DataCfg(uri="unused"))
    trial = Trial.__new__(Trial)  # restore() needs no data: only the checkpoint folder
    trial.cfg = cfg
    plant(tmp_path / CHECKPOINT_FILE, tmp_path / "ran")
    with pytest.raises(ValueError, match="refused to load"):
        trial.restore(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_evaluate_cli_refuses_a_payload(tmp_path):
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=0), head=HeadCfg("mlp"), data=DataCfg(uri="unused"))
    (tmp_path / CONFIG_FILE).write_text(cfg.to_json())
    plant(tmp_path / CHECKPOINT_FILE, tmp_path / "ran")
    proc = subprocess.run([sys.executable, "-m", "trainables.evaluate", "--checkpoint", str(tmp_path), "--split", "val"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_encoder_weights_with_a_payload_are_refused(tmp_path):
    state = build_encoder("tiny").state_dict()
    plant(tmp_path / "w.pt", tmp_path / "ran", state)
    with pytest.raises(ValueError) as err:
        build_encoder("tiny", str(tmp_path / "w.pt"))
    assert MESSAGE["encoder weights file carrying a pickled payload"] in str(err.value)
    assert not (tmp_path / "ran").exists()


# --- non-finite trials ---------------------------------------------------------------------------------

def fake_experiment(folder: Path, rows: dict[str, list[dict]], max_t: int = 3) -> None:
    """An experiment folder with Tune result files (and no study): enough for the export."""
    folder.mkdir(parents=True)
    (folder / "search_config.json").write_text(json.dumps({"name": folder.name, "storage": str(folder.parent),
                                                           "max_epochs": max_t, "study_name": "none"}))
    for tid, results in rows.items():
        (folder / f"trial_{tid}").mkdir()
        (folder / f"trial_{tid}" / "result.json").write_text(
            "\n".join(json.dumps(r | {"trial_id": tid, "config": {"n_unfrozen": 0, "head": "mlp"}})
                      for r in results) + "\n")


def row(epoch, err, **kw):
    return {"epoch": epoch, "val_px_error": err, "trainable_params": 1000, "total_params": 10000,
            "head_params": 400, "encoder_trainable_params": 600, "time_this_iter_s": 1.0} | kw


def test_export_of_a_search_whose_trials_all_diverged_does_not_crash(tmp_path):
    from search.pareto import export

    folder = tmp_path / "allnan"
    fake_experiment(folder, {"a": [row(1, 9.0), row(2, math.nan, non_finite="train_loss is nan at epoch 2")],
                             "b": [row(1, math.inf, non_finite="val_px_error is inf at epoch 1")]})
    summary = export(folder)
    assert summary["front"] == [] and summary["hypervolume"] == 0.0 and summary["n_failed"] == 2
    assert (folder / "pareto.png").stat().st_size > 5000
    from search.pareto import summary_table

    assert MESSAGE["a search whose trials all diverge"] in summary_table(summary["trials"])
    csv = (folder / "pareto.csv").read_text()
    assert "train_loss is nan at epoch 2" in csv and "val_px_error is inf" in csv


def test_a_nan_trial_is_infeasible_and_never_on_the_front(tmp_path):
    from search.pareto import export

    folder = tmp_path / "mixed"
    fake_experiment(folder, {"good": [row(e, 10.0 - e) for e in (1, 2, 3)],
                             "nan": [row(1, 1.0), row(2, math.nan, trainable_params=10,
                                                      non_finite="train_loss is nan at epoch 2")]})
    summary = export(folder)
    assert [t["trial_id"] for t in summary["front"]] == ["good"]
    rows = {t["trial_id"]: t for t in summary["trials"]}
    assert rows["nan"]["infeasible"] and not rows["nan"]["on_front"] and "nan" in rows["nan"]["reason"]


def test_a_diverging_trial_stops_with_its_reason_and_exits_non_zero(tmp_path):
    """`python -m trainables.train` with a learning rate of 1e8 (it used to exit 0 with train_loss=nan)."""
    from trainables.data.shard import write_shards
    from trainables.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "echonet", n_videos=12, seed=3, max_frames=20)
    write_shards(tmp_path / "echonet", str(tmp_path / "shards"))
    cfg = {"encoder": {"name": "tiny", "n_unfrozen": "all"}, "optim": {"base_lr": 1e8, "name": "sgd"},
           "data": {"uri": str(tmp_path / "shards"), "cache_dir": str(tmp_path / "cache"), "batch_size": 4},
           "epochs": 3, "tensorboard": False, "storage": str(tmp_path / "runs"), "name": "nan"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config", str(tmp_path / "cfg.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert MESSAGE["a learning rate that makes training diverge (1e8)"] in proc.stderr
    assert "[epoch 2/3]" not in proc.stdout  # stopped at the first non-finite epoch
