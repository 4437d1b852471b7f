"""The search service: spaces (registry-driven), stratified ASHA, Pareto maths, and end-to-end runs of
`python -m search.run` on a local Ray instance with shards on the loopback S3 server."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from search.pareto import hypervolume_2d, pareto_mask
from search.spaces import SPACES, SpaceFn, apply, get_space, params_of
from trainables.config import TrialConfig
from trainables.data.shard import write_shards
from trainables.data.synthetic import write_synthetic
from trainables.models.freezing import lr_groups_for

DEFAULT_ENCODER = {"smoke": "tiny", "baselines": "r3d_18", "paper": "echoprime"}


def sample(space: str, encoder: str, seed: int) -> dict:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    base = {"encoder": {"name": encoder}, "data": {"uri": "s3://b/v1"}}
    consts = SpaceFn(space, encoder, base, {"echoprime": "/w/ep.pt"})(trial)
    return {**trial.params, **consts}


@pytest.mark.parametrize("space", list(SPACES))
def test_every_space_samples_valid_trial_configs(space):
    encoder = DEFAULT_ENCODER.get(space, "echoprime")
    seen_k = set()
    for seed in range(12):
        config = sample(space, encoder, seed)
        cfg = TrialConfig.from_dict(apply(params_of(config), config["base"], config["weights"])).validate()
        seen_k.add(str(cfg.encoder.n_unfrozen))
        assert cfg.head.type in ("mlp", "gcn")
        groups = set(lr_groups_for(cfg.encoder.name, cfg.encoder.n_unfrozen))
        assert set(cfg.optim.lr) <= groups  # never an LR for a group that does not train
        if space in ("selective_ft", "frozen", "full_ft"):  # one per trained stage group: conditional params
            assert set(cfg.optim.lr) == groups
    s = SPACES[space]
    assert s.scientific and s.nuisance and s.description
    assert len(seen_k) >= (1 if space in ("frozen", "full_ft", "baselines") else 2)


def test_selective_ft_covers_the_sensible_k_values():
    ks = {str(sample("selective_ft", "echoprime", seed)["n_unfrozen"]) for seed in range(60)}
    assert ks == {"0", "1", "2", "4", "8", "16", "all"}


def test_unknown_space_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of selective_ft, frozen, full_ft, baselines, paper, smoke"):
        get_space("nope")
    with pytest.raises(ValueError, match="needs an encoder among tiny"):
        get_space("smoke").check_encoder("echoprime")


def test_stratified_asha_compares_only_within_a_stratum():
    from ray.tune.schedulers import TrialScheduler

    from search.schedulers import StratifiedASHA

    sched = StratifiedASHA("n_unfrozen", time_attr="epoch", metric="err", mode="min", max_t=4, grace_period=1,
                           reduction_factor=2)
    trials = {name: SimpleNamespace(trial_id=name, config={"n_unfrozen": k})
              for name, k in [("full-a", "all"), ("full-b", "all"), ("frozen-a", 0), ("frozen-b", 0)]}
    for t in trials.values():
        sched.on_trial_add(None, t)
    decide = lambda name, err: sched.on_trial_result(None, trials[name], {"epoch": 1, "err": err})  # noqa: E731
    assert decide("full-a", 2.0) == TrialScheduler.CONTINUE
    assert decide("full-b", 5.0) == TrialScheduler.STOP  # worse than its own stratum
    # The frozen trials are far worse than full fine-tuning, but only meet each other.
    assert decide("frozen-a", 9.0) == TrialScheduler.CONTINUE
    assert decide("frozen-b", 8.0) == TrialScheduler.CONTINUE
    assert sched.num_stopped == 1 and set(sched.by_stratum) == {"all", "0"}


@pytest.mark.parametrize("multi", [False, True])
def test_searcher_study_is_persistent_and_unique(tmp_path, multi):
    from search.run import make_searcher

    settings = {"space": "smoke", "encoder": "tiny", "multi_objective": multi, "sampler": "tpe", "seed": 0,
                "study_name": f"exp-{multi}"}
    searcher = make_searcher(settings, tmp_path, {"encoder": {"name": "tiny"}, "data": {"uri": "x"}})
    searcher.set_search_properties(None, None, {})
    config = searcher.suggest("t1")
    assert config["n_unfrozen"] in (0, "all") and "base" in config
    study = optuna.load_study(study_name=f"exp-{multi}", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.directions) == (2 if multi else 1) and len(study.trials) == 1


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = np.round(rng.uniform(0, 10, (60, 2)), 0)  # rounding makes ties
    mask = pareto_mask(pts)
    for i, p in enumerate(pts):
        dominated = any((q <= p).all() and (q < p).any() for q in pts)
        assert mask[i] == (not dominated)


def test_hypervolume_of_a_known_front():
    pts = [[1, 3], [2, 2], [3, 1], [3, 3]]  # the last is dominated
    assert hypervolume_2d(pts, (4, 4)) == pytest.approx(3 * 1 + 2 * 1 + 1 * 1)
    assert hypervolume_2d([[5, 5]], (4, 4)) == 0.0


# --- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def search_data(s3_endpoint, tmp_path_factory):
    import s3fs

    root = tmp_path_factory.mktemp("echonet-search")
    write_synthetic(root, n_videos=60, seed=31, max_frames=32)
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir("search")
    write_shards(root, "s3://search/v1", rows_per_file=30, s3_endpoint=s3_endpoint)
    return "s3://search/v1"


def search_cmd(data, endpoint, storage, name, *extra):
    return [sys.executable, "-m", "search.run", "--space", "smoke", "--data", data, "--s3-endpoint", endpoint,
            "--storage", str(storage), "--name", name, "--max-epochs", "3", "--seed", "3", *extra]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return e


def trial_rows(folder: Path) -> list[dict]:
    with (folder / "pareto.csv").open() as f:
        return list(csv.DictReader(f))


def test_search_end_to_end(search_data, s3_endpoint, tmp_path):
    proc = subprocess.run(search_cmd(search_data, s3_endpoint, tmp_path, "e2e", "--num-samples", "6"),
                          capture_output=True, text=True, timeout=900, env=env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    folder = tmp_path / "e2e"
    assert f"experiment folder: {folder}" in out and f"tensorboard --logdir {folder}" in out
    assert "stopped early" in out  # the summary table

    pareto = subprocess.run([sys.executable, "-m", "search.pareto", str(folder), "--evaluate-test"],
                            capture_output=True, text=True, timeout=300, env=env())
    assert pareto.returncode == 0, pareto.stderr
    rows = trial_rows(folder)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert any(r["completed"] == "False" for r in rows), "ASHA stopped no trial"
    # The exported front equals an independent non-dominated computation over completed trials.
    done = [(r["trial_id"], float(r["val_px_error"]), int(r["trainable_params"])) for r in rows
            if r["completed"] == "True"]
    expected = {tid for tid, e, p in done
                if not any((e2 <= e and p2 <= p) and (e2 < e or p2 < p) for _, e2, p2 in done)}
    summary = json.loads((folder / "pareto.json").read_text())
    assert {t["trial_id"] for t in summary["front"]} == expected
    assert {r["trial_id"] for r in rows if r["on_front"] == "True"} == expected
    for t in summary["front"]:
        assert {"trial_id", "val_px_error", "trainable_params", "n_unfrozen", "head", "checkpoint_path",
                "total_params", "gpu_hours", "params"} <= set(t)
        assert Path(t["checkpoint_path"], "state.pt").is_file()
        assert t["test_n"] > 0 and np.isfinite(t["test_px_error"])  # --evaluate-test scored it
    assert summary["hypervolume"] > 0 and (folder / "pareto.png").stat().st_size > 10_000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_dirs = sorted(folder.glob("trial_*"))
    assert len(trial_dirs) == 6
    for d in trial_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert "ray/tune/val_px_error" in acc.Tags()["scalars"], d
        hparams = acc.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in hparams
        from tensorboard.plugins.hparams import plugin_data_pb2

        info = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
        assert {"n_unfrozen", "head"} <= set(info.session_start_info.hparams), d

    # Round two: retrain a front point through the same space (FixedTrial) for a given length.
    rep = subprocess.run([sys.executable, "-m", "search.replay", str(folder), "--point", "0", "--epochs", "1"],
                         capture_output=True, text=True, timeout=600, env=env())
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    replayed = json.loads(rep.stdout.strip().splitlines()[-1])
    assert replayed["name"] == f"replay-{summary['front'][0]['trial_id']}-e1" and replayed["metrics"]["epoch"] == 1
    bad = subprocess.run([sys.executable, "-m", "search.replay", str(folder), "--point", "99", "--epochs", "1"],
                         capture_output=True, text=True, timeout=120, env=env())
    assert bad.returncode == 2 and "the front has" in bad.stderr


def test_resume_after_kill_finishes_every_trial_once(search_data, s3_endpoint, tmp_path):
    cmd = search_cmd(search_data, s3_endpoint, tmp_path, "killed", "--num-samples", "4")
    first = subprocess.Popen(cmd, stdout=(tmp_path / "first.log").open("w"), stderr=subprocess.STDOUT, env=env(),
                             start_new_session=True)
    folder = tmp_path / "killed"
    deadline = time.time() + 600

    def finished() -> int:
        n = 0
        for result in folder.glob("trial_*/result.json"):
            lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
            n += any(x.get("done") or x.get("epoch") == 3 for x in lines)
        return n

    while finished() < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert first.poll() is None, "the search ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)

    second = subprocess.run(cmd[:cmd.index("--name")] + ["--name", "killed", "--resume"], capture_output=True,
                            text=True, timeout=900, env=env())
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "(resumed)" in second.stdout
    subprocess.run([sys.executable, "-m", "search.pareto", str(folder)], check=True, capture_output=True, timeout=300)
    rows = trial_rows(folder)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4  # none lost, none run twice
    with sqlite3.connect(folder / "optuna.db") as db:
        states = db.execute("SELECT state FROM trials").fetchall()
    assert len(states) == 4 and {s for (s,) in states} == {"COMPLETE"}


# --- bad inputs (no Ray needed: they fail before it starts) --------------------------------------------

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "search.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env())


def test_bad_flags_list_the_valid_choices():
    bad_space = run_cli("--space", "nope")
    assert bad_space.returncode == 2 and "selective_ft" in bad_space.stderr and "smoke" in bad_space.stderr
    bad_sampler = run_cli("--sampler", "cmaes")
    assert bad_sampler.returncode == 2 and "tpe" in bad_sampler.stderr and "qmc" in bad_sampler.stderr


def test_missing_data_unreachable_endpoint_and_bad_resume(tmp_path):
    from tests.conftest import free_port

    missing = run_cli("--space", "smoke", "--data", str(tmp_path / "none"), "--storage", str(tmp_path))
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr
    t0 = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli("--space", "smoke", "--data", "s3://x/v1", "--s3-endpoint", dead, "--storage", str(tmp_path))
    assert unreachable.returncode == 2 and dead in unreachable.stderr and time.monotonic() - t0 < 90
    resume = run_cli("--name", "ghost", "--resume", "--storage", str(tmp_path))
    assert resume.returncode == 2 and "no experiment 'ghost' to resume" in resume.stderr
    assert "Traceback" not in missing.stderr + unreachable.stderr + resume.stderr


def test_space_incompatible_with_encoder(search_data, s3_endpoint, tmp_path):
    smoke = run_cli("--space", "smoke", "--encoder", "echoprime", "--data", search_data, "--s3-endpoint", s3_endpoint,
                    "--storage", str(tmp_path))
    assert smoke.returncode == 2 and "needs an encoder among tiny" in smoke.stderr
    paper = run_cli("--space", "paper", "--encoder", "tiny", "--data", search_data, "--s3-endpoint", s3_endpoint,
                    "--storage", str(tmp_path))
    assert paper.returncode == 2 and "chooses its encoders itself" in paper.stderr
