"""Assemble one search: its own Ray instance, the truthful Optuna searcher, the stratified ASHA,
the journal callback, and the Tuner (new or restored, with orphans of a kill cleaned up)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search import journal
from search.spaces import SpaceFn, get_space, params_of
from trainables.data import storage as store

log = logging.getLogger("echotune.search")
METRIC, MODE = "val_px_error", "min"
MULTI_METRIC, MULTI_MODE = ["val_px_error", "trainable_params"], ["min", "min"]


# ---------------------------------------------------------------------------------------------
# Ray: a search talks to its own instance only
# ---------------------------------------------------------------------------------------------

def start_ray(address: str | None) -> dict:
    """The search's own Ray instance (trainables.driver.init_ray); returns its resources."""
    import ray

    from trainables.driver import init_ray

    # Snapshot Tune's experiment state at every controller step, not every ~10 s (RAY.md §1.6). The
    # upload to remote storage is skipped while the previous one is still in flight, so a remote
    # snapshot can lag a little; the resume reconciles what it lags (search/study.py, schedulers.py).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    init_ray(address)
    return dict(ray.cluster_resources())


# ---------------------------------------------------------------------------------------------
# Searcher and scheduler
# ---------------------------------------------------------------------------------------------

def existing_trials(folder: Path, study_name: str) -> int:
    import optuna

    from search.study import study_url

    path = Path(folder) / journal.STUDY_FILE
    if not path.exists():
        return 0
    try:
        return len(optuna.load_study(study_name=study_name, storage=study_url(folder)).trials)
    except KeyError:
        return 0


def make_searcher(settings: dict, folder: Path, base: dict):
    """The truthful Optuna searcher; a new study gets every cell enqueued ``per_cell`` times."""
    import optuna

    from search.study import TruthfulOptunaSearch, cell_points, make_sampler, study_url

    space = get_space(settings["space"])
    multi = settings["multi_objective"]
    sampler, _ = make_sampler(settings["sampler"], settings["seed"], scientific=space.scientific,
                              per_cell=settings["per_cell"], num_samples=settings["num_samples"],
                              n_objectives=2 if multi else 1,
                              cell_start=settings.get("cell_start") or "sampled")  # (before it existed: drawn)
    points = []  # a study that already exists has its cells enqueued (and ordering them builds models)
    if not existing_trials(folder, settings["study_name"]):
        points = cell_points(space.cells(settings["encoder"]), settings["per_cell"])
    space_fn = SpaceFn(settings["space"], settings["encoder"], base, weights_map(settings.get("weights")))
    searcher = TruthfulOptunaSearch(space=space_fn, metric=MULTI_METRIC if multi else METRIC,
                                    mode=MULTI_MODE if multi else MODE, sampler=sampler,
                                    study_name=settings["study_name"], points_to_evaluate=points or None,
                                    storage=optuna.storages.RDBStorage(study_url(folder)),
                                    max_t=settings["max_epochs"])
    journal.push_study()  # a head lost before the first result can still be replaced
    return searcher


class KeepTellingLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter forgets a trial once it errored, so the final result of a retry
    (FailureConfig, or ``--resume`` with resume_errored) never reached the searcher; this one
    passes every completion on (the searcher ignores what it was told already)."""

    @property
    def paused(self) -> set[str]:
        """Trials the scheduler paused (search/schedulers.py ``defer``): they hold no slot."""
        return self.__dict__.setdefault("_paused", set())  # also in a limiter pickled by an older EchoTune

    def release_slot(self, trial_id: str, force: bool = False):
        """A trial the scheduler paused gives its slot to the next trial until it resumes
        (``force``: a paused trial restored after a kill, whether or not it held one)."""
        if trial_id in self.live_trials:
            self.live_trials.remove(trial_id)
            self.num_unfinished_live_trials -= 1
            self.paused.add(trial_id)
        elif force:
            self.paused.add(trial_id)

    def take_slot(self, trial_id: str) -> bool:
        """Take a slot back for a paused trial; False while every slot is taken."""
        if trial_id in self.paused:
            if len(self.live_trials) >= self.max_concurrent:
                return False
            self.paused.remove(trial_id)
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.paused.discard(trial_id)
        if trial_id in self.live_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        return self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def reconcile(self, statuses: dict[str, str]) -> None:
        """After a restore, hold slots for exactly the trials Tune will run (its snapshot's
        unfinished ones, errored ones included: the search resumes them). The restored limiter state
        may be newer than that snapshot: a trial suggested after it, which Tune never ran, held a
        slot for ever (with one trial at a time, the resumed search waited for ever); or older: a
        finished trial held one, a running one none. Tune requeues every unfinished trial to run,
        paused ones too; the scheduler pauses again those still paused (``release_slot``)."""
        self.paused.clear()
        self.live_trials = {tid for tid, status in statuses.items() if status != "TERMINATED"}
        self.num_unfinished_live_trials = len(self.live_trials)


class ReconcilingSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator, that squares the searcher state it restores with Tune's experiment
    state: Tune writes them one after the other, and uploads to remote storage whatever the staging
    folder holds when the previous upload ends, so the two may come from different moments."""

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        statuses = recorded_statuses(dirpath)  # (check_tune_state refused a damaged one before Tune got here)
        if statuses is None:
            return
        if self._counter != len(statuses):
            log.warning("the searcher's state counted %d trials, Tune's snapshot holds %d: the search goes on "
                        "from Tune's", self._counter, len(statuses))
        self._counter = len(statuses)  # each Tune trial was one suggestion; a lost one's study trial runs again
        if hasattr(self.searcher, "reconcile"):
            self.searcher.reconcile(statuses)


