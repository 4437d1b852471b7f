"""Search-efficiency benchmark: epochs to a good Pareto front, replayed through the real Tuner.

    python bench/search.py [--quick] [--seeds N] [--per-cell K] [--overhead-trials N] [--curves CSV]
                            [--strategies LIST] [--cell-order rounds|spread|together] [--subset NAME=V,V ...]

``bench/data/curves.csv`` holds the per-epoch learning curves of a grid of ``smoke``-like
configurations trained for real on the synthetic task (``bench/record_curves.py`` made it; its
docstring says how). Each strategy below runs in the real ``ray.tune.Tuner`` on a local Ray
instance, with a Tune function trainable that looks its configuration's curve up and reports it
epoch by epoch (no Ray Train, no sleeping), one trial at a time:

* ``echotune``: EchoTune's default search (``search.run``): ``TruthfulOptunaSearch`` with every
  scientific cell (n_unfrozen x head) enqueued ``--per-cell`` times (``cell_points``: in rounds of
  every cell once, cheapest first: ``Space.cells``), nuisance parameters (lr_head, aug_strength)
  from ``make_sampler("tpe")`` (TPE wrapped in ``CellwiseSampler``: a cell's first trial at the
  centre of every range, i.e. the grid's middle learning rate and its first augmentation strength;
  later ones fitted to the whole study until a cell has trials of its own, no repeats within a
  cell), under its ``KeepTellingLimiter`` (one trial at a time), and
  ``StratifiedASHA`` by cell (time_attr epoch, grace 1, reduction factor 2, max_t = E) that from
  ASHA's second rung pauses a trial dominated by a cheaper trial of another cell and resumes it
  after every other trial (``--scheduler asha``, ``search/schedulers.py``);
* ``echotune_sampled``: the same with ``--cell-start sampled`` (a cell's first trial drawn, from
  TPE's random start-up, then from TPE fitted to the whole study: the default before the centre
  start);
* ``echotune_cells``: the same with ``--scheduler asha-cells`` (ASHA within each cell only: the
  default before deferral);
* ``echotune_pareto``: the same with ``--scheduler asha-pareto`` (such a trial is stopped, not
  paused);
* ``asha_tpe``: Ray's ``OptunaSearch`` with Optuna's default ``TPESampler(seed)`` (no cells) and
  Ray's ``ASHAScheduler`` over all trials (same grace, reduction factor and max_t);
* ``random``: ``OptunaSearch`` with ``RandomSampler(seed)``, no early stopping;
* ``grid``: every configuration of the table to E epochs (``tune.grid_search``), in an order
  shuffled by the seed.

The searches get the same number of trials: cells x ``--per-cell`` (EchoTune's own default budget).
For each strategy the cost is the summed epochs run (by all trials, counted as Tune receives them,
so a paused trial's first epochs count when they ran) until the hypervolume of the front of trials that ran all E epochs (trainable params /
ref_params vs val_px_error, both minimised; reference point (1.0, 20 px), ref_params = 1.1 x the
largest model, as ``search.pareto``) first reaches 95 % of the hypervolume of the whole grid. A
strategy that never gets there is charged all the epochs it ran and counted as a miss (so a
strategy that misses after stopping nearly everything early can show a small ratio: read its
``misses`` and ``median_hv_fraction`` beside it). ``ratio`` is the median over seeds of
echotune / grid (goal <= 0.3); the other strategies' ratios are in ``detail``, with each one's
ratio to the grid's whole cost (every configuration to E epochs), how many trials it stopped
early and how many repeated a configuration already tried in the same search.

The fixed Tune + Train overhead per trial is measured too: seconds per trial with a no-op
trainable, as a plain Tune function and as a Ray Train ``DataParallelTrainer`` (one worker, one
report) inside a Tune function, one trial at a time as ``search.run`` runs them on this machine.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

# The project first: this file's own folder (a script's sys.path[0]) holds a search.py too.
ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def _sibling(name: str):
    """bench/<name>.py as module ``name`` (bench/ is not a package, nor on sys.path under pytest)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


record_curves = _sibling("record_curves")
CONFIG_COLUMNS, GRID, config_id = record_curves.CONFIG_COLUMNS, record_curves.GRID, record_curves.config_id


