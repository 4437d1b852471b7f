"""Bad flags and trial configs: one clear line on stderr, exit code 2, nothing started or left behind.

``BAD_INPUTS`` lists each case with the message fragment a user sees; the tests below run every
case, and docs/failures.md (checked by test_failure_table.py) is the table of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search import journal

# (bad input, the message fragment a user sees)
BAD_INPUTS = [
    ("search: --num-samples 0", "--num-samples must be at least 1, not 0"),
    ("search: --max-epochs 0", "--max-epochs must be at least 1, not 0"),
    ("search: --per-cell 0", "--per-cell must be at least 1, not 0"),
    ("search: --reduction-factor 1", "--reduction-factor must be at least 2"),
    ("search: fewer trials than the space has cells", "cannot try each of the 4 cells of space 'smoke'"),
    ("search: --grace-period not below --max-epochs", "--grace-period 3 must be below --max-epochs 3"),
    ("search: --weights pointing nowhere", "no such file; point it at your own copy of the encoder checkpoint"),
    ("search: --storage in a bucket that does not exist", "cannot write to the experiment storage s3://nobucket"),
    ("search: unknown --space", "invalid choice: 'nope'"),
    ("search: unknown --sampler", "invalid choice: 'cmaes' (choose from 'tpe', 'nsga2', 'random', 'qmc')"),
    ("search: unknown --cell-start", "invalid choice: 'middle' (choose from"),
    ("search: --cell-start with a sampler other than TPE", "--cell-start applies to --sampler tpe only"),
    ("search: --data that is not a shard set", "no manifest.json - not a shard set"),
    ("search: --resume without --name", "--resume needs --name"),
    ("search: --resume of an experiment that does not exist", "no experiment 'ghost' to resume"),
    ("search: --resume of an experiment whose study is lost", "its Optuna study is lost and it cannot be resumed"),
    ("search: a new search under an existing experiment name", "already exists in"),
    ("search: a space for another encoder", "this space needs an encoder among tiny, not 'echoprime'"),
    ("search: --encoder for a space that picks its encoders", "chooses its encoders itself"),
    ("search: --gpus-per-worker on a machine without GPUs", "asks for GPUs, but this machine's Ray instance has none"),
    ("trial config: \"epochs\": \"ten\"", "trial config field 'epochs' must be an integer, not \"ten\""),
    ("trial config: \"lr\": {\"head\": null}", "trial config field 'optim.lr' must be an object of numbers"),
    ("trial config: \"use_gpu\": \"false\"", "trial config field 'use_gpu' must be true/false, not \"false\""),
    ("trial config: \"use_gpu\": true without a GPU", "asks for use_gpu with 1 worker(s), but this machine's Ray"),
    ("trial config: an unknown key", "unknown trial config keys ['lr']"),
    ("trial config: more unfrozen blocks than the encoder has", "n_unfrozen=9 is larger than the 4 blocks"),
    ("trial config: not JSON", "not valid JSON"),
    ("evaluate: a folder that is not a checkpoint", "no config.json; is this a trial checkpoint folder"),
    ("search: a URI with credentials in it", "carries credentials (user:password@ or a presigned URL)"),
    ("search: --cache-views -1", "--cache-views must be 0 (off) or more, not -1"),
    ("trial config: LoRA rank 0", "encoder.lora.rank must be a positive integer, not 0"),
    ("trial config: LoRA on an encoder with unfrozen blocks", "encoder.lora adapts a frozen encoder: set "
                                                              "encoder.n_unfrozen to 0"),
    ("trial config: an unknown LoRA target", "unknown 'qkvv'; valid targets of 'tiny': qkv, proj, mlp1, mlp2"),
    ("trial config: LoRA on a ResNet", "encoder 'r3d_18' has no LoRA targets (no Linear maps in its blocks)"),
    ("trial config: drop_path out of range", "encoder.drop_path=1.5 must be in [0, 1)"),
    ("trial config: cache_views -1", "cache_views=-1 must be >= 0"),
]
MESSAGE = dict(BAD_INPUTS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from trainables.data.shard import write_shards
    from trainables.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("echonet-bad")
    write_synthetic(root, n_videos=8, seed=1, max_frames=20)
    write_shards(root, str(root / "shards"))
    return str(root / "shards")


def search_main(*argv) -> tuple[int, str]:
    """``python -m search.run ARGV`` in-process (every case fails before Ray starts): (code, stderr)."""
    from search.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    journal._STATE.update(folder=None, searcher=None, journal=None)
    return code, err.getvalue()


def one_line(stderr: str) -> bool:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return "Traceback" not in stderr and lines and lines[-1].startswith(("error:", "usage:", "python -m"))


SEARCH_CASES = {
    "search: --num-samples 0": ["--space", "smoke", "--num-samples", "0"],
    "search: --max-epochs 0": ["--space", "smoke", "--max-epochs", "0"],
    "search: --per-cell 0": ["--space", "smoke", "--per-cell", "0"],
    "search: --reduction-factor 1": ["--space", "smoke", "--reduction-factor", "1"],
    "search: fewer trials than the space has cells": ["--space", "smoke", "--num-samples", "3", "--data", "{data}"],
    "search: --grace-period not below --max-epochs": ["--space", "smoke", "--grace-period", "3", "--max-epochs", "3",
                                                       "--data", "{data}"],
    "search: --weights pointing nowhere": ["--space", "smoke", "--data", "{data}", "--weights", "{tmp}/no.pt"],
    "search: --storage in a bucket that does not exist": ["--space", "smoke", "--data", "{data}", "--storage",
                                                          "s3://nobucket/runs", "--s3-endpoint", "{endpoint}"],
    "search: unknown --space": ["--space", "nope"],
    "search: unknown --sampler": ["--sampler", "cmaes"],
    "search: unknown --cell-start": ["--cell-start", "middle"],
    "search: --cell-start with a sampler other than TPE": ["--space", "smoke", "--sampler", "qmc", "--cell-start",
                                                           "sampled"],
    "search: --data that is not a shard set": ["--space", "smoke", "--data", "{tmp}/none"],
    "search: --resume without --name": ["--resume"],
    "search: --resume of an experiment that does not exist": ["--name", "ghost", "--resume"],
    "search: a space for another encoder": ["--space", "smoke", "--encoder", "echoprime", "--data", "{data}"],
    "search: --encoder for a space that picks its encoders": ["--space", "paper", "--encoder", "tiny", "--data",
                                                              "{data}"],
    "search: a URI with credentials in it": ["--space", "smoke", "--data", "s3://bucket/v1?X-Amz-Signature=abc"],
    "search: --cache-views -1": ["--space", "smoke", "--cache-views", "-1"],
}


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_bad_search_flags_fail_in_one_line_before_anything_starts(case, shards, s3_endpoint, tmp_path):
    argv = [a.format(data=shards, tmp=tmp_path, endpoint=s3_endpoint) for a in SEARCH_CASES[case]]
    if "--storage" not in argv:
        argv += ["--storage", str(tmp_path / "runs")]
    code, err = search_main(*argv, "--name", "x") if "--name" not in argv and "--resume" not in argv \
        else search_main(*argv)
    assert code == 2 and MESSAGE[case] in err and one_line(err), err
    assert not (tmp_path / "runs" / "x").exists()  # nothing left that would block the name


def test_a_refused_start_leaves_the_name_free(shards, s3_endpoint, tmp_path):
    argv = ["--space", "smoke", "--data", shards, "--storage", "s3://nobucket/runs", "--s3-endpoint", s3_endpoint,
            "--name", "free"]
    first, second = search_main(*argv), search_main(*argv)
    assert first == second and "already exists" not in second[1]


def test_existing_name_and_lost_study(shards, tmp_path):
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    settings = {"name": "old", "storage": str(tmp_path / "runs"), "study_name": "old-1", "space": "smoke",
                "trainable": "train", "encoder": "tiny", "data": shards, "weights": None, "max_epochs": 3,
                "num_samples": 4, "seed": 0, "batch_size": 4, "grace_period": 1, "workers_per_trial": 1,
                "gpus_per_worker": 0, "per_cell": 1}
    (folder / journal.SETTINGS_FILE).write_text(json.dumps(settings))
    code, err = search_main("--space", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--name", "old")
    case = "search: a new search under an existing experiment name"
    assert code == 2 and MESSAGE[case] in err and "add --resume" in err
    (folder / "tuner.pkl").write_bytes(b"")  # Tune had started; the study file is gone
    code, err = search_main("--storage", str(tmp_path / "runs"), "--name", "old", "--resume")
    assert code == 2 and MESSAGE["search: --resume of an experiment whose study is lost"] in err and one_line(err)


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return e


def test_gpus_asked_for_on_a_machine_without(shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "search.run", "--space", "smoke", "--data", shards, "--storage",
                           str(tmp_path), "--name", "g", "--gpus-per-worker", "1"], capture_output=True, text=True,
                          timeout=300, env=env())
    case = "search: --gpus-per-worker on a machine without GPUs"
    assert proc.returncode == 2 and MESSAGE[case] in proc.stderr and one_line(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "g").exists()


TRIAL_CONFIGS = {
    "trial config: \"epochs\": \"ten\"": {"epochs": "ten"},
    "trial config: \"lr\": {\"head\": null}": {"optim": {"lr": {"head": None}}},
    "trial config: \"use_gpu\": \"false\"": {"use_gpu": "false"},
    "trial config: an unknown key": {"lr": 0.1},
    "trial config: more unfrozen blocks than the encoder has": {"encoder": {"name": "tiny", "n_unfrozen": 9}},
    "trial config: LoRA rank 0": {"encoder": {"name": "tiny", "n_unfrozen": 0, "lora": {"rank": 0}}},
    "trial config: LoRA on an encoder with unfrozen blocks": {"encoder": {"name": "tiny", "n_unfrozen": 2,
                                                                         "lora": {"rank": 4}}},
    "trial config: an unknown LoRA target": {"encoder": {"name": "tiny", "n_unfrozen": 0,
                                                         "lora": {"targets": ["qkvv"]}}},
    "trial config: LoRA on a ResNet": {"encoder": {"name": "r3d_18", "n_unfrozen": 0, "lora": {}}},
    "trial config: drop_path out of range": {"encoder": {"name": "tiny", "drop_path": 1.5}},
    "trial config: cache_views -1": {"cache_views": -1},
}


@pytest.mark.parametrize("case", list(TRIAL_CONFIGS))
def test_bad_trial_configs_fail_in_one_line(case, tmp_path):
    from trainables.train import main

    (tmp_path / "cfg.json").write_text(json.dumps({"data": {"uri": "x"}} | TRIAL_CONFIGS[case]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", str(tmp_path / "cfg.json")])
    assert code == 2 and MESSAGE[case] in err.getvalue() and one_line(err.getvalue()), err.getvalue()


def test_trial_config_that_is_not_json(tmp_path):
    from trainables.train import main

    (tmp_path / "cfg.json").write_text("{epochs: 3")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--config", str(tmp_path / "cfg.json")]) == 2
    assert MESSAGE["trial config: not JSON"] in err.getvalue()


def test_use_gpu_without_a_gpu_is_refused_instead_of_waiting(shards, tmp_path):
    cfg = {"data": {"uri": shards}, "use_gpu": True, "epochs": 1, "storage": str(tmp_path / "runs")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainables.train", "--config", str(tmp_path / "cfg.json")],
                          capture_output=True, text=True, timeout=300, env=env())
    case = "trial config: \"use_gpu\": true without a GPU"
    assert proc.returncode == 2 and MESSAGE[case] in proc.stderr, proc.stderr[-2000:]


def test_evaluate_on_a_folder_that_is_not_a_checkpoint(tmp_path):
    from trainables.evaluate import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--checkpoint", str(tmp_path), "--split", "val"]) == 2
    assert MESSAGE["evaluate: a folder that is not a checkpoint"] in err.getvalue()


def test_every_case_is_exercised():
    exercised = set(SEARCH_CASES) | set(TRIAL_CONFIGS) | {
        "search: --resume of an experiment whose study is lost", "search: a new search under an existing experiment name",
        "search: --gpus-per-worker on a machine without GPUs", "trial config: \"use_gpu\": true without a GPU",
        "trial config: not JSON", "evaluate: a folder that is not a checkpoint"}
    assert exercised == set(MESSAGE)
    assert Path(__file__).name  # the table in docs/failures.md is checked by test_failure_table.py
