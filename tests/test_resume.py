"""Searches that are killed and resumed, resumed on a new head from S3, and run side by side with
other Ray instances: nothing hangs, no trial is lost, none is counted twice.

These use ``--trainable rehearsal`` (every trial a real Ray Train run whose workers sleep, report
made-up metrics and checkpoint like the real loop): what is under test is the bookkeeping of Tune,
Train, Optuna and our journal, not the model. The real trainer's own kill/resume is in test_trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import kill_everything, trial_rows

MAX_T = 3
optuna.logging.set_verbosity(optuna.logging.WARNING)

# (fault, what a user sees): each survived with no trial lost or counted twice (tests below)
BAD_INPUTS = [
    ("search killed -9 right after a trial's result", "EchoTune search (resumed)"),
    ("search killed -9 as a trial starts", "EchoTune search (resumed)"),
    ("search killed -9 mid-epoch", "EchoTune search (resumed)"),
    ("search killed -9 while it writes the export", "EchoTune search (resumed)"),
    ("search killed -9 while a dominated trial is paused", "EchoTune search (resumed)"),
    ("search killed -9 with the searcher's state newer than Tune's snapshot",
     "of trials the kill cut off before Tune recorded them"),
    ("head lost with its local results folder (S3 storage)", "resume: restored search_config.json, optuna.db"),
    ("two searches at once next to a third Ray instance", "finished: 2 trials"),
]
MESSAGE = dict(BAD_INPUTS)
WHEN = {"after_result": "search killed -9 right after a trial's result",
        "trial_start": "search killed -9 as a trial starts", "mid_epoch": "search killed -9 mid-epoch",
        "export": "search killed -9 while it writes the export",
        "paused": "search killed -9 while a dominated trial is paused"}


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", ECHOTUNE_REHEARSAL_EPOCH_S="0.5", **extra)
    e.pop("RAY_ADDRESS", None)
    return e


def search(storage, name, *extra, space="smoke", samples=4) -> list[str]:
    return [sys.executable, "-m", "search.run", "--space", space, "--trainable", "rehearsal", "--storage",
            str(storage), "--name", name, "--max-epochs", str(MAX_T), "--num-samples", str(samples), "--seed", "5",
            *extra]


def results(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted(folder.glob("trial_*/result.json")):
        out[f.parent.name[len("trial_"):]] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return out


def lines(folder: Path) -> int:
    return sum(len(r) for r in results(folder).values())


def start(cmd, log: Path, cwd=None, **env_extra) -> subprocess.Popen:
    """Start a search in its own session (to kill it with everything it starts), output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(**env_extra),
                                start_new_session=True, cwd=cwd)


def kill_when(cmd, log: Path, ready, timeout=300, cwd=None, **env_extra) -> None:
    """Start ``cmd``, kill -9 its whole process group (driver, Ray, workers) once ``ready()``."""
    proc = start(cmd, log, cwd, **env_extra)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the search ended before the kill:\n{log.read_text()[-3000:]}"
    assert time.time() < deadline, f"the kill moment never came:\n{log.read_text()[-3000:]}"
    kill_everything(proc)


