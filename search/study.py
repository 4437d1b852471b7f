"""The Optuna side of a search: a study that is told the truth, cells first, nuisance tuned per cell.

Ray's ``OptunaSearch`` tells Optuna ``COMPLETE`` with the last reported value for every trial Tune
ends, ASHA-stopped ones included (RAY.md §2), so TPE ranks a 1-epoch error against 20-epoch errors
and ``study.best_trials`` shows points that never finished. ``TruthfulOptunaSearch`` instead:

* records every epoch's ``val_px_error`` as the trial's intermediate value at step ``epoch``;
* tells ``COMPLETE`` only for trials that ran ``max_t`` epochs with finite metrics, ``PRUNED`` for
  trials stopped earlier (TPE ranks those by how far they got, optuna#1647), and ``FAIL`` with a
  ``fail_reason`` user attribute for non-finite metrics and errors;
* tags each study trial with its Tune ``tune_trial_id`` (and the Tune config with ``study_trial``);
* tolerates a trial told twice (a resumed experiment replays completions), keeps an errored trial
  open until the experiment ends so that ``--resume`` can retry it and tell its final result, and
  on restore re-attaches to the study in *this* head's experiment folder and hands study trials
  that Tune never recorded (a kill between ``ask`` and Tune's state snapshot) to the next
  suggestions, so no study trial is left RUNNING and none is counted twice.

Cells: every scientific cell of the space is enqueued ``per_cell`` times (``enqueue_trial`` with
partial parameters) before the sampler may exploit, in rounds: each cell once in ``Space.cells``
order (cheapest first), then each cell again, and so on. A first round gives every cell an answer
early, and each cell's second trial is sampled knowing all of the first round (bench/search.py, 21
seeds, rounds against a cell's trials together, measured before the default scheduler paused
dominated trials: median 30 against 34 summed epochs to the target with ASHA by cell,
``--scheduler asha-cells`` now; 22 against 30 with ``--scheduler asha-pareto``).
``CellwiseSampler`` tunes nuisance settings within each cell (tuning_playbook: compare scientific
values, each with its best nuisance settings): a cell's first trial at the centre of every range,
later ones from TPE fitted to the whole study until the cell has trials of its own.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search import journal

log = logging.getLogger("echotune.search")
TUNE_TRIAL_ID, FAIL_REASON, STUDY_TRIAL = "tune_trial_id", "fail_reason", "study_trial"
FINITE_KEYS = ("val_px_error", "train_loss")


def study_url(folder: Path) -> str:
    return f"sqlite:///{Path(folder).resolve() / journal.STUDY_FILE}"


def non_finite(result: dict) -> str:
    """'' when the result's metrics are finite, else what is not (the trial's own reason first)."""
    if result.get("non_finite"):
        return str(result["non_finite"])
    for key in FINITE_KEYS:
        value = result.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} is {value} at epoch {result.get('epoch')}"
    return ""


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------

def cell_points(cells: list[dict], per_cell: int) -> list[dict]:
    """``per_cell`` trials of each cell, in rounds of every cell once (in ``Space.cells`` order)."""
    return [dict(c) for _ in range(per_cell) for c in cells]


class _View:
    """A study as its sampler sees it: ``_get_trials``/``get_trials`` return only the trials ``keep``
    accepts (e.g. one cell's)."""

    def __init__(self, study, keep):
        self._study, self._keep = study, keep

    def _get_trials(self, *args, **kwargs):
        return [t for t in self._study._get_trials(*args, **kwargs) if self._keep(t)]

    def get_trials(self, *args, **kwargs):
        return [t for t in self._study.get_trials(*args, **kwargs) if self._keep(t)]

    @property
    def trials(self):
        return self.get_trials()

    def __getattr__(self, name):
        return getattr(self._study, name)


def centre(distribution):
    """The middle of a distribution's range: the geometric mean of a log range, the arithmetic one
    of a linear range, then the nearest value on its step or integer (a tie goes to the even
    multiple: Python's round); the middle choice of a categorical one (the lower of two middles:
    choices are listed from the default or the smallest, e.g. widths [16, 32, 64] -> 32, graphs
    [sparse, full] -> sparse)."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[(len(distribution.choices) - 1) // 2]
    low, high = distribution.low, distribution.high
    mid = math.sqrt(low * high) if distribution.log else (low + high) / 2
    step = getattr(distribution, "step", None)
    if step:
        mid = low + round((mid - low) / step) * step
    if isinstance(distribution, optuna.distributions.IntDistribution):
        mid = int(round(mid))
    return min(max(mid, low), high)


class CellwiseSampler(BaseSampler):
    """Samples scientific parameters from the whole study and nuisance ones per cell.

    A trial's cell is known once its scientific parameters are (spaces suggest them first; an
    enqueued trial knows them from the start). Before that, relative sampling is skipped and each
    parameter is sampled on its own. Once it is known:

    * with ``start="centre"`` (the default) a cell's first trial takes every nuisance parameter at
      the centre of its range (``centre``), as Vizier starts its searches: the first round then
      compares the cells at one shared, middling setting rather than at draws that differ from
      cell to cell, and no regime is judged on one unlucky learning rate (bench/search.py: a
      first draw at the low end of the learning rate left its cell off the front until its second
      trial, a whole round later). ``"sampled"`` draws it as below;
    * other nuisance parameters come from the base sampler fitted to the cell's own trials, as
      soon as the cell holds the base's start-up number of finished trials (TPE's
      ``n_startup_trials``); until then, from the base fitted to the whole study. A cell's next
      guess at a learning rate is then what worked in the other cells, not a random draw (after a
      centre start, once the study holds other values than the centre: the first round holds no
      contrast), whereas with a handful of trials per cell TPE would never leave its random
      start-up within a cell (bench/search.py: with 2 per cell, every nuisance setting was random);
    * a trial does not repeat the nuisance parameters of an earlier trial of its cell (categorical
      spaces such as bench/search.py's grid repeat often: 1 trial in 8 there; continuous ones
      hardly ever), unless ``RETRIES`` draws from the base and as many at random all did.
    """

    RETRIES = 16
    STARTS = ("centre", "sampled")

    def __init__(self, base: BaseSampler, scientific: tuple[str, ...], seed: int | None = None,
                 start: str = "centre"):
        if start not in self.STARTS:
            raise ValueError(f"unknown cell start {start!r}; choose one of {', '.join(self.STARTS)}")
        self.base, self.scientific, self.start = base, tuple(scientific), start
        # not the base's own seed: TPE's start-up draws with RandomSampler(seed) and would repeat them
        self._random = optuna.samplers.RandomSampler(seed=None if seed is None else seed + 1)

    def __setstate__(self, state: dict) -> None:
        # Tune unpickles the sampler with the searcher on resume; one pickled by an older EchoTune
        # has no random stream of its own
        self.__dict__.update(state)
        self.__dict__.setdefault("_random", optuna.samplers.RandomSampler())
        self.__dict__.setdefault("start", "sampled")  # what it did before the centre start existed

    def cell_of(self, trial) -> tuple | None:
        """The trial's cell, once its last scientific parameter is known (spaces suggest it after any
        conditional scientific ones, e.g. n_unfrozen or lora_last); absent ones count as None."""
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        if self.scientific[-1] not in params:
            return None
        return tuple(params.get(s) for s in self.scientific)

    def first_in_cell(self, study, trial) -> bool:
        """Whether no other trial of the trial's cell has started (enqueued ones wait: WAITING)."""
        cell = self.cell_of(trial)
        started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return cell is not None and not any(t.number != trial.number and self.cell_of(t) == cell
                                            for t in study._get_trials(deepcopy=False, states=started))

    def _at_centre(self, study, trial) -> bool:
        return self.start == "centre" and self.first_in_cell(study, trial)

    def _view(self, study, trial):
        """The trials the base sampler learns from: the cell's own once there are enough of them.
        A multi-objective study hides its PRUNED trials: Optuna's TPE ranks them by
        ``study.direction``, which a multi-objective study does not have (RuntimeError)."""
        cell = self.cell_of(trial)
        if cell is None:
            return self._visible(study)
        own = _View(self._visible(study), lambda t: self.cell_of(t) == cell)
        startup = getattr(self.base, "_n_startup_trials", 0)
        if startup and len(own._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) < startup:
            return self._visible(study)
        return own

    @staticmethod
    def _visible(study):
        return _View(study, lambda t: t.state != TrialState.PRUNED) if study._is_multi_objective() else study

    def infer_relative_search_space(self, study, trial):
        if self.cell_of(trial) is None:
            return {}
        space = self.base.infer_relative_search_space(self._view(study, trial), trial)
        return {name: d for name, d in space.items() if name not in self.scientific}  # fixed by the cell

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        if self._at_centre(study, trial):
            return {name: centre(d) for name, d in search_space.items()}
        view, cell = self._view(study, trial), self.cell_of(trial)
        tried = [{k: v for k, v in t.params.items() if k not in self.scientific}
                 for t in study._get_trials(deepcopy=False, states=None)
                 if t.number != trial.number and self.cell_of(t) == cell]
        params = {}
        for attempt in range(2 * self.RETRIES):
            params = self.base.sample_relative(view, trial, search_space) if attempt < self.RETRIES else {}
            params |= {name: self._random.sample_independent(view, trial, name, d)  # the base's start-up
                       for name, d in search_space.items() if name not in params}
            # A repeat sets every nuisance parameter an earlier trial of the cell had as it had it (the
            # sample may also hold other cells' conditional parameters, which this trial will not use).
            if not any(t and all(k in params and params[k] == v for k, v in t.items()) for t in tried):
                break
        if attempt >= self.RETRIES and getattr(self.base, "_constant_liar", False):
            self._record_relative(study, trial, params)
        return params

    @staticmethod
    def _record_relative(study, trial, params: dict) -> None:
        """TPE's constant liar reads a running trial's parameters from the last relative sample it
        recorded; a random draw chosen after it must replace that record (optuna 5.x key format)."""
        try:
            from optuna.samplers._tpe.sampler import _RELATIVE_PARAMS_KEY, _SYSTEM_ATTR_MAX_LENGTH
        except ImportError:
            return
        text = json.dumps(params)
        for i in range(0, len(text), _SYSTEM_ATTR_MAX_LENGTH):
            key = f"{_RELATIVE_PARAMS_KEY}:{i // _SYSTEM_ATTR_MAX_LENGTH}"
            study._storage.set_trial_system_attr(trial._trial_id, key, text[i:i + _SYSTEM_ATTR_MAX_LENGTH])

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name not in self.scientific and self._at_centre(study, trial):
            return centre(param_distribution)
        view = self._visible(study) if param_name in self.scientific else self._view(study, trial)
        return self.base.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._random.reseed_rng()