def _pickle_by_value() -> None:
    """Ray workers cannot import bench/ modules by name: ship their functions by value."""
    from ray import cloudpickle

    for module in {sys.modules[__name__], record_curves}:
        if module.__name__ != "__main__":
            cloudpickle.register_pickle_by_value(module)

GOAL = 0.3
TARGET = 0.95
REF_ERROR, REF_PARAMS_FACTOR = 20.0, 1.1  # search.pareto's defaults
METRIC, MODE = "val_px_error", "min"
SPACE_NAME = "bench_curves"
SCIENTIFIC = ("n_unfrozen", "head")
STRATEGIES = ("echotune", "echotune_sampled", "echotune_cells", "echotune_pareto", "asha_tpe", "random", "grid")
SCHEDULER_FLAG = {"echotune": "asha", "echotune_sampled": "asha", "echotune_cells": "asha-cells",
                  "echotune_pareto": "asha-pareto"}
QUICK_STRATEGIES = ("echotune", "echotune_sampled", "grid")  # --quick: under 5 minutes
CELL_START = {"echotune_sampled": "sampled"}  # else search.run's default, --cell-start centre
DEFAULT_CURVES = Path(__file__).resolve().parent / "data" / "curves.csv"
REPORTED = ("epoch", "val_px_error", "val_px_error_ed", "val_px_error_es", "val_pct_error", "val_dice_ed",
            "val_dice_es", "val_ef_mae_label", "val_ef_mae_contour", "train_loss", "trainable_params",
            "encoder_trainable_params", "head_params", "total_params")


_REAL_STDERR: list = [None]  # where progress goes while Ray's own output is captured


def log(msg: str) -> None:
    print(msg, file=_REAL_STDERR[0] or sys.stderr, flush=True)


@contextlib.contextmanager
def ray_output_to(path: Path):
    """Ray's console output (worker logs forwarded to the driver, Train's messages) into ``path``;
    on an error its last lines are shown."""
    real = sys.stderr
    with Path(path).open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        _REAL_STDERR[0] = real
        try:
            yield
        except BaseException:
            f.flush()
            tail = Path(path).read_text().splitlines()[-40:]
            print("\n".join(["--- Ray output (last lines) ---", *tail]), file=real)
            raise
        finally:
            _REAL_STDERR[0] = None


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def parse_value(name: str, text: str):
    """A grid value as the recording wrote it (``n_unfrozen`` is an int or "all")."""
    if name == "n_unfrozen":
        return text if text == "all" else int(text)
    if name == "head":
        return text
    return float(text)