def run_search(cmd, log: Path, timeout=420, cwd=None) -> str:
    """Run a search to its end with its output in ``log``; a run that hangs is killed with
    everything it started, and the failure shows where its output stopped (not a bare timeout)."""
    proc = start(cmd, log, cwd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_everything(proc)
        pytest.fail(f"the search hung for {timeout} s; its output ended with:\n{log.read_text()[-6000:]}")
    out = log.read_text()
    assert proc.returncode == 0, out[-8000:]
    return out


def study_trials(folder: Path) -> list:
    settings = json.loads((folder / "search_config.json").read_text())
    return optuna.load_study(study_name=settings["study_name"], storage=f"sqlite:///{folder / 'optuna.db'}").trials


def assert_every_trial_once(folder: Path, samples: int) -> None:
    """Every trial has each of its epochs once in Tune's results and in the study, and its
    study state is what happened to it; the export lists each trial once."""
    res = results(folder)
    assert len(res) == samples, sorted(res)
    stopped = json.loads((folder / "scheduler.json").read_text())["stopped"]
    for tid, rows in res.items():
        epochs = [r["epoch"] for r in rows]
        assert epochs == list(range(1, len(epochs) + 1)), (tid, epochs)  # once each, no gap
        assert len(epochs) == MAX_T or stopped.get(tid) == len(epochs), (tid, epochs, stopped)
    trials = study_trials(folder)
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in trials}
    assert set(by_tune) == set(res) and len(trials) == samples  # one study row per Tune trial
    for tid, t in by_tune.items():
        n = len(res[tid])
        assert t.state.name == ("COMPLETE" if n == MAX_T else "PRUNED"), (tid, t.state, n)
        assert sorted(t.intermediate_values) == list(range(1, n + 1)), (tid, t.intermediate_values)
    rows = (folder / "pareto.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == samples
    assert_tensorboard_steps_are_epochs(folder, res)


def assert_tensorboard_steps_are_epochs(folder: Path, res: dict) -> None:
    """A restarted trial's TensorBoard curve goes on from where it was (Tune's step is the epoch),
    with each epoch once, across the event files of its runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tid, rows in res.items():
        acc = EventAccumulator(str(folder / f"trial_{tid}"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("ray/tune/val_px_error")] == [r["epoch"] for r in rows], tid


# --- kills at several moments -----------------------------------------------------------------------

def moment(name: str, folder: Path, log: Path):
    """A ``ready()`` predicate for each kill moment."""
    start = {"n": None}

    def trial_start():  # a trial folder exists that has not reported yet, after another finished
        res = results(folder)
        done = any(len(r) == MAX_T for r in res.values())
        # Tune creates result.json (empty) as the trial starts: a fresh trial has none or an empty one
        fresh = [d for d in folder.glob("trial_*")
                 if not (d / "result.json").exists() or (d / "result.json").stat().st_size == 0]
        return done and bool(fresh)

    def mid_epoch():  # half an epoch after some trial's first result
        if start["n"] is None and any(len(r) == 1 for r in results(folder).values()):
            start["n"] = time.time()
        return start["n"] is not None and time.time() - start["n"] > 0.25

    def after_result():  # the moment a new result line lands (the second trial's first epoch)
        return len(results(folder)) >= 2 and lines(folder) > MAX_T

    def export():  # the search finished fitting and is writing the export
        return "Wrote the latest version of all result files" in log.read_text(errors="ignore")

    def paused():  # a trial is paused as dominated and a later trial has reported since
        return bool(paused_trials(folder)) and lines(folder) > 2 * MAX_T

    return {"trial_start": trial_start, "mid_epoch": mid_epoch, "after_result": after_result,
            "export": export, "paused": paused}[name]


def paused_trials(folder: Path) -> dict:
    """Trials the scheduler paused as dominated (scheduler.json), that have not resumed yet."""
    try:
        deferred = json.loads((folder / "scheduler.json").read_text()).get("deferred", {})
    except (OSError, ValueError):
        return {}
    res = results(folder)
    return {tid: d for tid, d in deferred.items() if len(res.get(tid, [])) <= d["epoch"]}


@pytest.mark.parametrize("when", ["after_result",  # the others are slow (~50-70 s each): `make test-all`
                                  pytest.param("trial_start", marks=pytest.mark.slow),
                                  pytest.param("mid_epoch", marks=pytest.mark.slow),
                                  pytest.param("export", marks=pytest.mark.slow),
                                  pytest.param("paused", marks=pytest.mark.slow)])
def test_a_kill_at_any_moment_loses_nothing(tmp_path, when):
    folder, log = tmp_path / "k", tmp_path / "first.log"
    kill_when(search(tmp_path, "k"), log, moment(when, folder, log))
    paused, started = paused_trials(folder), set(results(folder))
    second = run_search(search(tmp_path, "k", "--resume"), tmp_path / "second.log")
    assert MESSAGE[WHEN[when]] in second
    assert_every_trial_once(folder, 4)
    res = results(folder)
    fresh = [rows[0]["timestamp"] for tid, rows in res.items() if tid not in started]
    for tid, pause in paused.items():  # still last after the resume, not restarted first
        assert len(res[tid]) == MAX_T and fresh and res[tid][pause["epoch"]]["timestamp"] >= max(fresh), tid


def drop_last_trial_from_tunes_snapshot(folder: Path) -> tuple[str, str]:
    """Make Tune's newest experiment state lack the trial started last, as one uploaded before that
    trial began while the searcher state uploaded after it would: Tune writes and uploads the two
    apart. Returns the dropped trial's (id, status)."""
    path = max(folder.glob("experiment_state-*.json"))
    state = json.loads(path.read_text())
    trial_json, _meta = state["trial_data"].pop()
    dropped = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
    path.write_text(json.dumps(state))
    return dropped["trial_id"], dropped["status"]


# slow (~110 s): `make test-all`; test_study has the limiter's restore in a unit test
@pytest.mark.slow
def test_a_searcher_state_newer_than_tunes_snapshot_neither_hangs_nor_loses_a_trial(tmp_path):
    """Seen in CI: resumed on a new head from S3, the search waited for ever. The searcher state
    (uploaded after Tune's snapshot) held a slot for a trial the snapshot lacked, and one trial at
    a time ran, so no trial could start. Now the trial is run again and the paused one resumes."""
    folder, log = tmp_path / "k", tmp_path / "first.log"
    kill_when(search(tmp_path, "k", "--max-concurrent", "1"), log, moment("paused", folder, log))
    tid, status = drop_last_trial_from_tunes_snapshot(folder)
    assert status in ("RUNNING", "PENDING"), (tid, status)  # it held the one slot
    second = run_search(search(tmp_path, "k", "--resume"), tmp_path / "second.log", timeout=300)
    assert MESSAGE["search killed -9 with the searcher's state newer than Tune's snapshot"] in second
    assert_every_trial_once(folder, 4)


# slow (~65 s): `make test-all`; the after_result kill test above pauses and resumes a trial too
@pytest.mark.slow
def test_a_dominated_trial_is_paused_and_finishes_last_with_every_epoch_once(tmp_path):
    """The default scheduler pauses a trial that a cheaper trial of another cell dominates at ASHA's
    second rung, and resumes it once every other trial has started: its Train run goes on from its
    checkpoint and every epoch reaches Tune, the study and TensorBoard once (assert_every_trial_once)."""
    # one trial at a time (as on a 2-core machine anyway): with all four at once nothing would wait
    out = run_search(search(tmp_path, "d", "--max-concurrent", "1"), tmp_path / "run.log")
    folder = tmp_path / "d"
    deferred = json.loads((folder / "scheduler.json").read_text())["deferred"]
    assert deferred, "seed 5 pauses k=0 gcn (dominated by k=0 mlp) at epoch 2; a changed sampler may not"
    assert_every_trial_once(folder, 4)
    res = results(folder)
    first_results = [rows[0]["timestamp"] for tid, rows in res.items() if tid not in deferred]
    rows = {r["trial_id"]: r for r in trial_rows(folder)}
    for tid, pause in deferred.items():
        assert pause["epoch"] == 2 and pause["by"] in res
        assert [r["epoch"] for r in res[tid]] == [1, 2, 3]  # paused, not stopped: it ran all its epochs
        # its Train run went on from the epoch-2 checkpoint, or (a slow pause) the paused run had
        # finished epoch 3 before it was stopped and the restart only reported it: never from scratch
        assert res[tid][2]["run_first_epoch"] == 3 or res[tid][2].get("replayed") == 1, res[tid][2]
        assert res[tid][pause["epoch"]]["timestamp"] >= max(first_results)  # resumed after the others started
        assert rows[tid]["state"] == "COMPLETE" and f"paused at epoch 2 as dominated by trial {pause['by']}" in \
            rows[tid]["reason"]
    assert f"({len(deferred)} paused as dominated and resumed last)" in out


def test_resume_on_a_new_head_from_s3(s3_endpoint, bucket, tmp_path):
    """Run on S3 storage, kill -9, lose the head's local folder, resume from S3 alone."""
    storage = f"{bucket}/runs"
    head1, head2 = tmp_path / "head1", tmp_path / "head2"
    head1.mkdir()
    head2.mkdir()
    cmd = search(storage, "s3exp", "--s3-endpoint", s3_endpoint)
    local = head1 / "results" / "s3exp"
    kill_when(cmd, tmp_path / "first.log", lambda: len(list(local.glob("*.db"))) and _s3_lines(
        s3_endpoint, storage) >= MAX_T + 1, cwd=head1)
    shutil.rmtree(head1)  # the old head is gone
    second = run_search(cmd + ["--resume"], tmp_path / "second.log", cwd=head2)
    assert MESSAGE["head lost with its local results folder (S3 storage)"] in second
    mirror = tmp_path / "mirror"
    _s3fs(s3_endpoint).get(f"{storage}/s3exp/", str(mirror), recursive=True)
    shutil.copy(head2 / "results" / "s3exp" / "pareto.csv", mirror / "pareto.csv")
    shutil.copy(head2 / "results" / "s3exp" / "optuna.db", mirror / "optuna.db")
    assert_every_trial_once(mirror, 4)
    # The study in S3 is the finished one too (a third head would resume from it).
    _s3fs(s3_endpoint).get_file(f"{storage}/s3exp/optuna.db", str(tmp_path / "s3.db"))
    shutil.copy(tmp_path / "s3.db", mirror / "optuna.db")
    assert {t.state.name for t in study_trials(mirror)} <= {"COMPLETE", "PRUNED"}


def _s3fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _s3_lines(endpoint, storage) -> int:
    fs = _s3fs(endpoint)
    fs.invalidate_cache()
    return sum(len(fs.cat_file(p).splitlines()) for p in fs.glob(f"{storage}/s3exp/trial_*/result.json"))


# --- side by side ----------------------------------------------------------------------------------------

# slow (~60 s): `make test-all`
@pytest.mark.slow
def test_two_searches_at_once_next_to_another_ray_instance(tmp_path):
    """Each search talks to its own Ray instance: with three on the machine, both finish every trial
    (before, Train's placement-group cleanup failed with "multiple active Ray instances" and the next
    trial waited forever)."""
    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(); print('up', flush=True); "
                              "time.sleep(600)"], stdout=subprocess.PIPE, text=True, env=env(),
                             start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"
        procs = [subprocess.Popen(search(tmp_path, name, space="frozen", samples=2), stdout=(tmp_path / f"{name}.log").open("w"),
                                  stderr=subprocess.STDOUT, env=env()) for name in ("a", "b")]
        for p in procs:
            assert p.wait(600) == 0, (tmp_path / "a.log").read_text()[-3000:] + (tmp_path / "b.log").read_text()[-3000:]
    finally:
        kill_everything(other)
    for name in ("a", "b"):
        assert MESSAGE["two searches at once next to a third Ray instance"] in (tmp_path / f"{name}.log").read_text()
        res = results(tmp_path / name)
        assert len(res) == 2 and all(len(r) == MAX_T for r in res.values()), (name, res)
