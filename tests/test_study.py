"""The search's bookkeeping without a Ray cluster: cells enqueued before exploitation, nuisance
parameters tuned per cell, a study told the truth (COMPLETE / PRUNED / FAIL with reasons, told twice,
errored-then-retried, orphans after a kill), and the stratified ASHA (cells, NaN, resume)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from search import journal
from search.schedulers import StratifiedASHA
from search.spaces import LORA_RANKS, SPACES, SpaceFn, cell_cost
from search.study import (FAIL_REASON, TUNE_TRIAL_ID, CellwiseSampler, TruthfulOptunaSearch, cell_points, centre,
                          make_sampler, study_url)

optuna.logging.set_verbosity(optuna.logging.WARNING)
BASE = {"encoder": {"name": "tiny"}, "data": {"uri": "x"}}


@pytest.fixture
def folder(tmp_path):
    journal.set_folder(tmp_path)
    yield tmp_path
    journal._STATE.update(folder=None, searcher=None, journal=None)


def searcher(folder, space="smoke", per_cell=1, num_samples=8, multi=False, sampler="tpe", seed=0, enqueue=True,
             cell_start="centre"):
    s = SPACES[space]
    smp, _ = make_sampler(sampler, seed, scientific=s.scientific, per_cell=per_cell, num_samples=num_samples,
                          cell_start=cell_start)
    return TruthfulOptunaSearch(space=SpaceFn(space, "tiny", BASE), sampler=smp, study_name="s",
                                metric=["val_px_error", "trainable_params"] if multi else "val_px_error",
                                mode=["min", "min"] if multi else "min",
                                points_to_evaluate=cell_points(s.cells("tiny"), per_cell) if enqueue else None,
                                storage=optuna.storages.RDBStorage(study_url(folder)), max_t=3)


def study(folder):
    return optuna.load_study(study_name="s", storage=study_url(folder))


def result(epoch, err, **kw):
    return {"epoch": epoch, "val_px_error": err, "trainable_params": 1000, "train_loss": 0.1} | kw


# --- cells ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", list(SPACES))
def test_every_space_declares_a_grid_over_its_scientific_parameters(space):
    s = SPACES[space]
    enc = {"baselines": "r3d_18", "paper": "echoprime", "smoke": "tiny"}.get(space, "echoprime")
    cells = s.cells(enc)
    assert cells and all(set(c) <= set(s.scientific) and s.scientific[-1] in c for c in cells)
    if s.grid and not isinstance(s.grid(enc), list):  # a plain grid: every scientific parameter in every cell
        assert all(set(c) == set(s.scientific) for c in cells)
    assert len({s.cell_of(c) for c in cells}) == len(cells)  # no cell twice


def test_every_cell_is_tried_before_the_sampler_exploits_cheapest_first(folder):
    cells = SPACES["selective_ft"].cells("echoprime")
    costs = [cell_cost(c, "echoprime") for c in cells]
    assert len(cells) == 20 and costs == sorted(costs)
    depth = [(c["regime"], c.get("n_unfrozen", c.get("lora_last")), c["head"]) for c in cells]
    assert depth[0] == ("unfreeze", 0, "mlp") and depth[-1] == ("unfreeze", "all", "gcn")
    # LoRA at any depth trains fewer parameters than one unfrozen MViT block: it is met first
    assert max(i for i, d in enumerate(depth) if d[0] == "lora") < depth.index(("unfreeze", 1, "mlp"))
    paper = [(c["encoder"], c["n_unfrozen"]) for c in SPACES["paper"].cells("echoprime")]
    assert paper.index(("panecho", 0)) < paper.index(("echoprime", 2))  # encoders interleave by cost
    points = cell_points(cells, 2)
    assert points == [c for _ in (0, 1) for c in cells]  # in rounds: every cell once, then every cell again
    cells = SPACES["selective_ft"].cells("tiny")
    points = cell_points(cells, 2)
    s = searcher(folder, "selective_ft", per_cell=2, num_samples=len(cells) * 2)
    seen = [s.suggest(f"t{i}") for i in range(len(points))]
    assert [{k: c[k] for k in p} for c, p in zip(seen, points)] == points
    for c in seen:  # the sampler filled in the nuisance parameters of each enqueued cell
        assert "aug_strength" in c and "head_dropout" in c and any(k.startswith("lr_") for k in c)
    free = s.suggest("free")  # the budget beyond the cells: the sampler chooses the cell too
    assert {"regime", "head"} <= set(free) and len({"n_unfrozen", "lora_last"} & set(free)) == 1


class _Spy(optuna.samplers.RandomSampler):
    """A random base sampler with TPE's start-up threshold that records which trials it was shown."""

    def __init__(self, seed=0, startup=2):
        super().__init__(seed=seed)
        self._n_startup_trials, self.seen = startup, []

    def sample_independent(self, study, trial, name, dist):
        self.seen.append((name, {t.number for t in study._get_trials(deepcopy=False, states=None)}))
        return super().sample_independent(study, trial, name, dist)


def _ask(st, head, lr_choices=(1e-4, 1e-3, 1e-2), value=1.0):
    st.enqueue_trial({"head": head})
    t = st.ask()
    t.suggest_categorical("head", ["mlp", "gcn"])
    t.suggest_categorical("lr", list(lr_choices))
    st.tell(t, value)
    return t


def test_nuisance_parameters_come_from_the_whole_study_until_the_cell_has_its_own_start_up():
    spy = _Spy(startup=2)
    st = optuna.create_study(sampler=CellwiseSampler(spy, ("head",), seed=0, start="sampled"))
    for head in ("mlp", "gcn", "mlp", "mlp", "gcn"):
        _ask(st, head)
    lr_views = [view for name, view in spy.seen if name == "lr"]
    assert lr_views[1] == {0, 1}  # trial 1 (gcn, no gcn trial yet) learns from the mlp trial too
    assert lr_views[2] == {0, 1, 2}  # trial 2 (mlp): its cell holds 1 finished trial, below the start-up
    assert lr_views[3] == {0, 2, 3}  # trial 3 (mlp): 2 mlp trials finished: only its own cell
    assert lr_views[4] == {0, 1, 2, 3, 4}  # trial 4 (gcn): 1 gcn trial, still below the start-up


def test_a_fresh_cell_starts_from_the_nuisance_setting_that_worked_in_the_others():
    """--cell-start sampled: TPE fitted to the whole study; the learning rate that won in the mlp
    cell is the gcn cell's first guess (random start-up alone would pick it 1 time in 4)."""
    picks = []
    for seed in range(8):
        sampler, _ = make_sampler("tpe", seed, scientific=("head",), per_cell=2, num_samples=8,
                                  cell_start="sampled")
        st = optuna.create_study(sampler=sampler)
        for lr in (1e-4, 1e-3, 1e-2, 1e-1):
            st.enqueue_trial({"head": "mlp", "lr": lr})
            t = st.ask()
            t.suggest_categorical("head", ["mlp", "gcn"])
            t.suggest_categorical("lr", [1e-4, 1e-3, 1e-2, 1e-1])
            st.tell(t, 1.0 if lr == 1e-2 else 5.0)
        st.enqueue_trial({"head": "gcn"})
        t = st.ask()
        t.suggest_categorical("head", ["mlp", "gcn"])
        picks.append(t.suggest_categorical("lr", [1e-4, 1e-3, 1e-2, 1e-1]))
    assert picks.count(1e-2) >= 6, picks


def test_a_trial_does_not_repeat_the_parameters_of_an_earlier_trial_of_its_cell():
    repeats = 0
    for seed in range(10):
        smp, _ = make_sampler("tpe", seed, scientific=("head",), per_cell=3, num_samples=6)
        st = optuna.create_study(sampler=smp)
        for i in range(4):
            _ask(st, "mlp", lr_choices=(1e-3, 1e-2, 1e-1), value=float(i))
        lrs = [t.params["lr"] for t in st.trials]
        assert len(set(lrs[:3])) == 3, (seed, lrs)  # three choices, three trials: each tried once
        repeats += len(lrs) - len(set(lrs))  # the fourth must repeat one: accepted, no endless retry
        # TPE's constant liar reads the fourth trial's parameters from its record: the ones it used
        assert json.loads(st.trials[3].system_attrs["tpe:relative_params:0"]) == {"lr": lrs[3]}
    assert repeats == 10


def test_no_repeats_either_when_other_cells_have_conditional_parameters():
    """A GCN trial's width is in TPE's search space for every trial once one GCN trial ran; an MLP
    trial's sample then carries it too, yet only the parameters MLP trials use decide a repeat."""
    for seed in range(10):
        smp, _ = make_sampler("tpe", seed, scientific=("head",), per_cell=3, num_samples=6)
        st = optuna.create_study(sampler=smp)
        for i, head in enumerate(["gcn", "mlp"] * 3):
            st.enqueue_trial({"head": head})
            t = st.ask()
            t.suggest_categorical("head", ["mlp", "gcn"])
            t.suggest_categorical("lr", [1e-3, 1e-2, 1e-1])
            if head == "gcn":
                t.suggest_categorical("gcn_width", [8, 16])
            st.tell(t, float(i))
        mlp = [t.params["lr"] for t in st.trials if t.params["head"] == "mlp"]
        gcn = [(t.params["lr"], t.params["gcn_width"]) for t in st.trials if t.params["head"] == "gcn"]
        assert len(set(mlp)) == 3 and len(set(gcn)) == 3, (seed, mlp, gcn)