def make_sampler(name: str, seed: int, *, scientific: tuple[str, ...], per_cell: int, num_samples: int,
                 n_objectives: int = 1, cell_start: str = "centre") -> tuple[BaseSampler, list[str]]:
    """The sampler for ``--sampler``, adapted to the budget; returns it and notes to print."""
    notes = []
    if name == "tpe":
        # TPE samples at random until a cell holds n_startup_trials finished trials: with a handful
        # of trials per cell the default 10 would make the whole search random; below 2, TPE fits
        # one observation and proposes it again (bench/search.py: half the trials were repeats).
        startup = max(2, min(10, per_cell // 2))
        if startup < 10:
            notes.append(f"TPE: n_startup_trials={startup} per cell (budget {per_cell} per cell; default 10)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # warn_independent_sampling is deprecated in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group=True
            base = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup,
                                              warn_independent_sampling=False)
        if cell_start == "centre":
            notes.append("each cell's first trial: every nuisance parameter at the centre of its range "
                         "(--cell-start sampled draws it)")
        return CellwiseSampler(base, scientific, seed, start=cell_start), notes
    if name == "nsga2":
        population = 50
        if population * 2 > num_samples:
            # NSGA-II only evolves between generations; with the default 50 and 32 trials it never
            # leaves generation 0, i.e. it is random search.
            population = max(2, num_samples // 4)
            notes.append(f"NSGA-II: population_size={population} (default 50 would never leave generation 0 "
                         f"with {num_samples} trials); nuisance parameters are not tuned per cell with NSGA-II")
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population), notes
    if name == "qmc":
        notes.append("QMC: conditional parameters (per-stage LRs, head options) are sampled at random")
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False), notes
    return optuna.samplers.RandomSampler(seed=seed), notes


def _recorded_trials(folder: Path) -> set[str] | None:
    """The trial ids in Tune's newest experiment state file in local ``folder``; None if there is
    none or it cannot be read."""
    from search.tuner import recorded_statuses

    statuses = recorded_statuses(folder)
    return None if statuses is None else set(statuses)


# ---------------------------------------------------------------------------------------------
# The searcher
# ---------------------------------------------------------------------------------------------

class TruthfulOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna what happened to each trial (module docstring).

    Tune pickles the searcher (into tuner.pkl and searcher-state files) and unpickles it on
    resume, possibly on another head. The study's storage is an SQLite file in *this* head's
    experiment folder, so the pickle holds no storage and no study, only the study name and, per
    Tune trial, the study trial's id; ``attach`` reopens them in ``journal.folder()``.
    """

    def __init__(self, *, max_t: int, time_attr: str = "epoch", **kwargs):
        self.max_t, self.time_attr = max_t, time_attr
        self._errored: dict[str, str] = {}
        self._failed_errors: set[str] = set()  # told FAIL because they errored: a resume may retry them
        self._orphans: list[int] = []  # study trial numbers Tune never recorded (kill), to reuse
        super().__init__(**kwargs)
        journal.register_searcher(self)

    # --- pickling: no storage, no study -------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_storage"], state["_ot_study"] = None, None
        state["_ot_trials"] = {tid: getattr(ot, "_trial_id", ot) for tid, ot in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        try:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
            # Tune copies this file to the experiment storage without an atomic rename: a kill during
            # the copy leaves it empty or cut, and Tune would then restart the experiment from nothing
            # (and wait for a trial that never comes). The study and Tune's own state hold the truth.
            log.warning("%s is unreadable (%s: %s; a kill while Tune copied it); the searcher's record is "
                        "rebuilt from the study and Tune's experiment state", checkpoint_path, type(exc).__name__, exc)
            # (search.tuner.check_tune_state refused a cut experiment state before Tune got here, so
            # the trials Tune recorded are known; else every tagged trial counts as recorded.)
            state = self._state_from_study(_recorded_trials(Path(checkpoint_path).parent))
        else:
            recorded = _recorded_trials(Path(checkpoint_path).parent)
            state = self._with_recorded(self._only_recorded(state, recorded), recorded)
        self.__dict__.update(state)
        self.attach(journal.folder())

    @staticmethod
    def _only_recorded(state: dict, recorded: set[str] | None) -> dict:
        """Forget the Tune trials that Tune's own snapshot lacks: Tune writes this file and its
        experiment state one after the other, and a kill in between (seen when a trial was paused
        and the next one suggested at once) left a suggested trial that Tune never ran, its study
        trial RUNNING for ever. Forgotten, its study trial is an orphan and runs again."""
        trials = state.get("_ot_trials", {})
        unknown = set(trials) - recorded if recorded is not None else set()
        if not unknown:
            return state
        log.warning("Tune's experiment state lacks trials %s that the searcher's state has (a kill between "
                    "the two files); their study trials are run again", sorted(unknown))
        return state | {"_ot_trials": {k: v for k, v in trials.items() if k not in unknown},
                        "_errored": {k: v for k, v in state.get("_errored", {}).items() if k not in unknown},
                        "_failed_errors": set(state.get("_failed_errors", set())) - unknown}

    def _with_recorded(self, state: dict, recorded: set[str] | None) -> dict:
        """Add the Tune trials that Tune's own snapshot has and this state lacks: the state can also
        be the older of the two files. Unknown, such a trial's results were dropped and its study
        trial handed to the next suggestion as an orphan (trained twice, one trial never run). Each
        is found by its tag, which ``suggest`` writes to the study before Tune can record it."""
        missing = (recorded or set()) - set(state.get("_ot_trials", {}))
        if not missing or not (journal.folder() / journal.STUDY_FILE).is_file():
            return state  # (attach refuses a lost study, naming it)
        found = self._state_from_study(missing)
        lost = sorted(missing - set(found["_ot_trials"]))
        log.warning("the searcher's state lacks trials %s of Tune's experiment state (saved before them); "
                    "they are taken from the study%s", sorted(missing),
                    f", except {lost}, which it lacks too" if lost else "")
        return state | {"_ot_trials": state.get("_ot_trials", {}) | found["_ot_trials"],
                        "_errored": state.get("_errored", {}) | found["_errored"],
                        "_failed_errors": set(state.get("_failed_errors", set())) | found["_failed_errors"]}

    def _state_from_study(self, recorded: set[str] | None) -> dict:
        """What ``save`` would have held, from the study in ``journal.folder()``: Tune trial -> study
        trial for the trials Tune recorded (all tagged ones if its state is unreadable too), the
        errored trials still open, and those told FAIL for an error (a resume retries them)."""
        st = optuna.load_study(study_name=self._study_name, storage=study_url(journal.folder()))
        state = {"_ot_trials": {}, "_errored": {}, "_failed_errors": set()}
        for t in st.get_trials(deepcopy=False):
            tid = t.user_attrs.get(TUNE_TRIAL_ID)
            if tid is None or (recorded is not None and tid not in recorded):
                continue
            state["_ot_trials"][tid] = t._trial_id
            reason = t.user_attrs.get(FAIL_REASON, "")
            if t.state == TrialState.RUNNING and reason:  # note_error: open until the end
                state["_errored"][tid] = reason
            elif t.state == TrialState.FAIL and not reason.startswith("non-finite metric"):  # finalize
                state["_failed_errors"].add(tid)
        return state

    # --- study access ------------------------------------------------------------------------
    def _study(self):
        if self._ot_study is None:  # unpickled and not yet attached (Tune restarted the experiment)
            self.attach(journal.folder())
        return self._ot_study

    def _frozen(self, trial_id: str):
        ot = self._ot_trials.get(trial_id)
        return None if ot is None else self._study()._storage.get_trial(ot._trial_id)

    def _record(self, trial_id: str, result: dict | None) -> None:
        """Store ``result``'s metric as the intermediate value at step ``epoch``."""
        if not result or self._metric_name() not in result or self.time_attr not in result:
            return
        frozen = self._frozen(trial_id)
        value = result[self._metric_name()]
        if frozen is None or frozen.state.is_finished() or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return
        self._study()._storage.set_trial_intermediate_value(frozen._trial_id, int(result[self.time_attr]),
                                                            float(value))

    def _metric_name(self) -> str:
        return self._metric[0] if isinstance(self._metric, list) else self._metric

    # --- Tune searcher API -------------------------------------------------------------------
    def suggest(self, trial_id: str):
        study = self._study()
        if self._orphans and trial_id not in self._ot_trials:
            # Re-run a study trial that a kill cut off before Tune recorded it, with its own params.
            number = self._orphans.pop(0)
            self._ot_trials[trial_id] = optuna.Trial(
                study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        config = super().suggest(trial_id)
        if config is None:
            return None
        ot = self._ot_trials[trial_id]
        study._storage.set_trial_user_attr(ot._trial_id, TUNE_TRIAL_ID, trial_id)
        # Into the experiment's storage before Tune's snapshot can name this trial: a new head must
        # never see Tune knowing a trial its copy of the study lacks (or still holds as WAITING).
        journal.push_study()
        return config | {STUDY_TRIAL: ot.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._record(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        frozen = self._frozen(trial_id)
        if frozen is None or frozen.state.is_finished():
            return  # told twice (a resumed experiment), or not ours: nothing to change
        if error:
            # Keep it open: a retry may still tell its final result; the journal callback stores
            # the reason, and finalize() fails whatever is still errored at the end.
            self._errored.setdefault(trial_id, "the trial errored")
            return
        self._errored.pop(trial_id, None)
        self._failed_errors.discard(trial_id)
        self._record(trial_id, result)
        self._tell(trial_id, result or {})

    def _tell(self, trial_id: str, result: dict) -> None:
        ot, study = self._ot_trials[trial_id], self._study()
        bad = non_finite(result)
        if bad:
            return self.fail(trial_id, f"non-finite metric: {bad}")
        frozen = self._frozen(trial_id)
        epochs = result.get(self.time_attr) or (frozen.last_step or 0)
        if result and epochs >= self.max_t:
            values = [result[m] for m in self._metric] if isinstance(self._metric, list) else result[self._metric]
            study.tell(ot, values)
        else:
            study._storage.set_trial_user_attr(ot._trial_id, "stopped_at_epoch", int(epochs))
            study.tell(ot, state=TrialState.PRUNED)

    def fail(self, trial_id: str, reason: str) -> None:
        """Tell FAIL with ``reason`` as the ``fail_reason`` user attribute (if still open)."""
        from trainables.data.storage import scrub

        frozen = self._frozen(trial_id)
        self._errored.pop(trial_id, None)
        if frozen is None or frozen.state.is_finished():
            return
        self._study()._storage.set_trial_user_attr(frozen._trial_id, FAIL_REASON, scrub(reason)[:2000])
        self._study().tell(self._ot_trials[trial_id], state=TrialState.FAIL)

    def note_error(self, trial_id: str, reason: str) -> None:
        """Remember why a trial errored (it stays open until ``finalize``, see on_trial_complete)."""
        from trainables.data.storage import scrub

        frozen = self._frozen(trial_id)
        if frozen is not None and not frozen.state.is_finished():
            self._errored[trial_id] = scrub(reason)
            self._study()._storage.set_trial_user_attr(frozen._trial_id, FAIL_REASON, scrub(reason)[:2000])

    def finalize(self) -> None:
        """At the end of an experiment: fail what errored and was not retried (a later --resume
        that retries them reopens them first, see ``attach``)."""
        for trial_id, reason in list(self._errored.items()):
            self.fail(trial_id, reason)
            self._failed_errors.add(trial_id)

    # --- restore on (possibly) another head ----------------------------------------------------
    def attach(self, folder: Path) -> None:
        """Re-open the study in ``folder`` (this head's copy) and reconcile it with what Tune knows:
        study trials Tune never recorded — started, or even finished and told, after Tune's last
        state snapshot — are (re)opened and handed to the next suggestions with their own
        parameters; trials told FAIL because they errored are reopened, since the resumed
        experiment retries them (``resume_errored``)."""
        path = Path(folder) / journal.STUDY_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing; the experiment's study is lost")
        names = [s.study_name for s in optuna.get_all_study_summaries(study_url(folder))]
        if self._study_name not in names:
            raise ValueError(f"{path} has no study {self._study_name!r} (studies: {', '.join(names) or 'none'}); "
                             f"the experiment's study is lost")
        known = {tid: getattr(ot, "_trial_id", ot) for tid, ot in self._ot_trials.items()}
        reopen = self._to_reopen(path, set(known.values()))
        if reopen:
            reopen_trials(path, reopen)
        self._storage = optuna.storages.RDBStorage(study_url(folder))
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, trial_id) for tid, trial_id in known.items()}
        numbers = {self._ot_trials[tid].number for tid in known}
        self._orphans = [t.number for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                         if t.number not in numbers]
        for tid in self._failed_errors & set(known):
            self._errored.setdefault(tid, "the trial errored")
        self._failed_errors -= set(known)
        if self._orphans:
            log.warning("study trials %s were started but never recorded by Tune (killed before its state was "
                        "saved); they are run again with their own parameters", self._orphans)
        journal.register_searcher(self)

    def _to_reopen(self, path: Path, known_ids: set[int]) -> list[int]:
        """Storage ids of finished study trials to reopen: unknown to Tune, or failed by an error."""
        import sqlite3

        with sqlite3.connect(str(path)) as db:
            rows = db.execute(
                "SELECT t.trial_id, t.state, a.value_json FROM trials t JOIN studies s ON t.study_id = s.study_id "
                "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = ? "
                "WHERE s.study_name = ?", (TUNE_TRIAL_ID, self._study_name)).fetchall()
        retried = {getattr(self._ot_trials.get(tid), "_trial_id", self._ot_trials.get(tid))
                   for tid in self._failed_errors}
        return [trial_id for trial_id, state, tune_id in rows
                if state in ("COMPLETE", "PRUNED", "FAIL") and (
                    (tune_id is not None and trial_id not in known_ids) or trial_id in retried)]


def reopen_trials(path: Path, trial_ids: list[int]) -> None:
    """Put finished study trials back to RUNNING, values and fail reason cleared.

    Optuna has no API to reopen a trial (its storages refuse to update a finished one); this writes
    the same rows its RDB storage would, before the study is loaded, on the head's own copy.
    """
    import sqlite3

    marks = ",".join("?" * len(trial_ids))
    with sqlite3.connect(str(path)) as db:
        db.execute(f"UPDATE trials SET state = 'RUNNING', datetime_complete = NULL WHERE trial_id IN ({marks})",
                   trial_ids)
        db.execute(f"DELETE FROM trial_values WHERE trial_id IN ({marks})", trial_ids)
        db.execute(f"DELETE FROM trial_user_attributes WHERE key IN (?, 'stopped_at_epoch') AND trial_id IN "
                   f"({marks})", [FAIL_REASON, *trial_ids])
    log.warning("reopened study trials %s: Tune's state does not hold their end (kill) or retries them", trial_ids)