class Curves:
    """Per-epoch curves of every recorded configuration, the grid they span, and the target."""

    def __init__(self, rows: list[dict], source: str = "curves"):
        missing = set(CONFIG_COLUMNS + REPORTED) - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{source}: missing columns {sorted(missing)}")
        self.curves: dict[str, list[dict]] = {}
        self.params: dict[str, dict] = {}
        for r in rows:
            params = {name: parse_value(name, str(r[name])) for name in GRID}
            key = config_id(params)
            self.params[key] = params
            metrics = {k: float(r[k]) for k in REPORTED} | {"epoch": int(r["epoch"])}
            self.curves.setdefault(key, []).append(metrics)
        for c in self.curves.values():
            c.sort(key=lambda m: m["epoch"])
        self.epochs = max(len(c) for c in self.curves.values())
        every = list(range(1, self.epochs + 1))
        short = [k for k, c in self.curves.items() if [m["epoch"] for m in c] != every]
        if short:
            raise ValueError(f"{source}: configurations without all {self.epochs} epochs: {short[:5]}")
        self.keys = list(self.curves)  # recording order
        # The grid is what was recorded: every value seen, in GRID's order.
        self.grid = {name: [v for v in values if any(p[name] == v for p in self.params.values())]
                     for name, values in GRID.items()}
        if len(self.keys) != math.prod(len(v) for v in self.grid.values()):
            raise ValueError(f"{source}: {len(self.keys)} configurations do not fill the grid {self.grid}")
        self.ref_params = REF_PARAMS_FACTOR * max(c[-1]["total_params"] for c in self.curves.values())
        self.best_hv = self.hypervolume([c[-1] for c in self.curves.values()])

    @classmethod
    def load(cls, path: Path = DEFAULT_CURVES, **subset) -> "Curves":
        """The table in ``path``; ``subset`` (e.g. ``n_unfrozen=[0, "all"]``) keeps part of the grid."""
        with Path(path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        for name, values in subset.items():
            rows = [r for r in rows if parse_value(name, r[name]) in values]
            if not rows:
                raise ValueError(f"{path}: no configuration with {name} in {values}")
        return cls(rows, str(path))

    def cells(self) -> list[dict]:
        cells = [{}]
        for name in SCIENTIFIC:
            cells = [c | {name: v} for c in cells for v in self.grid[name]]
        return cells

    def point(self, final: dict) -> list[float]:
        return [final["trainable_params"] / self.ref_params, final["val_px_error"]]

    def hypervolume(self, finals: list[dict]) -> float:
        from search.pareto import hypervolume_2d

        return hypervolume_2d([self.point(m) for m in finals], (1.0, REF_ERROR)) if finals else 0.0


# ---------------------------------------------------------------------------------------------
# Space, trainable and the record of a run
# ---------------------------------------------------------------------------------------------

class GridSpace:
    """Define-by-run space over exactly the recorded grid: scientific parameters first (the
    cell is then known to ``CellwiseSampler``), one categorical per grid parameter."""

    def __init__(self, grid: dict):
        self.grid = {k: list(v) for k, v in grid.items()}

    def __call__(self, trial, encoder: str | None = None) -> None:
        for name in (*SCIENTIFIC, *(n for n in self.grid if n not in SCIENTIFIC)):
            trial.suggest_categorical(name, self.grid[name])


def register(curves: Curves):
    """The table's space in ``search.spaces.SPACES`` (so ``Space.cells`` and friends work)."""
    from search.spaces import SPACES, register_space

    space = GridSpace(curves.grid)
    register_space(SPACE_NAME, description="the recorded grid of bench/data/curves.csv",
                   scientific=SCIENTIFIC, nuisance=tuple(n for n in curves.grid if n not in SCIENTIFIC),
                   fixed=("encoder=tiny",), encoders=("tiny",),
                   grid=lambda encoder: {k: list(v) for k, v in curves.grid.items()})(space)
    return SPACES[SPACE_NAME]


def replay_trial(config: dict, curves: dict | None = None, order: list | None = None) -> None:
    """Tune function trainable: report the recorded curve of this trial's configuration."""
    from ray import tune

    if "config_index" in config:
        key = order[config["config_index"]]
    else:
        key = config_id({name: config[name] for name in GRID})
    for metrics in curves[key][int(config.get("tune_epoch", 0)):]:  # a resumed trial: what Tune lacks
        tune.report(dict(metrics))


def make_timeline():
    """A Tune callback that notes, per trial, the epochs Tune received and, in completion order,
    each finished trial's last result, with the epochs every trial had run by then (``clock``: a
    trial paused and resumed later ran its first epochs before the trials that ended meanwhile),
    and how long each trial took from start to end."""
    from ray.tune import Callback

    class _Timeline(Callback):
        def __init__(self):
            self.epochs: dict[str, int] = {}
            self.clock = 0
            self.finished: list[dict] = []
            self.starts: dict[str, float] = {}
            self.spans: list[float] = []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.starts[trial.trial_id] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            held = self.epochs.get(trial.trial_id, 0)
            self.epochs[trial.trial_id] = max(held, int(result.get("epoch", 0)))
            self.clock += self.epochs[trial.trial_id] - held

        def _end(self, trial, error: bool) -> None:
            last = dict(trial.last_result or {})
            epochs = max(self.epochs.get(trial.trial_id, 0), int(last.get("epoch", 0) or 0))
            self.finished.append({"trial_id": trial.trial_id, "epochs": epochs, "error": error, "clock": self.clock,
                                  "config": {k: v for k, v in trial.config.items()
                                             if k in (*GRID, "config_index")},
                                  "final": {k: last.get(k) for k in REPORTED}})
            if trial.trial_id in self.starts:
                self.spans.append(time.perf_counter() - self.starts[trial.trial_id])

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, True)

    return _Timeline()


