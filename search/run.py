"""Search how much of a video foundation model to fine-tune for ED/ES landmarks: Ray Tune + Optuna + ASHA.

    python -m search.run --space selective_ft --data s3://bucket/echonet/v1 --encoder echoprime \\
        --weights /models/echo_prime_encoder.pt --storage s3://bucket/runs --num-samples 64

Each trial is a Ray Train DDP landmark trainer (trainables/); Optuna proposes the trials (a
persistent study in the experiment folder), ASHA stops poor ones early, within each number of
unfrozen blocks. Results land in <storage>/<name>/ (default results/<name>/); then
``python -m search.pareto results/<name>`` exports the accuracy vs trainable-parameters front.

With no --data the embedded default runs: synthetic EchoNet-format data made once and cached, the
small ``tiny`` encoder (pretrained once on a synthetic pretext task) when there is no GPU, and a
short schedule. Its numbers say nothing about real echocardiograms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from search.spaces import SPACES, SpaceFn, apply, get_space, params_of
from trainables.data import storage as store

SAMPLERS = ("tpe", "nsga2", "random", "qmc")
TRAINABLES = ("train", "rehearsal")
SCHEDULERS = ("asha", "none")
METRIC, MODE = "val_px_error", "min"
SEARCH_CONFIG = "search_config.json"
DEMO_VIDEOS = 120


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to search")
    g.add_argument("--space", default="selective_ft", choices=list(SPACES), metavar="NAME",
                   help="search space: " + ", ".join(SPACES) + " (default selective_ft)")
    g.add_argument("--encoder", default=None, help="encoder (default: tiny without a GPU, else echoprime)")
    g.add_argument("--weights", default=None, help="encoder weights: local path, s3:// URI, or 'torchvision'")
    g.add_argument("--weights-sha256", default=None, help="expected SHA-256 of --weights")
    g.add_argument("--data", default=None, help="shard set URI (default: the embedded synthetic sample)")
    g.add_argument("--trainable", default="train", choices=TRAINABLES,
                   help="train (default), or rehearsal: trials sleep instead of training, to check a cluster's "
                        "scheduling, autoscaling and concurrency first (search/rehearsal.py)")
    g.add_argument("--multi-objective", action="store_true",
                   help="Optuna optimises (val_px_error, trainable_params) jointly; ASHA still uses val_px_error")
    g = p.add_argument_group("budget and scheduling")
    g.add_argument("--num-samples", type=int, default=None, help="trials (default 6 on CPU, 32 with GPUs)")
    g.add_argument("--max-epochs", type=int, default=None, help="epochs per trial = ASHA max_t (default 4 / 20)")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before the first rung (default 1)")
    g.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    g.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler (default tpe)")
    g.add_argument("--scheduler", default="asha", choices=SCHEDULERS, help="early stopping (default asha)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="per worker (default 4 on CPU, 16 on GPU)")
    g = p.add_argument_group("resources")
    g.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train (DDP) workers per trial")
    g.add_argument("--gpus-per-worker", type=int, default=None, help="default 1 if the cluster has GPUs, else 0")
    g.add_argument("--max-concurrent", type=int, default=None, help="default: cluster GPUs (or CPUs) / per trial")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    g = p.add_argument_group("where")
    g.add_argument("--storage", default="results", help="experiment storage: folder or s3://... (default results)")
    g.add_argument("--name", default=None, help="experiment name (default <space>-<encoder>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the experiment --name after a crash or kill")
    g.add_argument("--shared-storage", action="store_true",
                   help="--storage is a folder mounted at the same path on every node (NFS)")
    g.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    g.add_argument("--cache-dir", default=None, help="node-local shard cache (default ~/.cache/echotune)")
    return p


def experiment_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def local_folder(args) -> Path:
    """Local experiment folder (the Optuna study, the search settings, the Pareto export)."""
    if store.is_remote(args.storage):
        return Path("results").resolve() / args.name
    return Path(args.storage).resolve() / args.name


# ---------------------------------------------------------------------------------------------
# Embedded default and input checks
# ---------------------------------------------------------------------------------------------

def embedded_data(cache_dir: str | None) -> str:
    """The built-in synthetic sample, generated and sharded once per machine."""
    from trainables.data.shard import write_shards
    from trainables.data.stream import default_cache_dir
    from trainables.data.synthetic import write_synthetic

    base = Path(cache_dir or default_cache_dir()) / "demo-v1"
    if not (base / "echonet" / "FileList.csv").exists():
        write_synthetic(base / "echonet", DEMO_VIDEOS, seed=2026, max_frames=36, progress=True)
    write_shards(base / "echonet", str(base / "shards"), rows_per_file=64)
    return str(base / "shards")


def resolve_defaults(args, gpus: float) -> list[str]:
    """Fill in what the user left out; returns notes to print."""
    notes = []
    space = get_space(args.space)
    if args.encoder is None and space.choose_encoder:
        args.encoder = space.encoders[0]  # only the base config's placeholder: the space picks per trial
    elif args.encoder is None:
        args.encoder = "tiny" if not gpus or args.space == "smoke" else "echoprime"
        notes.append(f"encoder: {args.encoder} (no --encoder{'' if gpus else ', no GPU'})")
    if args.data is None and args.trainable == "rehearsal":
        args.data = "none://rehearsal"  # sleeping trials read no data
    if args.data is None:
        args.data = embedded_data(args.cache_dir)
        notes.append(f"data: the embedded SYNTHETIC EchoNet-format sample ({DEMO_VIDEOS} videos) at {args.data} "
                     f"- not EchoNet-Dynamic; these results say nothing about real echocardiograms")
        if args.encoder == "tiny" and args.weights is None and not space.choose_encoder:
            from trainables.pretrain import ensure_pretrained
            args.weights = str(ensure_pretrained(args.cache_dir))
            notes.append(f"weights: tiny encoder pretrained on a synthetic pretext task ({args.weights})")
    args.num_samples = args.num_samples or (32 if gpus else 6)
    args.max_epochs = args.max_epochs or (20 if gpus else 4)
    args.batch_size = args.batch_size or (16 if gpus else 4)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1 if gpus else 0
    if args.name is None:
        args.name = f"{args.space}-{args.encoder}-{time.strftime('%Y%m%d-%H%M%S')}"
    return notes


def check_inputs(args) -> None:
    """Fail before starting anything when a flag cannot work; every message says what to do."""
    from trainables.models.encoders import ENCODERS

    space = get_space(args.space)
    if args.encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {args.encoder!r}; choose one of {', '.join(ENCODERS)}")
    if space.choose_encoder:
        if args.encoder_given:
            raise ValueError(f"space {args.space!r} chooses its encoders itself (among {', '.join(space.encoders)}); "
                             f"drop --encoder, or use a space for one encoder (selective_ft, frozen, full_ft)")
        unknown = set(weights_map(args.weights)) - set(space.encoders)
        if args.weights and (unknown or not weights_map(args.weights)):
            raise ValueError(f"space {args.space!r} takes --weights as ENCODER=PATH pairs for "
                             f"{', '.join(space.encoders)} (e.g. echoprime=/models/ep.pt,panecho=/models/pe.pt)")
    else:
        space.check_encoder(args.encoder)
    for flag in ("num_samples", "max_epochs", "workers_per_trial", "grace_period"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.scheduler == "asha" and args.grace_period >= args.max_epochs:
        raise ValueError(f"--grace-period {args.grace_period} must be below --max-epochs {args.max_epochs}")
    from trainables.data.stream import ShardSet

    if args.trainable == "train":
        ShardSet(args.data, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir)  # reachable, complete


def base_config(args, train_storage: str) -> dict:
    from trainables.config import DataCfg, EncoderCfg, TrialConfig

    weights = None if weights_map(args.weights) else args.weights
    cfg = TrialConfig(encoder=EncoderCfg(args.encoder, weights=weights, weights_sha256=args.weights_sha256),
                      data=DataCfg(uri=args.data, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir,
                                   batch_size=args.batch_size),
                      epochs=args.max_epochs, seed=args.seed, workers=args.workers_per_trial,
                      use_gpu=args.gpus_per_worker > 0, storage=train_storage)
    return cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# Tune pieces
# ---------------------------------------------------------------------------------------------

def run_trial(config: dict) -> None:
    """Ray Tune trainable: suggested parameters + base config -> one Ray Train run."""
    from trainables.driver import trial_driver

    trial_driver(apply(params_of(config), config["base"], config.get("weights")))


def rehearsal_trial(config: dict) -> None:
    """Ray Tune trainable for --trainable rehearsal: same placement, sleeping workers."""
    from search.rehearsal import run_rehearsal

    params = params_of(config)
    run_rehearsal(params, apply(params, config["base"], config.get("weights")))


def trial_dirname(trial) -> str:
    """Short trial folders (the default embeds every config value, the base config included)."""
    return f"trial_{trial.trial_id}"


def make_sampler(name: str, seed: int):
    import optuna

    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[name]()


def make_searcher(settings: dict, folder: Path, base: dict):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    study_storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    metric, mode = (["val_px_error", "trainable_params"], ["min", "min"]) if settings["multi_objective"] \
        else (METRIC, MODE)
    space_fn = SpaceFn(settings["space"], settings["encoder"], base, weights_map(settings.get("weights")))
    return OptunaSearch(space=space_fn, metric=metric, mode=mode,
                        sampler=make_sampler(settings["sampler"], settings["seed"]),
                        study_name=settings["study_name"], storage=study_storage)


def weights_map(weights: str | None) -> dict:
    """``echoprime=/a.pt,panecho=s3://b/p.pt`` -> {encoder: weights} (spaces that pick the encoder)."""
    if not weights or "=" not in weights.split(",")[0].split("://")[0]:
        return {}
    return dict(item.split("=", 1) for item in weights.split(","))