def make_scheduler(settings: dict):
    from search.schedulers import ResumingFIFO, StratifiedASHA

    if settings["scheduler"] == "none":
        return ResumingFIFO(METRIC)
    pareto = settings["scheduler"] in ("asha", "asha-pareto")  # asha: dominated trials deferred, not stopped
    return StratifiedASHA(get_space(settings["space"]).scientific, time_attr="epoch", metric=METRIC, mode=MODE,
                          cost="trainable_params" if pareto else None, defer=settings["scheduler"] == "asha",
                          max_t=settings["max_epochs"], grace_period=settings["grace_period"],
                          reduction_factor=settings["reduction_factor"])


def weights_map(weights: str | None) -> dict:
    """``echoprime=/a.pt,panecho=s3://b/p.pt`` -> {encoder: weights} (spaces that pick the encoder)."""
    if not weights or "=" not in weights.split(",")[0].split("://")[0]:
        return {}
    return dict(item.split("=", 1) for item in weights.split(","))


# ---------------------------------------------------------------------------------------------
# Trainables (the Tune side of one trial)
# ---------------------------------------------------------------------------------------------

def run_trial(config: dict) -> None:
    """Ray Tune trainable: suggested parameters + base config -> one Ray Train run."""
    from search.spaces import apply
    from trainables.driver import trial_driver

    trial_driver(apply(params_of(config), config["base"], config.get("weights")), config.get("tune_epoch", 0))


def rehearsal_trial(config: dict) -> None:
    """Ray Tune trainable for --trainable rehearsal: same placement, sleeping workers."""
    from search.rehearsal import run_rehearsal
    from search.spaces import apply

    params = params_of(config)
    run_rehearsal(params, apply(params, config["base"], config.get("weights")), config.get("tune_epoch", 0))


def trial_dirname(trial) -> str:
    """Short trial folders (the default embeds every config value, the base config included)."""
    return f"trial_{trial.trial_id}"


def trainable(settings: dict, cluster: dict):
    from ray import tune

    from search.cluster import driver_resources
    fn = rehearsal_trial if settings.get("trainable") == "rehearsal" else run_trial
    return tune.with_resources(fn, driver_resources(cluster))


# ---------------------------------------------------------------------------------------------
# The Tuner
# ---------------------------------------------------------------------------------------------

def experiment_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def run_config(settings: dict, s3_endpoint: str | None):
    from ray import tune

    pa = store.pyarrow_fs(settings["storage"], s3_endpoint)
    return tune.RunConfig(name=settings["name"], storage_path=pa[1] if pa else settings["storage"],
                          storage_filesystem=pa[0] if pa else None, callbacks=[journal.JournalCallback()],
                          failure_config=tune.FailureConfig(max_failures=1), verbose=1)


def build_tuner(settings: dict, base: dict, folder: Path, cluster: dict, s3_endpoint: str | None,
                resumed: bool = False):
    """A new Tuner; ``resumed``: the experiment was killed before Tune's first state snapshot, so
    Tune starts again and the study's trials from before are reconciled (all unknown to Tune)."""
    from ray import tune

    searcher = make_searcher(settings, folder, base)
    if resumed:
        remove_orphans(settings, s3_endpoint, known=set())
        searcher.attach(folder)
    limited = KeepTellingLimiter(searcher, max_concurrent=settings["max_concurrent"])
    tune_config = tune.TuneConfig(search_alg=ReconcilingSearchGenerator(limited),
                                  scheduler=make_scheduler(settings),
                                  num_samples=settings["num_samples"], trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable(settings, cluster), tune_config=tune_config,
                      run_config=run_config(settings, s3_endpoint))


def tune_path(settings: dict, s3_endpoint: str | None) -> tuple[str, object]:
    """(path, filesystem) of the experiment as Tune wants them: with a pyarrow filesystem the path
    is ``bucket/key``, not an ``s3://`` URI."""
    pa = store.pyarrow_fs(settings["storage"], s3_endpoint)
    if pa:
        return f"{pa[1]}/{settings['name']}", pa[0]
    return experiment_uri(settings["storage"], settings["name"]), None