def cost_to_target(finished: list[dict], curves: Curves, target: float = TARGET) -> dict:
    """Summed epochs until the front of full-length trials reaches ``target`` x the grid's hypervolume
    (``finished`` in completion order; each one's ``clock``, where given, is the epochs all trials had
    run when it ended, else the sum of ``epochs`` so far)."""
    spent, done, reached = 0, [], None
    for t in finished:
        spent = t["clock"] if "clock" in t else spent + t["epochs"]
        if not t["error"] and t["epochs"] >= curves.epochs:
            done.append(t["final"])
            if reached is None and curves.hypervolume(done) >= target * curves.best_hv - 1e-12:
                reached = spent
    hv = curves.hypervolume(done)
    return {"epochs_to_target": reached if reached is not None else spent, "missed": reached is None,
            "total_epochs": spent, "trials": len(finished), "completed": len(done),
            "hv_fraction": round(hv / curves.best_hv, 4) if curves.best_hv else 0.0}


# ---------------------------------------------------------------------------------------------
# One replayed search
# ---------------------------------------------------------------------------------------------

CELL_ORDERS = ("rounds", "spread", "together")
CELL_ORDER = ["rounds"]  # --cell-order


def spread(values: list) -> list:
    """Both ends first, then the midpoints of the gaps, recursively: [0, 1, 2, all] -> [0, all, 1, 2]
    (the order ``Space.cells`` gave before it went cheapest first)."""
    order, gaps = list(values[:1]) + list(values[1:][-1:]), [(0, len(values) - 1)]
    while gaps:
        lo, hi = gaps.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(values[mid])
            gaps += [(lo, mid), (mid, hi)]
    return order


def ordered_points(cells: list[dict], per_cell: int) -> list[dict]:
    """The enqueued cells: ``search.run``'s rounds (``cell_points``, cheapest first); with
    ``--cell-order spread`` the same rounds with each scientific value list in ``spread`` order (the
    order before, for comparison); with ``together`` each cell's trials one after another (the order
    before rounds)."""
    from search.study import cell_points

    if CELL_ORDER[0] == "together":
        return [dict(c) for c in cells for _ in range(per_cell)]
    if CELL_ORDER[0] == "spread":
        rank = {name: spread(list(dict.fromkeys(c[name] for c in cells))) for name in SCIENTIFIC}
        cells = sorted(cells, key=lambda c: [rank[name].index(c[name]) for name in SCIENTIFIC])
    return cell_points(cells, per_cell)


