"""ASHA stratified by a scientific parameter (default: the number of unfrozen blocks).

Plain ASHA ranks every trial against every other at each rung. A frozen encoder (k = 0) or a
few unfrozen blocks reach a higher error after one epoch than full fine-tuning, yet they are the
cheap end of the Pareto front we are after; ranked together, ASHA would stop them first. So each
value of ``stratum`` gets its own ASHA: trials are only compared with trials of the same k
(tuning_playbook: compare nuisance settings within one value of a scientific parameter).
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler


class StratifiedASHA(FIFOScheduler):
    """One ``AsyncHyperBandScheduler`` per value of ``trial.config[stratum]``."""

    def __init__(self, stratum: str = "n_unfrozen", **asha_kwargs):
        super().__init__()
        self.stratum, self.asha_kwargs = stratum, asha_kwargs
        self._metric, self._mode = asha_kwargs.get("metric"), asha_kwargs.get("mode")
        self.by_stratum: dict[str, AsyncHyperBandScheduler] = {}
        self.stratum_of: dict[str, str] = {}

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        key = self.stratum_of.setdefault(trial.trial_id, str(trial.config.get(self.stratum)))
        if key not in self.by_stratum:
            self.by_stratum[key] = AsyncHyperBandScheduler(**self.asha_kwargs)
        return self.by_stratum[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if self._metric and metric and metric != self._metric:
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        self.asha_kwargs.update(metric=self._metric, mode=self._mode)
        return True

    def on_trial_add(self, tune_controller, trial):
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    @property
    def num_stopped(self) -> int:
        return sum(a._num_stopped for a in self.by_stratum.values())

    def debug_string(self) -> str:
        return (f"Using ASHA stratified by {self.stratum}: num_stopped={self.num_stopped} "
                f"in {len(self.by_stratum)} strata ({', '.join(self.by_stratum)})")


__all__ = ["StratifiedASHA", "TrialScheduler"]
