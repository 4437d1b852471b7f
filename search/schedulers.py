"""ASHA stratified by the scientific cell, that stops non-finite trials and survives ``--resume``.

Plain ASHA ranks every trial against every other at each rung. A frozen encoder, a few unfrozen
blocks or a GCN head may reach a higher error after one epoch than full fine-tuning with an MLP,
yet they are exactly the cells the search must compare; ranked together, ASHA would stop them
first. So each scientific cell of the space (e.g. ``n_unfrozen=2 head=gcn``, and the encoder where
the space picks it) gets its own ASHA: a trial only meets trials of its own cell (tuning_playbook:
compare nuisance settings within one value of the scientific parameters).

With ``cost="trainable_params"``, from ASHA's second rung on a trial is also judged against the
other cells: it is *dominated* when a trial of another cell with fewer trainable parameters (the
front's other axis) had already reported an error at least as low at the same rung. At equal
epochs it could then reach the front only by overtaking a cheaper model later (the multi-objective
ASHA idea: promote by Pareto rank, not by one metric). The first rung (``grace_period`` epochs)
stays within the cell. Like ASHA's own, the rule is asynchronous: a trial meets only the results
that reached its rung before it. What happens to a dominated trial:

* ``defer=True`` (``--scheduler asha``, the default): it is *paused*, once, and gives its
  concurrency slot to the next trial (search/tuner.py ``KeepTellingLimiter``), unless no trial
  waits to start (the pause would buy nothing). Once no trial waits to start, the paused ones
  resume, the furthest along first, then the lowest error at their rung (ASHA's promotion order),
  go on from their checkpoint and run to the end; only their own cell's ASHA may still stop them.
  A good front is found sooner and no trial is stopped for being dominated: the regime that starts
  slow (full fine-tuning with small learning rates) still finishes, which matters because on
  bench/search.py's recorded table a cheaper configuration is as good at epoch 2 in 531 pairs of
  configurations, and in 157 of them the costlier one ends better. The price is one restart
  (Tune + Train start-up, checkpoint load) per paused trial. A paused trial restored by
  ``--resume`` waits paused again (Tune requeues it as PENDING, which would run it first).
* ``defer=False`` (``--scheduler asha-pareto``): it is stopped. Cheapest, but a regime may be left
  without a completed trial, and ``regimes.md`` then shows '—' for it.

A NaN or infinite metric stops the trial at its first such result. Tune saves no scheduler
state, so the rungs and every stop decision are written to ``scheduler.json`` in the experiment
folder after each decision (search/journal.py); a resumed search reloads them, stops the trials
that were already stopped before they start again (a kill between the stop and Tune's state
snapshot used to let them continue), and tells each restarted trial how many epochs Tune already
holds (``tune_epoch`` in its config) so that its driver reports the missing ones exactly once.
"""

from __future__ import annotations

import json
import math

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from search import journal
from search.spaces import cell_key

TUNE_EPOCH = "tune_epoch"