@pytest.mark.parametrize("distribution, middle", [
    (optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True), 1e-3),
    (optuna.distributions.FloatDistribution(0.0, 0.5), 0.25),
    (optuna.distributions.IntDistribution(1, 9), 5),
    (optuna.distributions.IntDistribution(1, 50, log=True), 7),  # 7.07, an integer
    (optuna.distributions.IntDistribution(0, 16, step=8), 8),
    (optuna.distributions.CategoricalDistribution([16, 32, 64]), 32),
    (optuna.distributions.CategoricalDistribution(["sparse", "full"]), "sparse"),
])
def test_centre_of_each_kind_of_range(distribution, middle):
    got = centre(distribution)
    assert got == pytest.approx(middle) and distribution._contains(distribution.to_internal_repr(got))


@pytest.mark.parametrize("cell_start, told", [("centre", False), ("centre", True), ("sampled", True)])
def test_each_cells_first_trial_starts_at_the_centre_of_every_nuisance_range(folder, cell_start, told):
    """The first round compares the cells at one shared setting; later trials are drawn (and every
    trial of the first round, enqueued trials of the second waiting meanwhile, counts as a first).
    ``told``: each trial ends before the next is asked, as one at a time does, so TPE has a
    relative search space and the centre comes from ``sample_relative`` too."""
    cells = SPACES["selective_ft"].cells("tiny")
    s = searcher(folder, "selective_ft", per_cell=2, num_samples=len(cells) * 2, cell_start=cell_start)
    sampler, relative = s._sampler, []
    sample_relative = sampler.sample_relative
    sampler.sample_relative = lambda st, t, space: relative.append(len(space)) or sample_relative(st, t, space)
    seen = []
    for i in range(len(cells) * 2):
        seen.append(s.suggest(f"t{i}"))
        if told:
            s.on_trial_complete(f"t{i}", result(3, 5.0 + (i * 7) % 5))
    assert (sum(n > 0 for n in relative[:len(cells)]) >= len(cells) - 2) == told  # all but TPE's start-up
    middle = {"lr_head": 1e-3, "lr_lora": math.sqrt(1e-5 * 1e-2), "aug_strength": 0.5, "head_dropout": 0.25,
              "weight_decay": math.sqrt(1e-6 * 1e-1), "gcn_width": 32, "mlp_width": 256, "gcn_graph": "sparse",
              "lora_rank": LORA_RANKS[1]}

    def at_centre(c):
        stages = [k for k in c if k.startswith("lr_") and k not in middle]  # lr_<stage group>: [1e-6, 1e-3]
        return all(c[k] == pytest.approx(v) for k, v in middle.items() if k in c) and \
            all(c[k] == pytest.approx(math.sqrt(1e-6 * 1e-3)) for k in stages)

    first, second = seen[:len(cells)], seen[len(cells):]
    if cell_start == "centre":
        assert all(at_centre(c) for c in first), [c for c in first if not at_centre(c)]
    else:
        assert not any(at_centre(c) for c in first)
    assert not any(at_centre(c) for c in second)  # drawn: a cell's second trial explores
    assert all(c["lr_head"] != first[i]["lr_head"] for i, c in enumerate(second))


def test_a_sampler_pickled_before_the_centre_start_goes_on_drawing():
    import pickle

    old = CellwiseSampler(optuna.samplers.RandomSampler(seed=0), ("head",), seed=0)
    del old.__dict__["start"]  # as an experiment saved before --cell-start pickled it
    assert pickle.loads(pickle.dumps(old)).start == "sampled"


def test_cell_starts_offered_by_the_command_line_are_the_samplers():
    from search.run import CELL_STARTS

    assert CELL_STARTS == CellwiseSampler.STARTS
    with pytest.raises(ValueError, match="choose one of centre, sampled"):
        CellwiseSampler(optuna.samplers.RandomSampler(), ("head",), start="middle")


def test_tpe_start_up_and_nsga2_population_follow_the_budget():
    _, notes = make_sampler("tpe", 0, scientific=("head",), per_cell=8, num_samples=16)
    assert any("n_startup_trials=4" in n for n in notes)
    _, notes = make_sampler("tpe", 0, scientific=("head",), per_cell=2, num_samples=8)
    assert any("n_startup_trials=2" in n for n in notes)  # never 1: TPE would propose its one point again
    sampler, notes = make_sampler("nsga2", 0, scientific=("head",), per_cell=4, num_samples=32)
    assert sampler._population_size == 8 and any("population_size=8" in n for n in notes)


# --- the truth, told to Optuna -------------------------------------------------------------------

def test_states_intermediate_values_and_tune_ids(folder):
    s = searcher(folder)
    configs = {tid: s.suggest(tid) for tid in ("done", "stopped", "nan", "err")}
    for epoch in (1, 2, 3):
        s.on_trial_result("done", result(epoch, 10.0 - epoch))
    s.on_trial_complete("done", result(3, 7.0))
    s.on_trial_result("stopped", result(1, 12.0))
    s.on_trial_complete("stopped", result(2, 11.0))  # ASHA's STOP result reaches only on_trial_complete
    s.on_trial_result("nan", result(1, 9.0))
    s.on_trial_complete("nan", result(2, math.nan, non_finite="train_loss is nan at epoch 2"))
    s.on_trial_complete("err", error=True)
    s.note_error("err", "the trial errored: RuntimeError: CUDA out of memory")
    by_id = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study(folder).trials}
    assert {k: configs[k]["study_trial"] for k in by_id} == {k: t.number for k, t in by_id.items()}
    assert by_id["done"].state.name == "COMPLETE" and by_id["done"].value == 7.0
    assert by_id["done"].intermediate_values == {1: 9.0, 2: 8.0, 3: 7.0}
    assert by_id["stopped"].state.name == "PRUNED" and by_id["stopped"].intermediate_values == {1: 12.0, 2: 11.0}
    assert by_id["nan"].state.name == "FAIL" and "nan" in by_id["nan"].user_attrs[FAIL_REASON]
    assert by_id["err"].state.name == "RUNNING"  # open until the end: a resume may retry it
    s.on_trial_complete("done", result(3, 1.0))  # told twice: no error, no change
    assert study(folder).trials[by_id["done"].number].value == 7.0
    s.finalize()
    err = study(folder).trials[by_id["err"].number]
    assert err.state.name == "FAIL" and "out of memory" in err.user_attrs[FAIL_REASON]
    assert not [t for t in study(folder).trials if t.state.name == "RUNNING"]


def test_an_errored_trial_retried_on_resume_is_told_its_final_result(folder, tmp_path):
    s = searcher(folder)
    s.suggest("a")
    s.on_trial_complete("a", error=True)  # no finalize: the search was killed before it ended
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    again = searcher(folder, enqueue=False)  # as Tune unpickles it: the study already exists
    again.restore(str(path))
    again.on_trial_complete("a", result(3, 5.0))
    t = study(folder).trials[0]
    assert t.state.name == "COMPLETE" and t.value == 5.0


def test_a_searcher_state_cut_by_a_kill_is_rebuilt_from_the_study_and_tunes_own_state(folder, tmp_path):
    """Tune copies searcher-state-*.pkl to the experiment storage without an atomic rename; a kill
    during the copy left it empty, and the resumed search restarted from nothing and hung."""
    s = searcher(folder)
    s.suggest("done")
    s.on_trial_complete("done", result(3, 5.0))
    s.suggest("running")
    s.suggest("errored")
    s.on_trial_complete("errored", error=True)
    s.note_error("errored", "the trial errored: RuntimeError: boom")
    unrecorded = s.suggest("unrecorded")  # asked after Tune's last snapshot
    tune = tmp_path / "driver_artifacts"
    tune.mkdir()
    (tune / "searcher-state-x.pkl").write_bytes(b"")
    from ray.tune.experiment import Trial

    (tune / "experiment_state-x.json").write_text(json.dumps(  # as Tune writes it: (json state, metadata)
        {"trial_data": [Trial("t", trial_id=tid, stub=True).get_json_state()
                        for tid in ("done", "running", "errored")]}))
    again = searcher(folder, enqueue=False)  # as Tune builds it on resume: the study already exists
    again.restore(str(tune / "searcher-state-x.pkl"))
    assert set(again._ot_trials) == {"done", "running", "errored"}
    assert again._errored == {"errored": "the trial errored: RuntimeError: boom"}
    assert again._orphans == [unrecorded["study_trial"]]  # re-run with its own parameters
    again.on_trial_complete("running", result(3, 4.0))
    again.on_trial_complete("errored", result(3, 6.0))  # retried by the resume: told its result
    by_id = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study(folder).trials if TUNE_TRIAL_ID in t.user_attrs}
    assert by_id["running"].state.name == by_id["errored"].state.name == "COMPLETE"
    assert by_id["done"].value == 5.0