def make_scheduler(settings: dict):
    from search.schedulers import StratifiedASHA

    if settings["scheduler"] == "none":
        return None
    return StratifiedASHA("n_unfrozen", time_attr="epoch", metric=METRIC, mode=MODE, max_t=settings["max_epochs"],
                          grace_period=settings["grace_period"], reduction_factor=settings["reduction_factor"])


def trainable(settings: dict, cluster: dict):
    from ray import tune

    from search.cluster import driver_resources
    fn = rehearsal_trial if settings.get("trainable") == "rehearsal" else run_trial
    return tune.with_resources(fn, driver_resources(cluster))


def concurrency(args, cluster: dict) -> int:
    if args.max_concurrent:
        return args.max_concurrent
    if args.gpus_per_worker > 0:
        return max(1, int(cluster.get("GPU", 0) // (args.workers_per_trial * args.gpus_per_worker)))
    from search.cluster import driver_resources
    per_trial = args.workers_per_trial + driver_resources(cluster).get("CPU", 0)
    return max(1, int(cluster.get("CPU", 1) // per_trial))


def build_tuner(settings: dict, args, folder: Path, cluster: dict):
    from ray import tune

    exp_storage = settings["storage"]
    pa = store.pyarrow_fs(exp_storage, args.s3_endpoint)
    run_config = tune.RunConfig(name=settings["name"], storage_path=pa[1] if pa else exp_storage,
                                storage_filesystem=pa[0] if pa else None,
                                failure_config=tune.FailureConfig(max_failures=1), verbose=1)
    if args.resume:
        return tune.Tuner.restore(experiment_uri(exp_storage, settings["name"]), trainable(settings, cluster),
                                  resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=pa[0] if pa else None)
    base = base_config(args, experiment_uri(exp_storage, settings["name"]))
    tune_config = tune.TuneConfig(search_alg=make_searcher(settings, folder, base), scheduler=make_scheduler(settings),
                                  num_samples=settings["num_samples"], max_concurrent_trials=settings["max_concurrent"],
                                  trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable(settings, cluster), tune_config=tune_config, run_config=run_config)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def start_ray(address: str | None) -> dict:
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # The dashboard / State API must stay on: Train V2 frees stopped trials' placement groups
    # through it (RAY.md §1.7).
    ray.init(address=address, include_dashboard=True, log_to_driver=True)
    return {k: v for k, v in ray.cluster_resources().items()}


def settings_from(args, cluster: dict) -> dict:
    return dict(space=args.space, trainable=args.trainable, encoder=args.encoder, weights=args.weights, data=args.data,
                storage=str(Path(args.storage).resolve()) if not store.is_remote(args.storage) else args.storage,
                name=args.name, num_samples=args.num_samples, max_epochs=args.max_epochs,
                grace_period=args.grace_period, reduction_factor=args.reduction_factor, sampler=args.sampler,
                scheduler=args.scheduler, seed=args.seed, multi_objective=args.multi_objective,
                workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                max_concurrent=concurrency(args, cluster), metric=METRIC, mode=MODE,
                study_name=f"{args.name}-{uuid.uuid4().hex[:8]}")


def resumed_settings(args) -> tuple[dict, Path]:
    """The saved settings of the experiment --name, for --resume."""
    if not args.name:
        raise ValueError("--resume needs --name (the experiment to continue)")
    folder = local_folder(args)
    saved = folder / SEARCH_CONFIG
    if not saved.is_file():
        existing = sorted(p.parent.name for p in folder.parent.glob(f"*/{SEARCH_CONFIG}"))
        raise ValueError(f"no experiment {args.name!r} to resume in {folder.parent}"
                         + (f"; existing: {', '.join(existing)}" if existing else ""))
    settings = json.loads(saved.read_text())
    for key in ("space", "trainable", "encoder", "data", "weights", "max_epochs", "num_samples", "seed",
                "batch_size", "grace_period", "workers_per_trial", "gpus_per_worker"):
        setattr(args, key, settings[key])
    return settings, folder


def new_folder(args) -> Path:
    folder = local_folder(args)
    if (folder / SEARCH_CONFIG).exists():
        raise ValueError(f"experiment {args.name!r} already exists in {folder.parent}; "
                         f"add --resume to continue it or choose another --name")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.encoder_given = args.encoder is not None
    notes, settings, cluster = [], {}, None
    try:
        if args.resume:
            settings, folder = resumed_settings(args)
        else:
            if args.address:  # a cluster's GPUs decide the defaults, not this machine's
                cluster = start_ray(args.address)
                gpus = cluster.get("GPU", 0)
            else:
                import torch
                gpus = torch.cuda.device_count()
            notes = resolve_defaults(args, gpus)
            folder = new_folder(args)
        check_inputs(args)
        cluster = cluster or start_ray(args.address)
        from search.cluster import check_storage

        check_storage(args.storage, cluster, args.shared_storage)
        if not settings:
            settings = settings_from(args, cluster) | {"batch_size": args.batch_size}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SEARCH_CONFIG).write_text(json.dumps(settings, indent=1))
    except (ValueError, OSError, store.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # ShardError and the like: still a message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    announce(settings, notes, folder, args.resume)
    tuner = build_tuner(settings, args, folder, cluster)
    grid = tuner.fit()
    print_summary(grid, settings, folder)
    return 0 if not grid.errors else 1


def announce(settings: dict, notes: list[str], folder: Path, resumed: bool) -> None:
    exp = experiment_uri(settings["storage"], settings["name"])
    lines = [f"EchoTune search {'(resumed) ' if resumed else ''}{settings['name']}",
             *[f"  {n}" for n in notes],
             f"  space {settings['space']}, encoder {settings['encoder']}, {settings['num_samples']} trials x "
             f"{settings['max_epochs']} epochs, sampler {settings['sampler']}, scheduler {settings['scheduler']}, "
             f"{settings['max_concurrent']} at a time",
             f"  experiment folder: {exp}",
             f"  TensorBoard:       tensorboard --logdir {exp}",
             f"  Pareto front:      python -m search.pareto {folder}"]
    print("\n".join(lines), flush=True)


def print_summary(grid, settings: dict, folder: Path) -> None:
    from search.pareto import export, summary_table

    summary = export(folder)  # pareto.csv / .json / .png beside the study
    trials = summary["trials"]
    print(f"\nfinished: {len(trials)} trials, {summary['n_completed']} ran all {settings['max_epochs']} epochs, "
          f"{len(grid.errors)} errored; Pareto front of {len(summary['front'])} "
          f"(hypervolume {summary['hypervolume']:.3f}) in {folder}/pareto.png")
    print(summary_table(trials))
    print(f"\nnext: tensorboard --logdir {experiment_uri(settings['storage'], settings['name'])}    and    "
          f"python -m search.pareto {folder} --evaluate-test")


if __name__ == "__main__":
    sys.exit(main())
