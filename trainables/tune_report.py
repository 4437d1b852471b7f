"""Forward a Train run's epoch reports to its Tune trial exactly once, also across restarts.

A Tune trial that restarts after a kill resumes its Train run from the newest checkpoint, but
Tune may hold fewer or more epochs than that checkpoint: the kill can land after Train persisted
epoch k and before Tune recorded it (k would be lost), or Train can resume from an older
checkpoint than Tune's last result (the epochs in between would be reported twice). The search's
scheduler tells a restarting trial how many epochs Tune holds (``tune_epoch`` in its config);
``ExactlyOnceReport`` drops reports Tune already has and replays, from the history kept in every
checkpoint, the ones it lacks (marked ``replayed: 1``).
"""

from __future__ import annotations

import json

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TIMESTEPS_TOTAL

HISTORY_FILE = "history.json"


def checkpoint_history(checkpoint) -> list[dict]:
    """The per-epoch metrics saved in a Train checkpoint (empty if it has none)."""
    try:
        with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{HISTORY_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return []


class ExactlyOnceReport(TuneReportCallback):
    def __init__(self, tune_epoch: int = 0):
        super().__init__()
        self.known = int(tune_epoch)

    def after_report(self, run_context, metrics, checkpoint):
        epoch = int(metrics[0].get("epoch", 0))
        if epoch <= self.known:
            return  # Tune holds this epoch already (a resumed run went over it again)
        if epoch > self.known + 1 and checkpoint is not None:
            for past in checkpoint_history(checkpoint):
                if self.known < int(past.get("epoch", 0)) < epoch:
                    super().after_report(run_context, [at_step(past | {"replayed": 1})], None)
        super().after_report(run_context, [at_step(metrics[0]), *metrics[1:]], checkpoint)
        self.known = epoch


def at_step(metrics: dict) -> dict:
    """The epoch as Tune's step (``timesteps_total``, which Tune's TensorBoard logger prefers to
    ``training_iteration``): a trial restarted after a pause or a kill counts its iterations from 1
    again, and its TensorBoard curves would go back to step 1."""
    return metrics | {TIMESTEPS_TOTAL: int(metrics.get("epoch", 0))}