def test_a_trial_in_the_searcher_state_but_not_in_tunes_is_run_again(folder, tmp_path):
    """Tune writes searcher-state and experiment_state one after the other; a kill in between left
    a suggested trial Tune never ran, RUNNING in the study for ever (seen in the S3 resume test)."""
    from ray.tune.experiment import Trial

    s = searcher(folder)
    s.suggest("a")
    late = s.suggest("b")
    tune = tmp_path / "driver_artifacts"
    tune.mkdir()
    s.save(str(tune / "searcher-state-x.pkl"))  # knows a and b ...
    (tune / "experiment_state-x.json").write_text(json.dumps(  # ... Tune's own snapshot only a
        {"trial_data": [Trial("t", trial_id="a", stub=True).get_json_state()]}))
    restored = searcher(folder, enqueue=False)
    restored.restore(str(tune / "searcher-state-x.pkl"))
    assert set(restored._ot_trials) == {"a"} and restored._orphans == [late["study_trial"]]
    again = restored.suggest("c")
    assert again["study_trial"] == late["study_trial"]  # the study trial runs, under Tune's new id


def _generator(s, max_concurrent=1):
    from search.tuner import KeepTellingLimiter, ReconcilingSearchGenerator

    g = ReconcilingSearchGenerator(KeepTellingLimiter(s, max_concurrent=max_concurrent))
    g._total_samples = 4
    return g


def _saved(generator, tmp_path) -> Path:
    """Save ``generator``'s state (and its searcher's) as Tune does, in a driver folder."""
    tune = tmp_path / "driver_artifacts"
    tune.mkdir(exist_ok=True)
    generator.save_to_dir(str(tune), "x")
    return tune


def _tune_snapshot(folder: Path, statuses: dict[str, str]) -> None:
    """An experiment_state file in ``folder`` in Tune's format, holding ``statuses``' trials."""
    from ray.tune.experiment import Trial

    snapshot = []
    for tid, status in statuses.items():
        t = Trial("t", trial_id=tid, stub=True)
        t.status = status
        snapshot.append(t.get_json_state())
    (folder / "experiment_state-x.json").write_text(json.dumps({"trial_data": snapshot}))


def test_a_restored_limiter_holds_slots_for_exactly_the_trials_tune_will_run(folder, tmp_path):
    """Tune uploads its experiment state and the searcher's one after the other; resumed from a
    newer searcher state, a trial suggested after Tune's snapshot held its slot for ever: with one
    trial at a time, the resumed search waited for ever (CI, resume on a new head from S3). The
    restore counts and holds slots for Tune's trials, the paused one is paused again by the
    scheduler, and the lost trial's study trial runs again."""
    first = _generator(searcher(folder))
    suggested = {}
    for tid in ("done", "paused", "lost"):  # done ends, paused gives its slot to lost
        suggested[tid] = first.searcher.suggest(tid)
        assert suggested[tid] is not None
        first._counter += 1
        if tid == "done":
            first.searcher.on_trial_complete("done", result(3, 5.0))
        if tid == "paused":
            first.searcher.release_slot("paused")
    tune = _saved(first, tmp_path)
    _tune_snapshot(tune, {"done": "TERMINATED", "paused": "PAUSED"})  # Tune's snapshot: before lost
    again = _generator(searcher(folder, enqueue=False))
    again.restore_from_dir(str(tune))
    limiter = again.searcher
    assert again._counter == 2 and limiter.live_trials == {"paused"} and limiter.paused == set()
    sched = defer_asha()  # Tune requeues the paused trial PENDING; the scheduler pauses it again
    sched.deferred["paused"] = {"epoch": 2, "by": "done", "err": 5.0}
    restored = _live("paused", "PENDING", n_unfrozen="all", head="mlp")
    restored.last_result = {"epoch": 2, "err": 5.0}
    sched.on_trial_add(_controller(limiter, restored), restored)
    assert restored.status == "PAUSED" and limiter.live_trials == set() and limiter.paused == {"paused"}
    suggestion = limiter.suggest("next")  # the slot is free again, for the lost study trial
    assert suggestion is not None and suggestion["study_trial"] == suggested["lost"]["study_trial"]


def test_a_restored_limiter_older_than_tunes_snapshot_holds_slots_for_its_running_trials(folder, tmp_path):
    """The other way round: a trial that ended since the limiter's state frees its slot, and the
    running and errored ones (--resume runs errored trials again) hold one; a trial paused in the
    limiter's state holds one too, until the scheduler pauses it again (the test above)."""
    first = _generator(searcher(folder), max_concurrent=4)
    for tid in ("ended", "paused"):
        first.searcher.suggest(tid)
    first.searcher.release_slot("paused")
    tune = _saved(first, tmp_path)
    _tune_snapshot(tune, {"ended": "TERMINATED", "paused": "PENDING", "running": "RUNNING", "errored": "ERROR"})
    again = _generator(searcher(folder, enqueue=False), max_concurrent=4)
    again.restore_from_dir(str(tune))
    assert again.searcher.live_trials == {"paused", "running", "errored"} and again.searcher.paused == set()
    assert again.searcher.num_unfinished_live_trials == 3 and again._counter == 4


def test_a_searcher_state_older_than_tunes_snapshot_keeps_the_trials_only_tune_recorded(folder, tmp_path):
    """Tune's snapshot may be the newer file: a trial it holds, unknown to the restored searcher,
    had its results dropped and its study trial trained again under the next suggestion, while an
    enqueued cell never ran. The trial is found in the study by its tag."""
    first = _generator(searcher(folder), max_concurrent=4)
    first.searcher.suggest("done")
    first.searcher.on_trial_complete("done", result(3, 5.0))
    tune = _saved(first, tmp_path)  # the searcher's state, before "late" ...
    late = first.searcher.suggest("late")
    _tune_snapshot(tune, {"done": "TERMINATED", "late": "RUNNING"})  # ... Tune's snapshot, after
    again = _generator(searcher(folder, enqueue=False), max_concurrent=4)
    again.restore_from_dir(str(tune))
    assert again.searcher.searcher._orphans == []
    again.searcher.on_trial_result("late", result(1, 6.0))
    again.searcher.on_trial_complete("late", result(3, 4.0))
    nxt = again.searcher.suggest("next")
    assert nxt["study_trial"] != late["study_trial"]
    by_number = {t.number: t for t in study(folder).trials}
    assert by_number[late["study_trial"]].state.name == "COMPLETE" and by_number[late["study_trial"]].value == 4.0
    assert by_number[late["study_trial"]].user_attrs["tune_trial_id"] == "late"


def test_multi_objective_best_trials_are_only_complete_ones(folder):
    s = searcher(folder, multi=True)
    for tid, err, epochs in (("full", 8.0, 3), ("early", 2.0, 1), ("other", 9.0, 3)):
        s.suggest(tid)
        s.on_trial_result(tid, result(epochs, err))
        s.on_trial_complete(tid, result(epochs, err))
    best = {t.user_attrs[TUNE_TRIAL_ID] for t in study(folder).best_trials}
    assert best == {"full"}  # the 1-epoch 2.0 px is PRUNED, never on the study's front


def test_restore_on_a_new_head_reattaches_and_reuses_orphans(folder, tmp_path_factory):
    import pickle
    import shutil

    s = searcher(folder)
    first = s.suggest("a")
    path = tmp_path_factory.mktemp("tune") / "searcher.pkl"
    s.save(str(path))  # Tune's snapshot knows trial a ...
    pickled = pickle.dumps(s)  # (and tuner.pkl holds the searcher itself)
    orphan = s.suggest("b")  # ... but not b: killed before the next snapshot
    head2 = tmp_path_factory.mktemp("head2")  # a new head: another folder, the old one gone
    shutil.copy(folder / "optuna.db", head2 / "optuna.db")
    shutil.rmtree(folder)
    journal.set_folder(head2)
    restored = pickle.loads(pickled)  # no storage in the pickle: nothing tries the old head's path
    restored.restore(str(path))
    assert restored._orphans == [orphan["study_trial"]]
    again = restored.suggest("c")  # the orphan's study trial is re-run with its own parameters
    assert again["study_trial"] == orphan["study_trial"]
    assert {k: v for k, v in again.items() if k != "study_trial"} == \
        {k: v for k, v in orphan.items() if k != "study_trial"}
    st = optuna.load_study(study_name="s", storage=study_url(head2))
    started = [t for t in st.trials if t.state.name != "WAITING"]
    assert len(started) == 2 and first["study_trial"] != again["study_trial"]
    attrs = {t.number: t.user_attrs[TUNE_TRIAL_ID] for t in started}
    assert attrs[again["study_trial"]] == "c"


def test_a_trial_finished_after_tunes_last_snapshot_is_reopened_and_run_again(folder, tmp_path):
    s = searcher(folder)
    s.suggest("a")
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    late = s.suggest("b")  # Tune's snapshot never knew b, though the study was told its end
    s.on_trial_result("b", result(1, 5.0))
    s.on_trial_complete("b", result(3, 4.0))
    restored = searcher(folder, enqueue=False)
    restored.restore(str(path))
    assert restored._orphans == [late["study_trial"]]
    t = study(folder).trials[late["study_trial"]]
    assert t.state.name == "RUNNING" and t.values is None  # it runs again, once, under a new Tune id