class ResumingFIFO(FIFOScheduler):
    """FIFO that stops a trial at its first non-finite metric and resumes trials exactly: a trial
    stopped before a kill is stopped again instead of restarted (a non-finite one told FAIL with
    its reason), and a restored trial gets its stored logs back and learns how many epochs Tune
    holds (``tune_epoch`` in its config) as soon as it is added — Tune may start it without asking
    ``choose_trial_to_run`` when several trials run at once."""

    def __init__(self, metric: str = "val_px_error", time_attr: str = "epoch"):
        super().__init__()
        self._metric, self.time_attr = metric, time_attr
        self.stopped: dict[str, int] = {}  # trial id -> epoch of the stop (ASHA or non-finite)
        self.reasons: dict[str, str] = {}  # trial id -> why a non-finite trial was stopped
        self.n_non_finite = 0
        self._loaded = False

    def on_trial_add(self, tune_controller, trial):
        self._load()
        here = journal.active()
        if here is not None and isinstance(trial.config.get("base"), dict):  # a moved experiment: Train
            trial.config["base"] = trial.config["base"] | {"storage": here.experiment}  # runs go where it is now
        if getattr(trial, "storage", None) is not None:
            # A restored trial's logs may hold more epochs than Tune's snapshot, even when that holds
            # none: the upload that follows a snapshot carries what was logged meanwhile. Tune holds
            # what its logs hold: counting only the snapshot's, a resumed trial logged its first epoch
            # to TensorBoard twice, and one whose logs hold every epoch would end on a stale result.
            # (Stopped trials too: they end on their last result, and keep their stored logs.)
            logged = journal.restore_trial_logs(trial)
            if int(logged.get(self.time_attr, 0) or 0) > self.held(trial):
                trial.update_last_result(logged | {"config": dict(trial.config)})  # not the old head's
            journal.restore_tensorboard(trial, self.held(trial))  # (stopped ones too: curves end where logs do)
        if trial.trial_id in self.stopped:
            return  # about to be stopped again (choose_trial_to_run)
        trial.config[TUNE_EPOCH] = self.held(trial)

    def held(self, trial) -> int:
        """Epochs Tune holds for ``trial`` (its last result's ``time_attr``)."""
        return int((trial.last_result or {}).get(self.time_attr, 0) or 0)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        if self.non_finite(result):
            return self._stop_non_finite(trial, result)
        return TrialScheduler.CONTINUE

    def non_finite(self, result) -> bool:
        value = result.get(self._metric)
        return bool(result.get("non_finite")) or (isinstance(value, (int, float)) and not math.isfinite(value))

    def _stop_non_finite(self, trial, result) -> str:
        from search.study import non_finite

        self.n_non_finite += 1
        self.reasons[trial.trial_id] = non_finite(result) or f"{self._metric} is not finite"
        return self._stop(trial, result)

    def _stop(self, trial, result) -> str:
        self.stopped[trial.trial_id] = int(result.get(self.time_attr, 0))
        self._save()
        return TrialScheduler.STOP

    def choose_trial_to_run(self, tune_controller):
        self._load()
        for trial in tune_controller.get_trials():
            if trial.status in (trial.PENDING, "PAUSED") and trial.trial_id in self.stopped:
                searcher = journal.searcher()
                if trial.trial_id in self.reasons and searcher is not None:  # FAIL, not PRUNED
                    searcher.fail(trial.trial_id, f"non-finite metric: {self.reasons[trial.trial_id]}")
                tune_controller.stop_trial(trial)
        return super().choose_trial_to_run(tune_controller)

    def state(self) -> dict:
        return {"stopped": self.stopped, "reasons": self.reasons, "n_non_finite": self.n_non_finite}

    def _save(self) -> None:
        try:
            folder = journal.folder()
        except RuntimeError:  # used outside a search (unit tests): nothing to persist
            return
        journal.write_json(folder / journal.SCHEDULER_FILE, self.state())

    def _load(self) -> dict:
        if self._loaded:
            return {}
        self._loaded = True
        try:
            path = journal.folder() / journal.SCHEDULER_FILE
        except RuntimeError:
            return {}
        if not path.is_file():
            return {}
        state = json.loads(path.read_text())
        self.stopped.update({k: int(v) for k, v in state.get("stopped", {}).items()})
        self.reasons.update(state.get("reasons", {}))
        self.n_non_finite = state.get("n_non_finite", 0)
        return state

    def debug_string(self) -> str:
        return f"Using FIFO scheduling: {len(self.stopped)} stopped for non-finite metrics"