def build(strategy: str, curves: Curves, seed: int, per_cell: int, folder: Path):
    """(search_alg, scheduler, param_space, num_samples) of one strategy."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search import journal
    from search.study import TruthfulOptunaSearch, make_sampler, study_url
    from search.tuner import KeepTellingLimiter, make_scheduler

    space = register(curves)
    cells = space.cells("tiny")
    n = len(cells) * per_cell
    E = curves.epochs
    fn = GridSpace(curves.grid)
    if strategy.startswith("echotune"):
        journal.set_folder(folder)  # the study, scheduler.json: this run's own folder
        sampler, _ = make_sampler("tpe", seed, scientific=space.scientific, per_cell=per_cell, num_samples=n,
                                  cell_start=CELL_START.get(strategy, "centre"))
        searcher = TruthfulOptunaSearch(space=fn, metric=METRIC, mode=MODE, sampler=sampler,
                                        study_name=f"bench-{seed}-{uuid.uuid4().hex[:8]}",
                                        points_to_evaluate=ordered_points(cells, per_cell),
                                        storage=optuna.storages.RDBStorage(study_url(folder)), max_t=E)
        scheduler = make_scheduler({"scheduler": SCHEDULER_FLAG[strategy], "space": SPACE_NAME, "max_epochs": E,
                                    "grace_period": 1, "reduction_factor": 2})  # as search.run builds it
        return KeepTellingLimiter(searcher, max_concurrent=1), scheduler, None, n
    if strategy == "asha_tpe":
        searcher = OptunaSearch(space=fn, metric=METRIC, mode=MODE,
                                sampler=optuna.samplers.TPESampler(seed=seed))
        return searcher, ASHAScheduler(time_attr="epoch", metric=METRIC, mode=MODE, max_t=E, grace_period=1,
                                       reduction_factor=2), None, n
    if strategy == "random":
        searcher = OptunaSearch(space=fn, metric=METRIC, mode=MODE,
                                sampler=optuna.samplers.RandomSampler(seed=seed))
        return searcher, FIFOScheduler(), None, n
    if strategy == "grid":
        order = list(range(len(curves.keys)))
        random.Random(seed).shuffle(order)
        return None, FIFOScheduler(), {"config_index": tune.grid_search(order)}, 1
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def run_strategy(strategy: str, curves: Curves, seed: int, per_cell: int, workdir: Path) -> dict:
    """One Tuner run of ``strategy``; returns its cost to the target and the run's record.
    The process-wide state a search sets (``search.journal``'s folder and searcher, the space in
    ``search.spaces.SPACES``) is put back afterwards."""
    from ray import tune

    from search import journal
    from search.spaces import SPACES

    _pickle_by_value()
    folder = workdir / f"{strategy}-{seed}"
    folder.mkdir(parents=True)
    saved_journal, had_space = dict(journal._STATE), SPACE_NAME in SPACES
    try:
        searcher, scheduler, param_space, n = build(strategy, curves, seed, per_cell, folder)
        timeline = make_timeline()
        callbacks = [timeline] + ([journal.JournalCallback()] if strategy.startswith("echotune") else [])
        trainable = tune.with_parameters(replay_trial, curves=curves.curves, order=curves.keys)
        # search.run snapshots Tune's state at every step; that costs time, not epochs
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "auto"
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                        # EchoTune's searcher comes in its own limiter (as search.run's)
                                        max_concurrent_trials=None if strategy.startswith("echotune") else 1,
                                        # as search.run: Tune 2.60 reusing the actor of a paused trial
                                        # kept one trial's CPU reserved after fit() (seen here)
                                        reuse_actors=not strategy.startswith("echotune"),
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{strategy}-{seed}", storage_path=str(workdir / "ray"), verbose=0,
                                      callbacks=callbacks))
        t0 = time.perf_counter()
        with ray_output_to(workdir / "ray-output.log"):
            tuner.fit()
    finally:
        journal._STATE.update(saved_journal)
        if not had_space:
            SPACES.pop(SPACE_NAME, None)
    out = cost_to_target(timeline.finished, curves) | {"seconds": round(time.perf_counter() - t0, 1)}
    out["runs"] = [(curves.keys[t["config"]["config_index"]] if "config_index" in t["config"]
                    else config_id(t["config"]), t["epochs"]) for t in timeline.finished]
    out["stopped_early"] = sum(t["epochs"] < curves.epochs for t in timeline.finished)
    out["repeats"] = len(out["runs"]) - len({key for key, _ in out["runs"]})  # a configuration tried again
    out["errors"] = sum(t["error"] for t in timeline.finished)
    state = folder / "scheduler.json"  # EchoTune's scheduler: paused as dominated, resumed last
    deferred = set(json.loads(state.read_text()).get("deferred", {})) if state.is_file() else set()
    out["deferred"] = len(deferred)
    out["ended_deferred"] = [t["trial_id"] in deferred for t in timeline.finished]  # in completion order
    return out


def replay(curves: Curves, seeds: list[int], per_cell: int, strategies=STRATEGIES,
           workdir: Path | None = None) -> dict:
    """Every strategy for every seed: {strategy: [result per seed]}."""
    results = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        for seed in seeds:
            for s in strategies:
                r = run_strategy(s, curves, seed, per_cell, work)
                results[s].append(r | {"seed": seed})
                log(f"seed {seed} {s:>9}: {r['epochs_to_target']:>4} epochs to {TARGET:.0%} of the grid's "
                    f"hypervolume{' (MISSED: all it ran)' if r['missed'] else ''}; {r['trials']} trials, "
                    f"{r['total_epochs']} epochs, {r['stopped_early']} stopped early, "
                    f"{r['repeats']} repeated, front at {r['hv_fraction']:.1%} ({r['seconds']} s)")
    return results


def summarise(results: dict, curves: Curves) -> dict:
    grid = results["grid"]
    summary = {}
    for s, runs in results.items():
        ratios = [r["epochs_to_target"] / g["epochs_to_target"] for r, g in zip(runs, grid)]
        summary[s] = {"median_epochs_to_target": statistics.median(r["epochs_to_target"] for r in runs),
                      "median_ratio_to_grid": round(statistics.median(ratios), 3),
                      "misses": sum(r["missed"] for r in runs), "seeds": len(runs),
                      "median_total_epochs": statistics.median(r["total_epochs"] for r in runs),
                      "median_trials": statistics.median(r["trials"] for r in runs),
                      "median_ratio_to_grid_total": round(statistics.median(
                          r["epochs_to_target"] / (len(curves.keys) * curves.epochs) for r in runs), 3),
                      "median_repeated_configs": statistics.median(r["repeats"] for r in runs),
                      "median_stopped_early": statistics.median(r["stopped_early"] for r in runs),
                      "median_hv_fraction": statistics.median(r["hv_fraction"] for r in runs),
                      "per_seed_epochs_to_target": [r["epochs_to_target"] for r in runs]}
    return summary


# ---------------------------------------------------------------------------------------------
# Fixed overhead per trial
# ---------------------------------------------------------------------------------------------

def noop_trial(config: dict) -> None:
    from ray import tune

    tune.report({"epoch": 1, METRIC: 0.0})


def noop_worker(config: dict) -> None:
    import ray.train

    ray.train.report({"epoch": 1, METRIC: 0.0})


def noop_train_trial(config: dict) -> None:
    """A Tune trial driver shaped like search.tuner.rehearsal_trial: one Ray Train run, no sleep."""
    import ray.train
    import ray.tune
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from trainables.tune_report import ExactlyOnceReport

    trial_id = ray.tune.get_context().get_trial_id()
    run_config = ray.train.RunConfig(name=f"train-{trial_id}", storage_path=config["storage"],
                                     callbacks=[ExactlyOnceReport(0)],
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    scaling = ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1})
    trainer = DataParallelTrainer(noop_worker, train_loop_config={}, scaling_config=scaling,
                                  run_config=run_config)
    trainer.fit()


def overhead(n: int, cluster: dict, workdir: Path) -> dict:
    """Seconds per trial of the fixed machinery, as search.run sets it up (one trial at a time
    here, Tune state snapshotted every step), with a no-op trainable."""
    from ray import tune

    from search.cluster import driver_resources

    out = {}
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # as search.tuner.start_ray
    for kind, fn in (("tune_function", noop_trial), ("tune_plus_train", noop_train_trial)):
        timeline = make_timeline()
        storage = workdir / f"overhead-{kind}"
        resources = driver_resources(cluster) if kind == "tune_plus_train" else {"CPU": 1}
        tuner = tune.Tuner(tune.with_resources(fn, resources),
                           param_space={"storage": str(storage), "i": tune.grid_search(list(range(n)))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=1,
                                                       trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                           run_config=tune.RunConfig(name=kind, storage_path=str(storage), verbose=0,
                                                     callbacks=[timeline]))
        t0 = time.perf_counter()
        with ray_output_to(workdir / "ray-output.log"):
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        errors = len(grid.errors)
        out[kind] = {"s_per_trial": round(wall / n, 2), "trials": n, "errors": errors,
                     "median_trial_span_s": round(statistics.median(timeline.spans), 2)
                     if timeline.spans else None}
        log(f"overhead, {kind:>15}: {wall / n:6.2f} s per trial ({n} trials, {wall:.1f} s"
            f"{f', {errors} errored' if errors else ''})")
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("ray", "ray.tune", "ray.train", "echotune.search"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"3 seeds, {', '.join(QUICK_STRATEGIES)} only, 2 overhead trials (under 5 minutes)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds (default 21, quick 3): the grid's cost to the target ranges from 12 to 150 epochs "
                        "between seeds, so a median over a few seeds says little")
    p.add_argument("--per-cell", type=int, default=2, help="trials per cell for the searches (default 2)")
    p.add_argument("--overhead-trials", type=int, default=None,
                   help="no-op trials per kind (default 4, quick 2; 0 skips)")
    p.add_argument("--curves", type=Path, default=DEFAULT_CURVES)
    p.add_argument("--subset", action="append", default=[], metavar="NAME=V,V",
                   help=f"replay part of the grid only, e.g. lr_head=0.0003,0.001 (a table whose centre learning "
                        f"rate is its worst); NAME among {', '.join(GRID)}; repeatable")
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated, among {', '.join(STRATEGIES)} (default all, with --quick "
                        f"{', '.join(QUICK_STRATEGIES)}; echotune and grid always run: the ratio needs them)")
    p.add_argument("--cell-order", choices=CELL_ORDERS, default="rounds",
                   help="how the echotune searches enqueue cells: rounds (default, as search.run: every cell once, "
                        "cheapest first, then again), spread (the same rounds, frozen and full fine-tuning first, "
                        "then between: the order before) or together (each cell's trials one after another)")
    args = p.parse_args(argv)
    CELL_ORDER[0] = args.cell_order
    chosen = args.strategies or ",".join(QUICK_STRATEGIES if args.quick else STRATEGIES)
    asked = {x.strip() for x in chosen.split(",") if x.strip()}
    if asked - set(STRATEGIES):
        p.error(f"--strategies: unknown {', '.join(sorted(asked - set(STRATEGIES)))}; choose among "
                f"{', '.join(STRATEGIES)}")
    strategies = tuple(s for s in STRATEGIES if s in asked | {"echotune", "grid"})
    seeds = list(range(args.seeds or (3 if args.quick else 21)))
    n_overhead = args.overhead_trials if args.overhead_trials is not None else (2 if args.quick else 4)
    subset = {}
    for item in args.subset:
        name, _, values = item.partition("=")
        valid = ", ".join(f"{k}={','.join(str(v) for v in vs)}" for k, vs in GRID.items())
        if name in subset:
            p.error(f"--subset {item!r}: {name} given twice; list its values once, comma-separated")
        try:
            subset[name] = [parse_value(name, v.strip()) for v in values.split(",")]
        except ValueError:  # not a number: refused just below, as any value outside the grid
            subset[name] = []
        if name not in GRID or not subset[name] or not set(subset[name]) <= set(GRID[name]):
            p.error(f"--subset {item!r}: give NAME=V,V from the recorded grid: {valid}")
    try:
        curves = Curves.load(args.curves, **subset)
    except (OSError, ValueError) as e:
        p.error(str(e))
    quiet()
    log(f"table: {len(curves.keys)} configurations x {curves.epochs} epochs ({args.curves.name}); "
        f"{len(curves.cells())} cells; grid hypervolume {curves.best_hv:.4f}; "
        f"target {TARGET:.0%}; {len(curves.cells()) * args.per_cell} trials per search")
    t0 = time.perf_counter()
    from search.tuner import start_ray

    import ray

    _pickle_by_value()
    with tempfile.TemporaryDirectory() as tmp:
        with ray_output_to(Path(tmp) / "ray-output.log"):
            cluster = start_ray(None)
        try:
            results = replay(curves, seeds, args.per_cell, strategies=strategies, workdir=Path(tmp))
            over = overhead(n_overhead, cluster, Path(tmp)) if n_overhead else {}
        finally:
            with ray_output_to(Path(tmp) / "ray-output.log"):
                ray.shutdown()
    summary = summarise(results, curves)
    for s, v in summary.items():
        log(f"{s:>9}: median {v['median_epochs_to_target']} epochs to target, ratio to grid "
            f"{v['median_ratio_to_grid']}, misses {v['misses']}/{v['seeds']}")
    detail = {
        "strategies": summary,
        "table": {"configs": len(curves.keys), "epochs": curves.epochs, "cells": len(curves.cells()),
                  "grid": {k: [str(x) for x in v] for k, v in curves.grid.items()},
                  "grid_total_epochs": len(curves.keys) * curves.epochs},
        "budget_trials": len(curves.cells()) * args.per_cell, "per_cell": args.per_cell,
        "subset": {k: [str(x) for x in v] for k, v in subset.items()},
        "cell_order": args.cell_order,
        "target": f"{TARGET:.0%} of the grid's hypervolume (trainable/ref_params vs val_px_error, ref (1.0, "
                  f"{REF_ERROR:g} px), ref_params {curves.ref_params:.0f}); only trials that ran all epochs "
                  f"count",
        "grid_hypervolume": round(curves.best_hv, 5),
        "grid_in_recorded_order_epochs_to_target": cost_to_target(
            [{"epochs": curves.epochs, "error": False, "final": curves.curves[k][-1]} for k in curves.keys],
            curves)["epochs_to_target"],
        "ratio_to_grid_total": "epochs to target / every configuration to E epochs (what a grid costs to "
                               "finish)",
        "repeated_configs": "trials whose configuration an earlier trial of the same search already ran",
        "miss_rule": "a strategy that never reaches the target is charged every epoch it ran; its ratio is "
                     "then no measure of efficiency (see misses and median_hv_fraction)",
        "seeds": len(seeds), "concurrency": 1,
        "overhead_s_per_trial": over,
        "wall_s": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(), "quick": args.quick,
    }
    print(json.dumps({"bench": "search", "ratio": summary["echotune"]["median_ratio_to_grid"], "goal": GOAL,
                      "detail": detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