# --- stratified ASHA ---------------------------------------------------------------------------------

def trial(tid, **config):
    return SimpleNamespace(trial_id=tid, config=config, status="RUNNING", last_result={})


def asha(cost=None):
    return StratifiedASHA(("n_unfrozen", "head"), cost=cost, time_attr="epoch", metric="err", mode="min", max_t=4,
                          grace_period=1, reduction_factor=2)


def pareto_asha():  # --scheduler asha-pareto
    return asha("trainable_params")


def test_asha_compares_only_within_a_cell(folder):
    sched = asha()
    t = {"mlp-a": trial("mlp-a", n_unfrozen=2, head="mlp"), "mlp-b": trial("mlp-b", n_unfrozen=2, head="mlp"),
         "gcn-a": trial("gcn-a", n_unfrozen=2, head="gcn"), "gcn-b": trial("gcn-b", n_unfrozen=2, head="gcn")}
    for x in t.values():
        sched.on_trial_add(None, x)
    decide = lambda name, err: sched.on_trial_result(None, t[name], {"epoch": 1, "err": err})  # noqa: E731
    assert decide("mlp-a", 2.0) == TrialScheduler.CONTINUE
    assert decide("mlp-b", 5.0) == TrialScheduler.STOP  # worse than its own cell
    assert decide("gcn-a", 9.0) == TrialScheduler.CONTINUE  # far worse than the MLPs, but meets GCNs only
    assert decide("gcn-b", 8.0) == TrialScheduler.CONTINUE
    assert sched.stopped == {"mlp-b": 1} and set(sched.by_stratum) == {"n_unfrozen=2 head=mlp",
                                                                       "n_unfrozen=2 head=gcn"}


def _pareto_trials(sched, **cells):
    t = {name: trial(name, n_unfrozen=k, head="mlp") for name, k in cells.items()}
    for x in t.values():
        sched.on_trial_add(None, x)
    return t


def test_from_the_second_rung_a_trial_dominated_by_a_cheaper_one_is_stopped(folder):
    sched = pareto_asha()
    t = _pareto_trials(sched, frozen=0, full="all", full_good="all", frozen_late=0)
    decide = lambda name, epoch, err, params: sched.on_trial_result(  # noqa: E731
        None, t[name], {"epoch": epoch, "err": err, "trainable_params": params})
    assert decide("frozen", 1, 5.0, 100) == TrialScheduler.CONTINUE
    assert decide("full", 1, 6.0, 900) == TrialScheduler.CONTINUE  # first rung: judged in its cell only
    assert decide("full_good", 1, 5.5, 900) == TrialScheduler.CONTINUE  # better than its cell's 6.0
    assert decide("frozen", 2, 4.0, 100) == TrialScheduler.CONTINUE
    assert decide("full", 2, 4.5, 900) == TrialScheduler.STOP  # more parameters, higher error: dominated
    assert decide("full_good", 2, 3.0, 900) == TrialScheduler.CONTINUE  # more parameters, but better
    assert decide("frozen_late", 1, 5.5, 100) == TrialScheduler.STOP  # (ASHA in its own cell)
    assert sched.dominated == {"full": {"epoch": 2, "by": "frozen"}}
    assert sched.stopped == {"full": 2, "frozen_late": 1}
    decide("full_good", 4, 9.0, 900)  # at max_t the trial ends: never a stop
    assert "full_good" not in sched.stopped and "full_good" not in sched.dominated
    saved = json.loads((folder / journal.SCHEDULER_FILE).read_text())
    assert saved["dominated"] == sched.dominated and saved["pareto_rungs"]["2"]["frozen"] == [100.0, 4.0]


def test_a_cheaper_trial_is_never_stopped_by_a_costlier_one_and_ties_in_cost_do_not_dominate(folder):
    sched = pareto_asha()
    t = _pareto_trials(sched, full="all", frozen=0, frozen_b=0)
    for name in t:
        sched.on_trial_result(None, t[name], {"epoch": 1, "err": 5.0, "trainable_params": 10})
    assert sched.on_trial_result(None, t["full"], {"epoch": 2, "err": 1.0, "trainable_params": 900}) == \
        TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t["frozen"], {"epoch": 2, "err": 8.0, "trainable_params": 100}) == \
        TrialScheduler.CONTINUE  # far worse than full fine-tuning, but the cheapest: on the front
    assert sched.on_trial_result(None, t["frozen_b"], {"epoch": 2, "err": 7.0, "trainable_params": 100}) == \
        TrialScheduler.CONTINUE  # same cost as "frozen" and better
    assert sched.dominated == {}


def test_pareto_stops_judge_across_cells_only_and_count_every_result_at_a_rung(folder):
    """Head width changes the size within a cell: there ASHA alone judges. A result ASHA stopped in
    its own cell is still a real error at that epoch, and may dominate another cell's trial."""
    sched = pareto_asha()
    cells = {"small": 2, "bad": 2, "wide": 2, "k1_wide": 1, "k1_narrow": 1, "full": "all"}
    t = {name: trial(name, n_unfrozen=k, head="mlp") for name, k in cells.items()}
    for x in t.values():
        sched.on_trial_add(None, x)
    decide = lambda name, epoch, err, params: sched.on_trial_result(  # noqa: E731
        None, t[name], {"epoch": epoch, "err": err, "trainable_params": params})
    cost = {"small": 400, "bad": 450, "wide": 500, "k1_wide": 1000, "k1_narrow": 200, "full": 900}
    for name in t:
        decide(name, 1, 5.0, cost[name])
    for name, err in (("small", 4.0), ("bad", 6.0)):
        decide(name, 2, err, cost[name])
    assert decide("wide", 2, 4.5, 500) == TrialScheduler.CONTINUE  # "small" is narrower and better: same cell
    assert decide("k1_wide", 2, 3.0, 1000) == TrialScheduler.CONTINUE
    assert decide("k1_narrow", 2, 3.2, 200) == TrialScheduler.STOP and "k1_narrow" not in sched.dominated  # ASHA
    assert decide("full", 2, 3.25, 900) == TrialScheduler.STOP and sched.dominated["full"]["by"] == "k1_narrow"


def test_a_trial_that_diverged_or_errored_dominates_no_later_arrival(folder):
    sched = pareto_asha()
    t = _pareto_trials(sched, nan=0, err=0, dear="all")
    for name, params in (("nan", 100), ("err", 100), ("dear", 900)):
        sched.on_trial_result(None, t[name], {"epoch": 1, "err": 5.0, "trainable_params": params})
    for name in ("nan", "err"):
        sched.on_trial_result(None, t[name], {"epoch": 2, "err": 1.0, "trainable_params": 100})
    sched.on_trial_result(None, t["nan"], {"epoch": 3, "err": math.nan, "trainable_params": 100})
    sched.on_trial_error(None, t["err"])
    assert sched.on_trial_result(None, t["dear"], {"epoch": 2, "err": 4.0, "trainable_params": 900}) == \
        TrialScheduler.CONTINUE and sched.dominated == {}


def test_pareto_stops_survive_a_restart_and_can_be_turned_off_or_maximised(folder):
    first = pareto_asha()
    a = _pareto_trials(first, a=0)["a"]
    first.on_trial_result(None, a, {"epoch": 1, "err": 5.0, "trainable_params": 100})
    first.on_trial_result(None, a, {"epoch": 2, "err": 4.0, "trainable_params": 100})
    second = pareto_asha()  # as Tune unpickles it on resume: the rung history comes from scheduler.json
    b = _pareto_trials(second, b="all")["b"]
    second.on_trial_result(None, b, {"epoch": 1, "err": 5.0, "trainable_params": 900})
    assert second.on_trial_result(None, b, {"epoch": 2, "err": 4.5, "trainable_params": 900}) == TrialScheduler.STOP
    assert second.dominated["b"] == {"epoch": 2, "by": "a"}

    journal._STATE.update(folder=None)  # no persistence below: fresh schedulers
    off = asha()  # --scheduler asha-cells: ASHA within each cell only
    up = StratifiedASHA(("n_unfrozen", "head"), cost="trainable_params", time_attr="epoch", metric="dice",
                        mode="max", max_t=4, grace_period=1, reduction_factor=2)
    for sched, key, cheap, dear in ((off, "err", 4.0, 4.5), (up, "dice", 0.8, 0.7)):
        t = _pareto_trials(sched, cheap=0, dear="all")
        for name, params, value in (("cheap", 100, cheap), ("dear", 900, dear)):
            sched.on_trial_result(None, t[name], {"epoch": 1, key: value, "trainable_params": params})
        sched.on_trial_result(None, t["cheap"], {"epoch": 2, key: cheap, "trainable_params": 100})
        sched._last = sched.on_trial_result(None, t["dear"], {"epoch": 2, key: dear, "trainable_params": 900})
    assert off._last == TrialScheduler.CONTINUE and off.dominated == {}
    assert up._last == TrialScheduler.STOP and up.dominated["dear"]["by"] == "cheap"  # lower Dice, more params