class StratifiedASHA(ResumingFIFO):
    """One ``AsyncHyperBandScheduler`` per scientific cell (``cell_key`` of ``scientific``), and
    Pareto-dominance stops across cells on the ``cost`` result key (module docstring)."""

    cost: str | None = None  # also what an experiment pickled before Pareto stops existed gets on resume

    def __init__(self, scientific: tuple[str, ...] = ("n_unfrozen",), cost: str | None = None,
                 defer: bool = False, **asha_kwargs):
        super().__init__(asha_kwargs.get("metric"), asha_kwargs.get("time_attr", "epoch"))
        self.cost, self.defer = cost, defer
        self.deferred: dict[str, dict] = {}  # trial id -> {"epoch", "by"}: paused as dominated, resumed last
        self.at_rung: dict[int, dict[str, list[float]]] = {}  # milestone -> trial id -> [cost, metric]
        self.dominated: dict[str, dict] = {}  # trial id -> {"epoch", "by"}: why a Pareto stop was made
        if asha_kwargs.get("reduction_factor", 2) < 2:
            raise ValueError(f"ASHA reduction_factor must be at least 2, not {asha_kwargs['reduction_factor']}")
        self.scientific, self.asha_kwargs = tuple(scientific), asha_kwargs
        self._mode = asha_kwargs.get("mode")
        self.by_stratum: dict[str, AsyncHyperBandScheduler] = {}
        self.stratum_of: dict[str, str] = {}

    def __setstate__(self, state: dict) -> None:
        # Tune unpickles the scheduler on resume; one pickled by an older EchoTune lacks these
        self.__dict__.update({"at_rung": {}, "dominated": {}, "deferred": {}, "defer": False} | state)

    # --- strata ----------------------------------------------------------------------------------
    def stratum(self, config: dict) -> str:
        return cell_key(config, self.scientific)

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        self._load()
        key = self.stratum_of.setdefault(trial.trial_id, self.stratum(trial.config))
        if key not in self.by_stratum:
            self.by_stratum[key] = AsyncHyperBandScheduler(**self.asha_kwargs)
        asha = self.by_stratum[key]
        if trial.trial_id not in asha._trial_info:
            asha._trial_info[trial.trial_id] = asha._brackets[0]
        return asha

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if self._metric and metric and metric != self._metric:
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        self.asha_kwargs.update(metric=self._metric, mode=self._mode)
        return True

    # --- Tune scheduler API ----------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self._asha(trial)
        if self._still_paused(trial) and trial.status != "PAUSED":
            # Restored after a kill: Tune requeues every unfinished trial PENDING, which would start
            # a paused trial first and outside the concurrency limit. Tune files the trial by its
            # status after this call, so it waits as PAUSED again, with no slot.
            trial.set_status("PAUSED")
            limiter = _limiter(tune_controller)
            if limiter is not None:
                limiter.release_slot(trial.trial_id, force=True)
        done = self.held(trial)
        if trial.status == "TERMINATED" and trial.trial_id not in self.stopped and \
                0 < done < self.asha_kwargs["max_t"]:
            # Restored as finished short of max_t: Tune recorded our stop, but the head that decided
            # it was lost before the decision reached the experiment storage. Record it again.
            self.stopped[trial.trial_id] = done
            self._save()

    def on_trial_result(self, tune_controller, trial, result) -> str:
        if self.non_finite(result):
            return self._stop_non_finite(trial, result)
        asha = self._asha(trial)
        decision = asha.on_trial_result(tune_controller, trial, result)
        epoch = result.get(self.time_attr, 0)
        by = self._dominated_by(trial, result, asha)  # recorded whatever its own cell decided
        if by is not None and decision == TrialScheduler.CONTINUE and epoch < self.asha_kwargs["max_t"]:
            if self.defer:
                return self._defer(tune_controller, trial, int(epoch), by, result[self._metric])
            self.dominated[trial.trial_id] = {"epoch": int(epoch), "by": by}
            decision = TrialScheduler.STOP
        if decision == TrialScheduler.STOP and epoch < self.asha_kwargs["max_t"]:
            return self._stop(trial, result)
        self._save()
        return decision

    def _defer(self, tune_controller, trial, epoch: int, by: str, value: float) -> str:
        """Pause a dominated trial once, to resume after every trial not yet started; its
        concurrency slot goes to the next trial meanwhile. Not when no trial waits to start: the
        pause would only cost a restart."""
        if trial.trial_id in self.deferred or not _work_waiting(tune_controller):
            self._save()
            return TrialScheduler.CONTINUE  # deferred once already, or nothing to run instead
        self.deferred[trial.trial_id] = {"epoch": epoch, "by": by, self._metric: float(value)}
        trial.config[TUNE_EPOCH] = epoch  # what Tune holds when it restarts the trial
        self._save()
        limiter = _limiter(tune_controller)
        if limiter is not None:
            limiter.release_slot(trial.trial_id)
        return TrialScheduler.PAUSE

    def _still_paused(self, trial) -> bool:
        """A deferred trial that has not run past its pause (Tune requeues it PENDING on resume),
        nor been stopped since (Tune's snapshot can lag the stop by whole epochs)."""
        pause = self.deferred.get(trial.trial_id)
        held = self.held(trial)
        return pause is not None and held <= pause["epoch"] and trial.trial_id not in self.stopped and \
            trial.status in ("PENDING", "RUNNING", "PAUSED")

    def choose_trial_to_run(self, tune_controller):
        """Trials not yet started first (FIFO); then the deferred trials, the furthest along first
        (least left to run) and, at the same rung, the lowest error first (ASHA's promotion order)."""
        trial = super().choose_trial_to_run(tune_controller)
        if trial is None or trial.status != trial.PAUSED:
            return trial
        sign = -1.0 if self._mode == "max" else 1.0
        paused = [t for t in tune_controller.get_trials() if t.status == t.PAUSED]
        pause = lambda t: self.deferred.get(t.trial_id, {})  # noqa: E731
        trial = min(paused, key=lambda t: (-pause(t).get("epoch", 0), sign * pause(t).get(self._metric, 0.0)))
        limiter = _limiter(tune_controller)  # a deferred trial resumes within the concurrency limit
        if limiter is not None and not limiter.take_slot(trial.trial_id):
            return None
        trial.config[TUNE_EPOCH] = self.held(trial)
        return trial

    def _dominated_by(self, trial, result: dict, asha: AsyncHyperBandScheduler) -> str | None:
        """Record this result at its rung; the id of an earlier trial of another cell that dominates
        it there, from the second rung on (fewer ``cost``, a metric at least as good), else None.
        Within a cell, ASHA alone judges: a nuisance setting that changes the size (a head's width,
        a LoRA rank) must not be pushed towards the smallest."""
        if self.cost is None:
            return None
        milestones = sorted(m for m, _ in asha._brackets[0]._rungs)
        epoch, cost, value = result.get(self.time_attr), result.get(self.cost), result.get(self._metric)
        if epoch not in milestones or not all(isinstance(x, (int, float)) and math.isfinite(x)
                                              for x in (cost, value)):
            return None
        sign = -1.0 if self._mode == "max" else 1.0
        rung = self.at_rung.setdefault(int(epoch), {})
        cell = self.stratum_of.get(trial.trial_id)
        by = next((tid for tid, (c, v) in rung.items()
                   if self.stratum_of.get(tid) != cell and c < cost and sign * v <= sign * value), None)
        rung[trial.trial_id] = [float(cost), float(value)]
        return by if epoch > milestones[0] else None

    def on_trial_complete(self, tune_controller, trial, result):
        asha = self._asha(trial)
        value = result.get(self._metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            asha.on_trial_complete(tune_controller, trial, result)
        else:
            asha._trial_info.pop(trial.trial_id, None)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._asha(trial)._trial_info.pop(trial.trial_id, None)
        self._save()

    def on_trial_error(self, tune_controller, trial):
        self._forget(trial.trial_id)
        self.on_trial_remove(tune_controller, trial)

    def _stop_non_finite(self, trial, result) -> str:
        self._forget(trial.trial_id)
        return super()._stop_non_finite(trial, result)

    def _forget(self, trial_id: str) -> None:
        """A trial that errored or diverged dominates no later arrival (its stops so far stand)."""
        for rung in self.at_rung.values():
            rung.pop(trial_id, None)

    # --- persistence -----------------------------------------------------------------------------
    def state(self) -> dict:
        return super().state() | {"strata": {key: [[m, rec] for m, rec in asha._brackets[0]._rungs]
                                             for key, asha in self.by_stratum.items()},
                                  "stratum_of": self.stratum_of,
                                  "pareto_rungs": {str(m): rec for m, rec in self.at_rung.items()},
                                  "dominated": self.dominated, "deferred": self.deferred}

    def _load(self) -> dict:
        state = super()._load()
        self.stratum_of.update(state.get("stratum_of", {}))
        for milestone, recorded in state.get("pareto_rungs", {}).items():
            self.at_rung.setdefault(int(milestone), {}).update(recorded)
        self.dominated.update(state.get("dominated", {}))
        self.deferred.update(state.get("deferred", {}))
        for key, rungs in state.get("strata", {}).items():
            asha = self.by_stratum.setdefault(key, AsyncHyperBandScheduler(**self.asha_kwargs))
            for (milestone, recorded), (_, target) in zip(rungs, asha._brackets[0]._rungs):
                target.update(recorded)
        return state

    @property
    def num_stopped(self) -> int:
        return len(self.stopped)

    def debug_string(self) -> str:
        pareto = f"{len(self.dominated)} dominated by fewer {self.cost}, " if self.cost and not self.defer else ""
        paused = (f", {len(self.deferred)} paused as dominated by fewer {self.cost} (resumed last)"
                  if self.defer else "")
        return (f"Using ASHA stratified by scientific cell ({', '.join(self.scientific)}): "
                f"{self.num_stopped} stopped ({pareto}{self.n_non_finite} non-finite){paused} "
                f"in {len(self.by_stratum)} cells")


def _limiter(tune_controller):
    """The search's ``KeepTellingLimiter`` (search/tuner.py), if it runs under one."""
    searcher = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
    return searcher if hasattr(searcher, "take_slot") else None


def _work_waiting(tune_controller) -> bool:
    """Whether a trial waits to start, or the search algorithm has more to suggest."""
    if tune_controller is None:
        return True
    if any(t.status == "PENDING" for t in tune_controller.get_trials()):
        return True
    finished = getattr(getattr(tune_controller, "search_alg", None), "is_finished", None)
    return finished is None or not finished()


__all__ = ["ResumingFIFO", "StratifiedASHA", "TrialScheduler", "TUNE_EPOCH"]