def can_restore(settings: dict, s3_endpoint: str | None) -> bool:
    from ray import tune

    path, fs = tune_path(settings, s3_endpoint)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def restore_tuner(settings: dict, cluster: dict, s3_endpoint: str | None):
    from ray import tune

    path, fs = tune_path(settings, s3_endpoint)
    check_tune_state(settings, s3_endpoint)
    remove_orphans(settings, s3_endpoint)
    tuner = tune.Tuner.restore(path, trainable(settings, cluster), resume_unfinished=True, resume_errored=True,
                               storage_filesystem=fs)
    reconciling(tuner)
    return tuner


def reconciling(tuner) -> None:
    """An experiment started by an EchoTune older than ReconcilingSearchGenerator pickled the bare
    limiter, which Tune would wrap in its own generator: wrap it in ours instead, so that its
    resume cannot wait for ever either. (Tuner.restore offers no way to pass a search algorithm.)"""
    config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    if config is not None and isinstance(config.search_alg, KeepTellingLimiter):
        config.search_alg = ReconcilingSearchGenerator(config.search_alg)


def check_tune_state(settings: dict, s3_endpoint: str | None) -> None:
    """Refuse to resume from a cut or damaged Tune state file, naming it. Tune copies its state to the
    experiment storage without an atomic rename, so a kill during the copy can cut a file; Tune then
    logs "Failed to restore the run state", restarts the experiment from nothing and waits forever
    for a trial. (A cut searcher-state pickle is rebuilt from the study instead: study.py.)"""
    from ray import cloudpickle

    fs, base = store.open_fs(experiment_uri(settings["storage"], settings["name"]), s3_endpoint)
    for pattern, load in (("experiment_state-*.json", json.loads), ("search_gen_state-*.json", cloudpickle.loads)):
        newest = newest_state_file(fs, base, pattern)
        if newest is None:
            continue
        try:
            load(fs.cat_file(newest))
        except Exception as exc:  # noqa: BLE001 - whatever a cut file raises
            name = newest.rsplit("/", 1)[-1]
            raise ValueError(
                f"experiment {settings['name']!r}: Tune's state file {name} is cut or damaged ({type(exc).__name__}; "
                f"a kill while Tune copied it to the storage), so Tune cannot resume it. Its finished trials stay "
                f"in the experiment folder and optuna.db (python -m search.pareto reads them); run the rest of the "
                f"search under a new --name") from None


def newest_state_file(fs, base: str, pattern: str) -> str | None:
    """The newest of Tune's state files ``pattern`` in folder ``base`` of ``fs`` (None when there is
    none): the name holds the session's start time, Tune's own rule (experiment_state.py)."""
    files = fs.glob(f"{base}/{pattern}")
    return max(files) if files else None


def known_trials(settings: dict, s3_endpoint: str | None) -> set[str] | None:
    """Trial ids in Tune's newest experiment state snapshot (None when there is none)."""
    return trial_ids_in(*store.open_fs(experiment_uri(settings["storage"], settings["name"]), s3_endpoint))


def trial_ids_in(fs, base: str) -> set[str] | None:
    """Trial ids in the newest ``experiment_state-*.json`` in folder ``base`` of ``fs`` (None when
    there is none); a damaged file raises ValueError, KeyError or TypeError."""
    statuses = trial_statuses_in(fs, base)
    return None if statuses is None else set(statuses)


def trial_statuses_in(fs, base: str) -> dict[str, str] | None:
    """Trial id -> status in the newest ``experiment_state-*.json`` in folder ``base`` of ``fs``."""
    newest = newest_state_file(fs, base, "experiment_state-*.json")
    if newest is None:
        return None
    data = json.loads(fs.cat_file(newest))
    statuses = {}
    for trial_json, _meta in data.get("trial_data", []):
        state = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        statuses[state["trial_id"]] = state.get("status", "PENDING")
    return statuses


def recorded_statuses(folder) -> dict[str, str] | None:
    """Trial id -> status in Tune's newest experiment state in local ``folder``; None if there is
    none or it cannot be read."""
    try:
        return trial_statuses_in(*store.open_fs(str(folder)))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def remove_orphans(settings: dict, s3_endpoint: str | None, known: set[str] | None = None) -> list[str]:
    """Delete trial folders and Train runs that Tune never recorded (a kill between a trial's
    start and Tune's next state snapshot): the restored search does not know them, so they would
    stay behind as trials without results. Their study trials are re-run (search/study.py)."""
    if known is None:
        known = known_trials(settings, s3_endpoint)
    if known is None:
        return []
    fs, base = store.open_fs(experiment_uri(settings["storage"], settings["name"]), s3_endpoint)
    removed = []
    for path in fs.ls(base, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        for prefix in ("trial_", "train-"):
            if name.startswith(prefix) and name[len(prefix):] not in known:
                fs.rm(path, recursive=True)
                removed.append(name)
    if removed:
        log.warning("removed %s: started before the kill but never recorded by Tune; re-run", removed)
        print(f"resume: removed {len(removed)} folder(s) of trials the kill cut off before Tune recorded them: "
              f"{', '.join(sorted(removed))}", flush=True)
    return removed