class _Searcher(Searcher):  # the least a ConcurrencyLimiter wraps
    def __init__(self):
        super().__init__()
        self.told = []

    def suggest(self, trial_id):
        return {"x": 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append(trial_id)


def _controller(limiter, *trials):
    return SimpleNamespace(search_alg=SimpleNamespace(searcher=limiter), get_trials=lambda: list(trials))


def _live(tid, status, **config):
    t = trial(tid, **config)
    t.status, t.PENDING, t.PAUSED = status, "PENDING", "PAUSED"
    t.set_status = lambda new: setattr(t, "status", new)
    return t


def defer_asha(max_t=4):  # --scheduler asha (the default)
    return StratifiedASHA(("n_unfrozen", "head"), cost="trainable_params", defer=True, time_attr="epoch",
                          metric="err", mode="min", max_t=max_t, grace_period=1, reduction_factor=2)


def test_a_dominated_trial_is_deferred_once_and_resumes_after_every_trial_not_yet_started(folder):
    """--scheduler asha (default): from ASHA's second rung, a trial dominated by a cheaper trial of
    another cell is paused, not stopped; its slot goes to the next trial, and it resumes (knowing
    the epochs Tune holds) once no trial waits to start and a slot is free, then runs to the end."""
    from search.tuner import KeepTellingLimiter

    sched = defer_asha()
    limiter = KeepTellingLimiter(_Searcher(), max_concurrent=1)
    frozen, full = _live("frozen", "RUNNING", n_unfrozen=0, head="mlp"), _live("full", "RUNNING", n_unfrozen="all",
                                                                                head="mlp")
    nxt = _live("next", "PENDING", n_unfrozen=1, head="mlp")
    tc = _controller(limiter, frozen, full, nxt)
    for x in (frozen, full, nxt):
        sched.on_trial_add(tc, x)
    limiter.suggest("full")
    decide = lambda t, epoch, err, params: sched.on_trial_result(  # noqa: E731
        tc, t, {"epoch": epoch, "err": err, "trainable_params": params})
    assert decide(frozen, 1, 5.0, 100) == decide(frozen, 2, 4.0, 100) == TrialScheduler.CONTINUE
    assert decide(full, 1, 6.0, 900) == TrialScheduler.CONTINUE  # first rung: judged in its cell only
    assert decide(full, 2, 4.5, 900) == TrialScheduler.PAUSE
    assert sched.deferred == {"full": {"epoch": 2, "by": "frozen", "err": 4.5}}
    assert sched.stopped == {} and sched.dominated == {}
    assert full.config["tune_epoch"] == 2 and limiter.live_trials == set() and limiter.paused == {"full"}
    assert limiter.suggest("next") is not None  # the paused trial's slot went to the next trial
    full.status = "PAUSED"
    assert sched.choose_trial_to_run(tc) is nxt  # trials not yet started go first
    nxt.status = "RUNNING"
    assert sched.choose_trial_to_run(tc) is None  # the one slot is taken: the paused trial waits
    limiter.on_trial_complete("next", {"err": 5.5})
    nxt.status = "TERMINATED"
    full.last_result = {"epoch": 2, "err": 4.5}
    assert sched.choose_trial_to_run(tc) is full and limiter.live_trials == {"full"} and limiter.paused == set()
    full.status = "RUNNING"
    assert decide(full, 4, 3.0, 900) == TrialScheduler.STOP  # at max_t the trial ends: never a stop
    assert "full" not in sched.stopped
    limiter.on_trial_complete("full", {"err": 3.0})
    assert limiter.searcher.told == ["next", "full"]  # the searcher hears of the resumed trial's end
    saved = json.loads((folder / journal.SCHEDULER_FILE).read_text())
    assert saved["deferred"] == sched.deferred


def test_a_paused_trial_restored_after_a_kill_waits_paused_without_a_slot(folder):
    """Tune requeues every unfinished trial PENDING on --resume: a paused one would then start
    first and outside the concurrency limit."""
    from search.tuner import KeepTellingLimiter

    first = defer_asha()
    frozen, full = _live("frozen", "RUNNING", n_unfrozen=0, head="mlp"), _live("full", "RUNNING", n_unfrozen="all",
                                                                                head="mlp")
    tc = _controller(KeepTellingLimiter(_Searcher(), max_concurrent=1), frozen, full,
                     _live("next", "PENDING", n_unfrozen=1, head="mlp"))
    for x in (frozen, full):
        first.on_trial_add(tc, x)
    for epoch, err in ((1, 5.0), (2, 4.0)):
        first.on_trial_result(tc, frozen, {"epoch": epoch, "err": err, "trainable_params": 100})
        assert first.on_trial_result(tc, full, {"epoch": epoch, "err": err + 1, "trainable_params": 900}) == \
            (TrialScheduler.PAUSE if epoch == 2 else TrialScheduler.CONTINUE)
    # killed; on --resume Tune unpickles a fresh scheduler and a limiter that still counts "full" live
    limiter = KeepTellingLimiter(_Searcher(), max_concurrent=1)
    limiter.suggest("full")
    restored = _live("full", "PENDING", n_unfrozen="all", head="mlp")
    restored.last_result = {"epoch": 2, "err": 5.0}
    again = defer_asha()
    again.on_trial_add(_controller(limiter, restored), restored)
    assert again.deferred == first.deferred and restored.status == "PAUSED"
    assert restored.config["tune_epoch"] == 2 and limiter.live_trials == set() and limiter.paused == {"full"}
    resumed = _live("gone_on", "PENDING", n_unfrozen="all", head="mlp")  # resumed before the kill: runs on
    resumed.last_result = {"epoch": 3, "err": 4.0}
    again.deferred["gone_on"] = {"epoch": 2, "by": "frozen", "err": 5.0}
    again.on_trial_add(_controller(limiter, resumed), resumed)
    assert resumed.status == "PENDING"


def test_no_pause_when_no_trial_waits_to_start(folder):
    """Pausing the last trials would only cost each a restart: nothing else could use the slot."""
    sched = defer_asha()
    frozen, full = _live("frozen", "TERMINATED", n_unfrozen=0, head="mlp"), _live("full", "RUNNING",
                                                                                   n_unfrozen="all", head="mlp")
    tc = SimpleNamespace(search_alg=SimpleNamespace(searcher=None, is_finished=lambda: True),
                         get_trials=lambda: [frozen, full])
    for x in (frozen, full):
        sched.on_trial_add(tc, x)
    for epoch, err in ((1, 5.0), (2, 4.0)):
        sched.on_trial_result(tc, frozen, {"epoch": epoch, "err": err, "trainable_params": 100})
        assert sched.on_trial_result(tc, full, {"epoch": epoch, "err": err + 1, "trainable_params": 900}) == \
            TrialScheduler.CONTINUE
    assert sched.deferred == {}


def test_deferred_trials_resume_furthest_then_best_first_and_each_is_deferred_once(folder):
    sched = defer_asha(max_t=8)  # rungs at epochs 1, 2 and 4
    cost = {"frozen": 100, "k1": 200, "k2": 300, "full": 900, "late": 950}
    t = {name: _live(name, "RUNNING", n_unfrozen=k, head=h) for name, k, h in
         (("frozen", 0, "mlp"), ("k1", 1, "mlp"), ("k2", 2, "mlp"), ("full", "all", "mlp"), ("late", "all", "gcn"))}
    tc = _controller(None, *t.values(), _live("waiting", "PENDING", n_unfrozen=0, head="gcn"))
    for x in t.values():
        sched.on_trial_add(tc, x)
    decide = lambda name, epoch, err: sched.on_trial_result(  # noqa: E731
        tc, t[name], {"epoch": epoch, "err": err, "trainable_params": cost[name]})
    for epoch, err in ((1, 9.0), (2, 3.0), (4, 2.0)):
        decide("frozen", epoch, err)
    for name, err in (("k1", 6.0), ("k2", 4.0), ("full", 5.0)):
        decide(name, 1, 9.0)
        assert decide(name, 2, err) == TrialScheduler.PAUSE
        t[name].status = "PAUSED"
    for epoch, err in ((1, 9.0), (2, 2.5)):
        assert decide("late", epoch, err) == TrialScheduler.CONTINUE  # better than frozen at epoch 2
    assert decide("late", 4, 7.0) == TrialScheduler.PAUSE  # dominated at the third rung
    t["late"].status, t["frozen"].status = "PAUSED", "TERMINATED"
    tc.get_trials = lambda: list(t.values())  # nothing waits to start any more
    order = []
    while (nxt := sched.choose_trial_to_run(tc)) is not None:
        order.append(nxt.trial_id)
        nxt.status = "RUNNING"
        if nxt.trial_id != "late":
            decide(nxt.trial_id, 3, 9.9)
            assert decide(nxt.trial_id, 4, 9.9) == TrialScheduler.CONTINUE  # dominated again: deferred once only
        nxt.status = "TERMINATED"
    assert order == ["late", "k2", "full", "k1"]  # the furthest along first, then the lowest error at its rung


def test_a_cheaper_or_better_trial_is_never_deferred(folder):
    sched = defer_asha()
    t = _pareto_trials(sched, full="all", frozen=0, k1=1)
    for name, params in (("full", 900), ("frozen", 100), ("k1", 300)):
        sched.on_trial_result(None, t[name], {"epoch": 1, "err": 9.0, "trainable_params": params})
    assert sched.on_trial_result(None, t["full"], {"epoch": 2, "err": 5.0, "trainable_params": 900}) == \
        TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, t["frozen"], {"epoch": 2, "err": 8.0, "trainable_params": 100}) == \
        TrialScheduler.CONTINUE  # worse than full fine-tuning but cheaper
    assert sched.on_trial_result(None, t["k1"], {"epoch": 2, "err": 4.0, "trainable_params": 300}) == \
        TrialScheduler.CONTINUE  # costlier than frozen but better
    assert sched.deferred == {}


@pytest.mark.parametrize("flag,cost,defer", [("asha", "trainable_params", True), ("asha-cells", None, False),
                                              ("asha-pareto", "trainable_params", False)])
def test_the_scheduler_flag_chooses_pareto_deferral_or_stops(flag, cost, defer):
    from search.run import parser
    from search.tuner import make_scheduler

    args = parser().parse_args(["--scheduler", flag])
    sched = make_scheduler({"scheduler": args.scheduler, "space": "smoke", "max_epochs": 4, "grace_period": 1,
                            "reduction_factor": 2})
    assert isinstance(sched, StratifiedASHA) and sched.cost == cost and sched.defer == defer


def test_a_scheduler_pickled_before_pareto_stops_existed_resumes_without_them(folder):
    import pickle

    old = asha()
    for name in ("cost", "at_rung", "dominated", "defer", "deferred"):  # what an older EchoTune pickled lacked
        old.__dict__.pop(name, None)
    sched = pickle.loads(pickle.dumps(old))
    t = _pareto_trials(sched, cheap=0, dear="all")
    for epoch in (1, 2):
        for name, params, err in (("cheap", 100, 4.0), ("dear", 900, 5.0)):
            decision = sched.on_trial_result(None, t[name], {"epoch": epoch, "err": err, "trainable_params": params})
    assert decision == TrialScheduler.CONTINUE and sched.cost is None and sched.dominated == sched.deferred == {}
    assert "dominated" not in sched.debug_string()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_metric_stops_at_once(folder, bad):
    sched = asha()
    x = trial("x", n_unfrozen=0, head="mlp")
    sched.on_trial_add(None, x)
    assert sched.on_trial_result(None, x, {"epoch": 1, "err": bad}) == TrialScheduler.STOP
    y = trial("y", n_unfrozen=0, head="mlp")
    sched.on_trial_add(None, y)
    assert sched.on_trial_result(None, y, {"epoch": 1, "err": 3.0, "non_finite": "train_loss is nan"}) == \
        TrialScheduler.STOP
    assert sched.n_non_finite == 2


def test_reduction_factor_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        StratifiedASHA(("head",), metric="err", mode="min", max_t=4, reduction_factor=1)


def test_rungs_and_stops_survive_a_restart(folder):
    """A fresh scheduler (as Tune unpickles it on resume) reloads scheduler.json: the rung history
    judges new arrivals, and a trial stopped before the kill is stopped again, not restarted."""
    first = asha()
    a, b = trial("a", n_unfrozen=0, head="mlp"), trial("b", n_unfrozen=0, head="mlp")
    for x in (a, b):
        first.on_trial_add(None, x)
    first.on_trial_result(None, a, {"epoch": 1, "err": 2.0})
    assert first.on_trial_result(None, b, {"epoch": 1, "err": 5.0}) == TrialScheduler.STOP
    assert (folder / journal.SCHEDULER_FILE).is_file()

    second = asha()
    c = trial("c", n_unfrozen=0, head="mlp")
    second.on_trial_add(None, c)
    assert second.on_trial_result(None, c, {"epoch": 1, "err": 4.0}) == TrialScheduler.STOP  # judged against a

    b_again = trial("b", n_unfrozen=0, head="mlp")
    b_again.status = b_again.PENDING = "PENDING"
    stopped = []

    def stop(t):
        stopped.append(t.trial_id)
        t.status = "TERMINATED"

    controller = SimpleNamespace(get_trials=lambda: [b_again], stop_trial=stop)
    assert second.choose_trial_to_run(controller) is None and stopped == ["b"]


def test_a_restored_trial_gets_its_logs_back_and_learns_how_many_epochs_tune_holds(folder, tmp_path):
    """Tune restores a trial's result.json only when it has a Tune checkpoint; ours get it back from
    storage as soon as they are added (Tune may start them without asking the scheduler)."""
    x = _stored_trial(tmp_path, "x", [1, 2, 3], tail='{"epoch": 4, "er', n_unfrozen=0, head="mlp")  # a kill mid-line
    x.last_result = {"epoch": 2, "err": 7.0}  # Tune's snapshot lags its stored results by one epoch
    sched = asha()
    sched.on_trial_add(None, x)
    assert x.config["tune_epoch"] == 3
    lines = [json.dumps({"epoch": e, "err": 9.0 - e}) for e in (1, 2, 3)]
    assert (Path(x.local_path) / "result.json").read_text() == "\n".join(lines) + "\n"  # complete lines only
    fresh = trial("y", n_unfrozen=0, head="mlp")
    sched.on_trial_add(None, fresh)
    assert fresh.config["tune_epoch"] == 0


def _stored_trial(tmp_path, tid, epochs, tail="", **config):
    """A restored trial whose storage holds result.json lines for ``epochs`` (then ``tail``)."""
    import pyarrow.fs

    stored, local = tmp_path / "storage" / f"trial_{tid}", tmp_path / "staging" / f"trial_{tid}"
    stored.mkdir(parents=True)
    (stored / "result.json").write_text("".join(json.dumps({"epoch": e, "err": 9.0 - e}) + "\n" for e in epochs)
                                        + tail)
    t = _live(tid, "PENDING", **config)
    t.local_path = str(local)
    t.init_local_path = lambda: local.mkdir(parents=True, exist_ok=True)
    t.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(stored))
    t.update_last_result = lambda r: setattr(t, "last_result", r)
    return t


def test_a_paused_trial_whose_logs_outran_tunes_snapshot_resumes_after_its_logged_epochs(folder, tmp_path):
    """Tune's snapshot may hold no result of a trial whose stored logs (uploaded after it) hold
    epochs: seen in CI on a new head from S3, the resumed trial reported epoch 1 again and its
    TensorBoard curve read 1, 1, 2, 3. Both when Tune starts it and when the scheduler resumes it
    from its pause, it is told the epochs its logs hold."""
    from search.tuner import KeepTellingLimiter

    sched = defer_asha()
    sched.deferred["full"] = {"epoch": 2, "by": "frozen", "err": 5.0}
    limiter = KeepTellingLimiter(_Searcher(), max_concurrent=1)
    full = _stored_trial(tmp_path, "full", [1, 2], n_unfrozen="all", head="mlp")  # last_result: {}
    fresh = _stored_trial(tmp_path, "fresh", [1], n_unfrozen=0, head="mlp")
    tc = _controller(limiter, full, fresh)
    for t in (full, fresh):
        sched.on_trial_add(tc, t)
    assert fresh.config["tune_epoch"] == 1 and fresh.status == "PENDING"
    assert full.config["tune_epoch"] == 2 and full.status == "PAUSED"
    assert full.last_result["epoch"] == 2  # Tune holds what the logs hold
    fresh.status = "TERMINATED"
    full.config["tune_epoch"] = 0  # whatever was set before: the resume recomputes it
    assert sched.choose_trial_to_run(tc) is full and full.config["tune_epoch"] == 2
    # logs holding every epoch: the trial has nothing left to report and ends on its logged result
    # (not on a stale or empty one: the study would be told PRUNED, or get no metric at all)
    ended = _stored_trial(tmp_path, "ended", [1, 2, 3, 4], n_unfrozen=1, head="mlp")
    sched.on_trial_add(tc, ended)
    assert ended.config["tune_epoch"] == 4 and (ended.last_result["epoch"], ended.last_result["err"]) == (4, 5.0)
    assert ended.last_result["config"]["n_unfrozen"] == 1  # this head's config, not the logged one


def test_a_trial_stopped_for_nan_before_a_kill_is_failed_not_pruned_on_resume(folder):
    s = searcher(folder)
    s.suggest("n")
    first = asha()
    x = trial("n", n_unfrozen=0, head="mlp")
    first.on_trial_add(None, x)
    assert first.on_trial_result(None, x, {"epoch": 1, "err": math.nan}) == TrialScheduler.STOP
    # killed before Tune recorded the stop: the resumed search finds the trial PENDING
    second = asha()
    again = trial("n", n_unfrozen=0, head="mlp")
    again.status = again.PENDING = "PENDING"

    def stop(t):
        s.on_trial_complete(t.trial_id)  # what Tune's stop_trial tells the searcher for a PENDING trial
        t.status = "TERMINATED"

    controller = SimpleNamespace(get_trials=lambda: [again], stop_trial=stop)
    second.on_trial_add(controller, again)
    assert second.choose_trial_to_run(controller) is None
    (t,) = study(folder).trials[:1]
    assert t.state.name == "FAIL" and "err is not finite" in t.user_attrs[FAIL_REASON]


def test_a_resume_takes_the_storage_copies_only_when_the_storage_is_ahead(bucket, s3_endpoint, tmp_path,
                                                                          monkeypatch):
    """Row counts cannot order copies (a resume reopens study trials): a head that pushed the storage's
    newest state keeps its own copies, a new head takes the storage's, and a head that another head
    overtook takes the storage's even where its own hold more rows."""
    exp = f"{bucket}/exp"
    for key in ("folder", "journal"):  # Journal() registers itself as this process's active one
        monkeypatch.setitem(journal._STATE, key, journal._STATE[key])

    def state(n_stopped):
        return {"stopped": {f"t{i}": 1 for i in range(n_stopped)}, "strata": {}}

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    journal.write_json(a_dir / journal.SETTINGS_FILE, {"name": "exp"})
    journal.write_json(a_dir / journal.SCHEDULER_FILE, state(3))
    journal.Journal(a_dir, exp, s3_endpoint).push()
    # Head A resumes, and its own copy has fewer rows than the storage's (as after reopening trials).
    journal.write_json(a_dir / journal.SCHEDULER_FILE, state(1))
    assert journal.Journal(a_dir, exp, s3_endpoint).pull() == []
    assert len(json.loads((a_dir / journal.SCHEDULER_FILE).read_text())["stopped"]) == 1
    # A new head B (empty folder) takes everything, goes on and pushes.
    b = journal.Journal(b_dir, exp, s3_endpoint)
    assert sorted(b.pull()) == sorted([journal.SETTINGS_FILE, journal.SCHEDULER_FILE])
    journal.write_json(b_dir / journal.SCHEDULER_FILE, state(2))
    b.push()
    # Head A resumes again: the storage is ahead of what A last synced, so B's copy wins over A's bigger one.
    journal.write_json(a_dir / journal.SCHEDULER_FILE, state(5))
    assert journal.SCHEDULER_FILE in journal.Journal(a_dir, exp, s3_endpoint).pull()
    assert len(json.loads((a_dir / journal.SCHEDULER_FILE).read_text())["stopped"]) == 2
    assert journal.Journal(a_dir, exp, s3_endpoint).pull() == []  # and now A is level with the storage


def test_a_stop_lost_with_the_head_is_recorded_again_from_tunes_snapshot(folder):
    """Tune's snapshot reached the storage with a trial stopped at epoch 2 of 4, the scheduler state
    with that decision did not (the head died first): the restored scheduler records the stop."""
    restored = asha()
    t = trial("s", n_unfrozen=0, head="mlp")
    t.status, t.last_result = "TERMINATED", {"epoch": 2, "err": 3.0}
    restored.on_trial_add(None, t)
    finished = trial("f", n_unfrozen=0, head="mlp")
    finished.status, finished.last_result = "TERMINATED", {"epoch": 4, "err": 1.0}
    restored.on_trial_add(None, finished)
    assert restored.stopped == {"s": 2}
    assert json.loads((folder / journal.SCHEDULER_FILE).read_text())["stopped"] == {"s": 2}


def test_a_damaged_push_counter_falls_back_to_comparing_the_copies(bucket, s3_endpoint, tmp_path, monkeypatch):
    """journal.json in the storage is not JSON (or not ours): a resume neither crashes nor trusts it; it
    takes what the head lacks or holds less of, and the next push writes a valid counter again."""
    import s3fs

    exp = f"{bucket}/exp"
    for key in ("folder", "journal"):
        monkeypatch.setitem(journal._STATE, key, journal._STATE[key])
    head = tmp_path / "head"
    head.mkdir()
    journal.write_json(head / journal.SETTINGS_FILE, {"name": "exp"})
    journal.Journal(head, exp, s3_endpoint).push()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe_file(f"{exp}/{journal.GENERATION_FILE}", b"\x00 not json")
    new = journal.Journal(tmp_path / "new", exp, s3_endpoint)
    assert new.pull() == [journal.SETTINGS_FILE]
    new.push()
    assert json.loads(fs.cat_file(f"{exp}/{journal.GENERATION_FILE}"))["generation"] >= 1


def test_the_export_says_which_cheaper_trial_dominated_a_stopped_one(tmp_path):
    from search.pareto import export
    from tests.test_safety import fake_experiment, row

    folder = tmp_path / "dominated"
    fake_experiment(folder, {"cheap": [row(e, 9.0 - e, trainable_params=100) for e in (1, 2, 3, 4)],
                             "dear": [row(e, 9.5 - e, trainable_params=900) for e in (1, 2)],
                             "asha": [row(1, 12.0, trainable_params=100)]})
    (folder / journal.SCHEDULER_FILE).write_text(json.dumps({"stopped": {"dear": 2, "asha": 1},
                                                              "dominated": {"dear": {"epoch": 2, "by": "cheap"}}}))
    rows = {t["trial_id"]: t for t in export(folder)["trials"]}
    assert rows["dear"]["state"] == "PRUNED" and not rows["dear"]["infeasible"]
    assert rows["dear"]["reason"].startswith("dominated at epoch 2 by trial cheap")
    assert rows["asha"]["reason"] == "" and rows["cheap"]["reason"] == ""  # stopped in its cell; completed
    assert "dominated at epoch 2 by trial cheap" in (folder / "pareto.csv").read_text()
    for damaged in ('{"dominated": ', '{"dominated": ["dear"]}', '{"dominated": {"dear": {"epoch": 2}}}', '[1]'):
        (folder / journal.SCHEDULER_FILE).write_text(damaged)  # no explanation, still an export
        assert {t["trial_id"]: t["reason"] for t in export(folder)["trials"]}["dear"] == ""


def test_a_sampler_pickled_before_it_had_its_own_random_stream_still_samples():
    import pickle

    sampler, _ = make_sampler("tpe", 0, scientific=("head",), per_cell=2, num_samples=4)
    del sampler.__dict__["_random"]  # as an older EchoTune pickled it into tuner.pkl
    st = optuna.create_study(sampler=pickle.loads(pickle.dumps(sampler)))
    for i, head in enumerate(("mlp", "mlp", "mlp")):
        _ask(st, head, value=float(i))
    st.sampler.reseed_rng()
    assert len(st.trials) == 3 and all(t.state.name == "COMPLETE" for t in st.trials)


@pytest.mark.parametrize("cut", ["experiment_state", "search_gen_state", None])
def test_a_resume_from_a_cut_tune_state_file_is_refused_naming_it(tmp_path, cut):
    """Tune would log 'Failed to restore the run state', restart from nothing and wait forever."""
    from ray import cloudpickle
    from ray.tune.experiment import Trial

    from search.tuner import check_tune_state

    exp = tmp_path / "exp"
    exp.mkdir()
    files = {"experiment_state": json.dumps({"trial_data": [Trial("t", trial_id="a", stub=True).get_json_state()],
                                             "runner_data": {}}).encode(),
             "search_gen_state": cloudpickle.dumps({"counter": 1})}
    for name, data in files.items():
        (exp / f"{name}-2026-12-06_00-00-00.json").write_bytes(data[: len(data) // 2] if name == cut else data)
    settings = {"storage": str(tmp_path), "name": "exp"}
    if cut is None:
        check_tune_state(settings, None)
        return
    with pytest.raises(ValueError) as err:
        check_tune_state(settings, None)
    assert f"{cut}-2026-12-06_00-00-00.json is cut or damaged" in str(err.value) and "new --name" in str(err.value)


def test_an_experiment_pickled_with_the_bare_limiter_resumes_with_the_reconciling_generator(folder):
    """An experiment started before ReconcilingSearchGenerator holds the bare limiter in its
    tuner.pkl; Tune would wrap it in its own generator, which could wait for ever on a resume."""
    from ray import tune

    from search.tuner import KeepTellingLimiter, ReconcilingSearchGenerator, reconciling

    limiter = KeepTellingLimiter(_Searcher(), max_concurrent=1)
    old = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(search_alg=limiter, num_samples=2))
    reconciling(old)
    alg = old._local_tuner._tune_config.search_alg
    assert isinstance(alg, ReconcilingSearchGenerator) and alg.searcher is limiter
    reconciling(old)  # a new experiment's is left as it is
    assert old._local_tuner._tune_config.search_alg is alg


def test_a_stopped_trial_once_paused_is_stopped_again_on_resume_not_paused(folder):
    """Deferred at epoch 2, resumed, then stopped by its cell's ASHA at epoch 4: Tune's snapshot can
    lag the stop and hold the trial at epoch 2. It must be stopped again, not paused again and then
    resumed to train to max_t."""
    from search.tuner import KeepTellingLimiter

    sched = defer_asha(max_t=8)
    sched.deferred["t"] = {"epoch": 2, "by": "frozen", "err": 5.0}
    sched.stopped["t"] = 4
    limiter = KeepTellingLimiter(_Searcher(), max_concurrent=1)
    t = _live("t", "PENDING", n_unfrozen="all", head="mlp")
    t.last_result = {"epoch": 2, "err": 5.0}
    stopped = []
    tc = SimpleNamespace(search_alg=SimpleNamespace(searcher=limiter), get_trials=lambda: [t],
                         stop_trial=lambda x: stopped.append(x.trial_id))
    sched.on_trial_add(tc, t)
    assert t.status == "PENDING" and limiter.paused == set()
    sched.choose_trial_to_run(tc)
    assert stopped == ["t"]
    t.status = "PAUSED"  # paused again by an older EchoTune before this resume: stopped all the same
    stopped.clear()
    sched.choose_trial_to_run(tc)
    assert stopped == ["t"]


def test_a_restarted_trials_stored_tensorboard_steps_after_its_logs_are_dropped(folder, tmp_path):
    """A kill's upload can carry an event file ahead of the result.json beside it (seen in the S3
    new-head resume test: steps 1, 2, 2, 3): the steps the trial reports again are dropped from it."""
    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1), n_unfrozen=0, head="mlp")
    stored = Path(x.storage.trial_fs_path)
    _event_file(stored / "events.out.tfevents.0000000100.old", [1, 2])
    asha().on_trial_add(None, x)
    assert x.config["tune_epoch"] == 1
    acc = _curves(str(stored))
    assert [e.step for e in acc.Scalars("ray/tune/val_px_error")] == [1]


def test_a_restarted_trials_epochs_missing_from_its_stored_tensorboard_files_are_written_from_its_logs(
        folder, tmp_path):
    """A kill's upload can carry the result.json without the event file beside it (seen in the S3
    new-head resume test: steps 3 only, where the result.json held 1, 2, 3), or with part of it: the
    epochs the trial goes on from, and the tags an epoch lacks, are written from its logs, as Tune's
    TensorBoard logger writes a result."""
    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1, 2), n_unfrozen=0, head="mlp")
    stored = Path(x.storage.trial_fs_path)
    # epoch 1 only reached the storage, and of its tags only one: the upload was cut
    _event_file(stored / "events.out.tfevents.0000000100.old", [1], tags=("val_px_error",))
    asha().on_trial_add(None, x)
    assert x.config["tune_epoch"] == 2
    acc = _curves(str(stored))
    assert [(e.step, e.value) for e in acc.Scalars("ray/tune/val_px_error")] == [(1, 9.0), (2, 8.0)]
    assert [(e.step, e.value) for e in acc.Scalars("ray/tune/nested/a")] == [(1, 1.0), (2, 2.0)]
    assert [e.step for e in acc.Scalars("ray/tune/epoch")] == [1, 2]
    assert not {"ray/tune/timestamp", "ray/tune/config/lr", "ray/tune/hostname"} & set(acc.Tags()["scalars"])
    empty = _stored_trial(tmp_path / "again", "x", [])
    asha().on_trial_add(None, empty)  # nothing logged: nothing written
    assert not list(Path(empty.storage.trial_fs_path).glob("events.out.tfevents*"))


def test_a_restarted_trials_tensorboard_files_on_its_own_head_are_trimmed_and_not_written_again(folder, tmp_path):
    """Resumed on the same head, the trial's staging folder still holds an event file the kill kept
    from the storage: Tune's next sync uploads it, so it is trimmed too, and the epochs it holds
    are not written to the storage a second time."""
    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1, 2), n_unfrozen=0, head="mlp")
    x.init_local_path()
    _event_file(Path(x.local_path) / "events.out.tfevents.0000000100.head", [1, 2, 3])
    asha().on_trial_add(None, x)
    assert x.config["tune_epoch"] == 2
    assert not list(Path(x.storage.trial_fs_path).glob("events.out.tfevents*"))
    acc = _curves(str(x.local_path))
    assert [e.step for e in acc.Scalars("ray/tune/val_px_error")] == [1, 2]


@pytest.mark.parametrize("damage", ["cut", "corrupt", "not an event"])
def test_a_restarted_trials_cut_or_damaged_event_file_keeps_what_reads_and_the_logs_fill_the_rest(
        folder, tmp_path, damage):
    """A kill can cut an upload inside a record, and a bad copy can damage one: TensorBoard stops reading
    a file there. The file is rewritten to the records before the damage (no half record is left for a
    reader to wait on) and the epochs lost with the rest are written from the trial's logs. A whole
    record that is no event (TensorBoard's reader raises on it) is dropped alone."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1, 2), n_unfrozen=0, head="mlp")
    stored = Path(x.storage.trial_fs_path)
    events = stored / "events.out.tfevents.0000000100.old"
    _event_file(events, [1, 2])
    data = bytearray(events.read_bytes())
    if damage == "cut":
        data = data[:-7]  # inside epoch 2's record
    elif damage == "corrupt":
        data[len(data) // 2] ^= 0xFF  # a flipped byte: a record's checksum no longer matches
    else:  # a whole record, checksums right, that is no event, before both epochs
        header = len(journal._event_file_bytes(list(RawEventFileLoader(str(events)).Load())[:1]))
        data[header:header] = journal._event_file_bytes([b"\xff\xff\xff"])
    events.write_bytes(bytes(data))
    asha().on_trial_add(None, x)
    assert x.config["tune_epoch"] == 2
    acc = _curves(str(stored))
    assert [(e.step, e.value) for e in acc.Scalars("ray/tune/val_px_error")] == [(1, 9.0), (2, 8.0)]
    assert [e.step for e in acc.Scalars("ray/tune/nested/a")] == [1, 2]
    readable = list(RawEventFileLoader(str(events)).Load())
    assert journal._event_file_bytes(readable) == events.read_bytes()  # nothing unreadable left behind
    restored = list(stored.glob("*.echotune-restored"))
    if damage == "not an event":  # both epochs survive in the file: nothing to write from the logs
        assert len(readable) == 3 and not restored
    else:
        assert len(readable) < 3 and restored


def test_a_restarted_trials_healthy_tensorboardx_file_is_left_as_it_is(folder, tmp_path):
    """The event files Tune's TensorBoard logger writes (tensorboardX), histograms too, are rewritten
    only when they hold epochs to drop."""
    from tensorboardX import SummaryWriter

    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1, 2), n_unfrozen=0, head="mlp")
    stored = Path(x.storage.trial_fs_path)
    with SummaryWriter(str(stored), filename_suffix=".tbx") as writer:
        for step in (1, 2):
            writer.add_scalar("ray/tune/val_px_error", 10.0 - step, global_step=step)
            writer.add_histogram("ray/tune/weights", np.arange(5.0) * step, global_step=step)
    [events] = stored.glob("events.out.tfevents*")
    before = (events.read_bytes(), events.stat().st_mtime_ns)
    time.sleep(0.01)
    asha().on_trial_add(None, x)
    assert (events.read_bytes(), events.stat().st_mtime_ns) == before


def _tune_rows(*epochs) -> str:
    """result.json lines as Tune logs our trials' results (step: timesteps_total = epoch)."""
    return "".join(json.dumps({"epoch": e, "timesteps_total": e, "training_iteration": e, "val_px_error": 10.0 - e,
                               "timestamp": 100 + e, "config": {"lr": 0.1}, "nested": {"a": float(e)},
                               "hostname": "h"}) + "\n" for e in epochs)


def _curves(folder):
    """TensorBoard's own reader over the event files in ``folder``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def _event_file(path: Path, steps, tags=("epoch", "timesteps_total", "val_px_error", "nested/a")) -> None:
    """A TensorBoard event file holding, at ``steps``, the ``tags`` of ``_tune_rows`` under ``ray/tune/``
    (by default every one Tune's logger writes for them; fewer: an epoch whose upload was cut)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    with path.open("wb") as f:
        writer = RecordWriter(f)
        writer.write(event_pb2.Event(wall_time=100.0, file_version="brain.Event:2").SerializeToString())
        for step in steps:
            row = {"epoch": step, "timesteps_total": step, "val_px_error": 10.0 - step, "nested/a": step}
            values = [summary_pb2.Summary.Value(tag=f"ray/tune/{tag}", simple_value=float(row[tag])) for tag in tags]
            writer.write(event_pb2.Event(wall_time=100.0 + step, step=step,
                                         summary=summary_pb2.Summary(value=values)).SerializeToString())


def test_a_stopped_trials_curves_are_restored_too_each_epoch_once(folder, tmp_path):
    """A trial stopped before the kill reports nothing again: the epochs its logs hold are written, once
    each (the last row of an epoch its logs hold twice)."""
    sched = asha()
    sched.stopped["x"] = 2
    x = _stored_trial(tmp_path, "x", [], tail=_tune_rows(1) + _tune_rows(1).replace("9.0", "7.5") + _tune_rows(2),
                      n_unfrozen=0, head="mlp")
    sched.on_trial_add(None, x)
    acc = _curves(x.storage.trial_fs_path)
    assert [(e.step, e.value) for e in acc.Scalars("ray/tune/val_px_error")] == [(1, 7.5), (2, 8.0)]


def test_a_storage_error_while_restoring_curves_is_logged_and_the_resume_goes_on(folder, tmp_path, caplog):
    class Failing:
        def __getattr__(self, name):
            raise OSError("AWS Error SLOW_DOWN")

    x = _stored_trial(tmp_path, "x", [1], n_unfrozen=0, head="mlp")
    restore = journal.restore_trial_logs(x)  # the logs come back; then the storage fails
    x.storage.storage_filesystem = Failing()
    journal.restore_tensorboard(x, 1)
    assert restore["epoch"] == 1 and "could not restore the TensorBoard files of trial x" in caplog.text
