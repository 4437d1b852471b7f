"""Search how much of a video foundation model to fine-tune for ED/ES landmarks: Ray Tune + Optuna + ASHA.

    python -m search.run --space selective_ft --data s3://bucket/echonet/v1 --encoder echoprime \\
        --weights /models/echo_prime_encoder.pt --storage s3://bucket/runs --per-cell 2

Each trial is a Ray Train DDP landmark trainer (trainables/). Every scientific cell of the space
(e.g. number of unfrozen blocks x head) is tried --per-cell times before the Optuna sampler may
exploit; nuisance parameters (learning rates, head options, augmentation) are tuned within each
cell; ASHA stops poor trials early, only against trials of the same cell. The Optuna study holds
the truth: COMPLETE only for trials that ran every epoch, PRUNED for stopped ones, FAIL with a
reason. Results land in <storage>/<name>/ (default results/<name>/), with everything --resume
needs; then ``python -m search.pareto results/<name>`` exports the front and the regimes table.

With no --data the embedded default runs: synthetic EchoNet-format data made once and cached, the
small ``tiny`` encoder (pretrained once on a synthetic pretext task) when there is no GPU, and a
short schedule. Its numbers say nothing about real echocardiograms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

from search import journal
from search.spaces import SPACES, get_space
from search.tuner import METRIC, MODE, experiment_uri, weights_map
from trainables.data import storage as store

SAMPLERS = ("tpe", "nsga2", "random", "qmc")
CELL_STARTS = ("centre", "sampled")  # search.study.CellwiseSampler.STARTS (not imported: --help stays light)
TRAINABLES = ("train", "rehearsal")
SCHEDULERS = ("asha", "asha-cells", "asha-pareto", "none")
DEMO_VIDEOS = 120
RESUMED_KEYS = ("space", "trainable", "encoder", "data", "weights", "max_epochs", "num_samples", "seed",
                "batch_size", "grace_period", "workers_per_trial", "gpus_per_worker", "per_cell")


class InputError(ValueError):
    """A flag or input that cannot work; raised before anything starts or is created."""


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
                   help="Optuna optimises (val_px_error, trainable_params) jointly; ASHA still ranks by val_px_error")
    g = p.add_argument_group("budget and scheduling")
    g.add_argument("--per-cell", type=int, default=None,
                   help="trials per scientific cell, enqueued before the sampler exploits (default 1 on CPU, "
                        "2 with GPUs; or --num-samples // cells)")
    g.add_argument("--num-samples", type=int, default=None,
                   help="trials in all (default cells x --per-cell; more leaves the extra to the sampler)")
    g.add_argument("--max-epochs", type=int, default=None, help="epochs per trial = ASHA max_t (default 4 / 20)")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before the first rung (default 1)")
    g.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor, >= 2 (default 2)")
    g.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler (default tpe)")
    g.add_argument("--cell-start", default=None, choices=CELL_STARTS,
                   help="--sampler tpe: a cell's first trial takes every nuisance parameter at the centre of its "
                        "range, e.g. a log-uniform LR in [1e-4, 1e-2] at 1e-3 (centre, the default: the first round "
                        "compares the cells at one shared setting), or draws them (sampled)")
    g.add_argument("--scheduler", default="asha", choices=SCHEDULERS,
                   help="early stopping: asha (default): ASHA within each scientific cell, and from ASHA's second "
                        "rung a trial is paused when one of another cell with fewer trainable parameters already "
                        "reported an error at least as low at that rung, to finish after every other trial (a good "
                        "front sooner; no trial stopped for it); asha-cells: ASHA within each cell only; asha-pareto: stop "
                        "such a trial instead of pausing it (cheapest; a regime may then have no completed trial); "
                        "none")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="per worker (default 4 on CPU, 16 on GPU)")
    g.add_argument("--cache-views", type=int, default=0,
                   help="augmented trials: N fixed augmented views per video, one drawn per epoch, so the frozen "
                        "prefix's output can be cached (default 0: a fresh augmentation every epoch, no cache)")
    g = p.add_argument_group("resources")
    g.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train (DDP) workers per trial")
    g.add_argument("--gpus-per-worker", type=int, default=None, help="default 1 if the cluster has GPUs, else 0")
    g.add_argument("--max-concurrent", type=int, default=None, help="default: cluster GPUs (or CPUs) / per trial")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a new local instance)")
    g = p.add_argument_group("where")
    g.add_argument("--storage", default="results", help="experiment storage: folder or s3://... (default results)")
    g.add_argument("--name", default=None, help="experiment name (default <space>-<encoder>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (found in --storage) after a crash, a kill or on a new head")
    g.add_argument("--shared-storage", action="store_true",
                   help="--storage is a folder mounted at the same path on every node (NFS)")
    g.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    g.add_argument("--cache-dir", default=None, help="node-local shard cache (default ~/.cache/echotune)")
    return p


def local_folder(args) -> Path:
    """Local experiment folder (the Optuna study's working copy, the search settings, the export)."""
    if store.is_remote(args.storage):
        return Path("results").resolve() / args.name
    return Path(args.storage).resolve() / args.name


# ---------------------------------------------------------------------------------------------
# Embedded default, defaults and input checks
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


def check_numbers(args) -> None:
    """Flags that cannot work, refused before anything else (0 is an error, not 'the default')."""
    check_no_credentials(args)
    if args.cache_views < 0:
        raise InputError(f"--cache-views must be 0 (off) or more, not {args.cache_views}")
    for flag in ("num_samples", "per_cell", "max_epochs", "workers_per_trial", "grace_period", "batch_size",
                 "max_concurrent"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if args.reduction_factor < 2:
        raise InputError(f"--reduction-factor must be at least 2 (ASHA keeps 1/rf of the trials at each rung), "
                         f"not {args.reduction_factor}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker must be 0 or more, not {args.gpus_per_worker}")
    if args.cell_start and args.sampler != "tpe":
        raise InputError(f"--cell-start applies to --sampler tpe only; --sampler {args.sampler} draws every trial "
                         f"itself (leave --cell-start out, or use --sampler tpe)")


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
    args.cell_start = args.cell_start or ("centre" if args.sampler == "tpe" else None)
    notes += resolve_budget(args, gpus)
    args.max_epochs = args.max_epochs or (20 if gpus else 4)
    args.batch_size = args.batch_size or (16 if gpus else 4)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1 if gpus else 0
    if args.name is None:
        args.name = f"{args.space}-{args.encoder}-{time.strftime('%Y%m%d-%H%M%S')}"
    return notes


def resolve_budget(args, gpus: float) -> list[str]:
    """Trials per cell and in all: every cell at least once, the rest left to the sampler."""
    space = get_space(args.space)
    n_cells = len(space.cells(args.encoder))
    grid = " x ".join(space.scientific)
    if args.num_samples is not None and args.num_samples < n_cells:
        raise InputError(f"--num-samples {args.num_samples} cannot try each of the {n_cells} cells of space "
                         f"{args.space!r} ({grid}) once; give --num-samples {n_cells} or more (or --per-cell N)")
    if args.per_cell is None:
        args.per_cell = args.num_samples // n_cells if args.num_samples else (2 if gpus else 1)
    if args.num_samples is None:
        args.num_samples = n_cells * args.per_cell
    if args.num_samples < n_cells * args.per_cell:
        raise InputError(f"--num-samples {args.num_samples} is below {n_cells} cells x --per-cell {args.per_cell}; "
                         f"give --num-samples {n_cells * args.per_cell} or more")
    extra = args.num_samples - n_cells * args.per_cell
    return [f"budget: {n_cells} cells ({grid}) x {args.per_cell} trial(s) each"
            + (f", then {extra} chosen by the sampler" if extra else "")]


def check_inputs(args) -> None:
    """Fail before starting anything when an input cannot work; every message says what to do."""
    from trainables.models.encoders import ENCODERS

    space = get_space(args.space)
    if args.encoder not in ENCODERS:
        raise InputError(f"unknown encoder {args.encoder!r}; choose one of {', '.join(ENCODERS)}")
    if space.choose_encoder:
        if args.encoder_given:
            raise InputError(f"space {args.space!r} chooses its encoders itself (among {', '.join(space.encoders)}); "
                             f"drop --encoder, or use a space for one encoder (selective_ft, frozen, full_ft)")
        unknown = set(weights_map(args.weights)) - set(space.encoders)
        if args.weights and (unknown or not weights_map(args.weights)):
            raise InputError(f"space {args.space!r} takes --weights as ENCODER=PATH pairs for "
                             f"{', '.join(space.encoders)} (e.g. echoprime=/models/ep.pt,panecho=/models/pe.pt)")
    else:
        try:
            space.check_encoder(args.encoder)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if args.scheduler != "none" and args.grace_period >= args.max_epochs:
        raise InputError(f"--grace-period {args.grace_period} must be below --max-epochs {args.max_epochs}")
    for uri in ([args.weights] if args.weights and not weights_map(args.weights) else []) + \
            list(weights_map(args.weights).values()):
        check_weights(uri, args.s3_endpoint)
    check_writable(args.storage, args.s3_endpoint)
    if args.trainable == "train":
        from trainables.data.stream import ShardSet

        ShardSet(args.data, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir)  # reachable, complete


def check_no_credentials(args) -> None:
    """URIs and the endpoint end up in the settings, every trial's config and TensorBoard's hparams:
    credentials (user:password@, a presigned URL's signature) must come from the AWS chain instead."""
    import re

    for flag in ("data", "weights", "storage", "s3_endpoint", "cache_dir"):
        value = str(getattr(args, flag, None) or "")
        if re.search(r"://[^/@\s]*:[^/@\s]*@", value) or re.search(r"[?&]X-Amz-(Signature|Credential|Security-Token)=",
                                                                     value, re.I):
            raise InputError(f"--{flag.replace('_', '-')} carries credentials (user:password@ or a presigned URL); "
                             f"they would be written into the experiment's settings and logs. Give the plain URI "
                             f"and the credentials through the usual AWS chain (environment, profile, instance role)")


def check_weights(uri: str, s3_endpoint: str | None) -> None:
    if uri == "torchvision":
        return
    try:
        fs, path = store.open_fs(uri, s3_endpoint)
        found = fs.isfile(path)
    except Exception as exc:
        raise store.storage_error(uri, s3_endpoint, exc, "find the weights file") from exc
    if not found:
        raise InputError(f"--weights {store.describe(uri, s3_endpoint)}: no such file; point it at your own copy "
                         f"of the encoder checkpoint (a local path or s3:// URI)")


def check_writable(storage: str, s3_endpoint: str | None) -> None:
    """The experiment storage exists and takes a write (a bucket that does not exist is refused)."""
    if not store.is_remote(storage):
        folder = Path(storage).resolve()
        parent = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if parent is None or not parent.is_dir() or not os_writable(parent):
            raise InputError(f"--storage {storage}: cannot create folders under {parent}")
        return
    probe = f"{storage.rstrip('/')}/.echotune-write-check-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = store.open_fs(probe, s3_endpoint)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as exc:
        raise store.storage_error(storage, s3_endpoint, exc, "write to the experiment storage") from exc


def os_writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


# ---------------------------------------------------------------------------------------------
# Settings: new or resumed
# ---------------------------------------------------------------------------------------------

def settings_from(args, cluster: dict) -> dict:
    from search.study import make_sampler

    space = get_space(args.space)
    _, sampler_notes = make_sampler(args.sampler, args.seed, scientific=space.scientific, per_cell=args.per_cell,
                                    num_samples=args.num_samples, cell_start=args.cell_start)
    return dict(space=args.space, trainable=args.trainable, encoder=args.encoder, weights=args.weights,
                weights_sha256=args.weights_sha256, data=args.data,
                storage=str(Path(args.storage).resolve()) if not store.is_remote(args.storage) else args.storage,
                name=args.name, num_samples=args.num_samples, per_cell=args.per_cell, max_epochs=args.max_epochs,
                grace_period=args.grace_period, reduction_factor=args.reduction_factor, sampler=args.sampler,
                cell_start=args.cell_start, sampler_notes=sampler_notes, scheduler=args.scheduler, seed=args.seed,
                multi_objective=args.multi_objective, workers_per_trial=args.workers_per_trial,
                gpus_per_worker=args.gpus_per_worker, max_concurrent=concurrency(args, cluster), metric=METRIC,
                mode=MODE, study_name=f"{args.name}-{uuid.uuid4().hex[:8]}", batch_size=args.batch_size,
                s3_endpoint=store.safe_url(store.s3_endpoint(args.s3_endpoint)) if store.s3_endpoint(
                    args.s3_endpoint) else None,
                cells=[get_space(args.space).cell_of(c) for c in space.cells(args.encoder)],
                cache_views=args.cache_views, code=code_version())


def code_version(root: Path | None = None) -> str:
    """Which EchoTune runs: the git commit of its checkout ``root`` (default: this file's; ``+modified``
    when tracked files differ from it), else the installed package's version."""
    import subprocess

    root = (root or Path(__file__).parents[1]).resolve()

    def git(*cmd):
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    try:
        # only EchoTune's own checkout: an installed copy may sit inside someone else's repository
        if Path(git("rev-parse", "--show-toplevel")).resolve() == root:
            return f"git {git('rev-parse', '--short=12', 'HEAD')}" + (
                "+modified" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"echotune {version('echotune')}"
    except PackageNotFoundError:
        return "unknown"


def note_code_change(settings: dict) -> None:
    """A resumed search runs today's code: trials it starts may not compare with the earlier ones
    (a changed head init, say), and nothing else would tell."""
    started, now = settings.get("code"), code_version()
    if started != now:
        print(f"note: this experiment was started by EchoTune {started or '(a version that did not record it)'}; "
              f"this is {now}: trials run from now on use this code, so compare them with the earlier "
              f"ones with care", flush=True)


def concurrency(args, cluster: dict) -> int:
    if args.max_concurrent:
        return args.max_concurrent
    if args.gpus_per_worker > 0:
        return max(1, int(cluster.get("GPU", 0) // (args.workers_per_trial * args.gpus_per_worker)))
    from search.cluster import driver_resources
    per_trial = args.workers_per_trial + driver_resources(cluster).get("CPU", 0)
    return max(1, int(cluster.get("CPU", 1) // per_trial))


def resumed_settings(args) -> tuple[dict, journal.Journal]:
    """The saved settings of the experiment --name, pulled from its storage when this head lacks them."""
    if not args.name:
        raise InputError("--resume needs --name (the experiment to continue)")
    folder = local_folder(args)
    exp = experiment_uri(str(Path(args.storage).resolve()) if not store.is_remote(args.storage) else args.storage,
                         args.name)
    j = journal.Journal(folder, exp, args.s3_endpoint)
    try:  # a new head takes the storage's copies; an old one only if the storage is ahead of it
        pulled = j.pull()
    except store.StorageError as exc:
        raise InputError(str(exc)) from None
    if pulled:
        print(f"resume: restored {', '.join(pulled)} from {store.describe(exp, args.s3_endpoint)}", flush=True)
    if not (folder / journal.SETTINGS_FILE).is_file():
        existing = sorted(p.parent.name for p in folder.parent.glob(f"*/{journal.SETTINGS_FILE}"))
        raise InputError(f"no experiment {args.name!r} to resume in {store.describe(exp, args.s3_endpoint)}"
                         + (f"; existing here: {', '.join(existing)}" if existing else ""))
    settings = json.loads((folder / journal.SETTINGS_FILE).read_text())
    # an experiment from before --cell-start drew its cells' first trials: it goes on so
    settings.setdefault("cell_start", "sampled" if settings.get("sampler") == "tpe" else None)
    warn_ignored(args, settings)
    note_code_change(settings)
    for key in RESUMED_KEYS:
        if key in settings:
            setattr(args, key, settings[key])
    here = exp.rsplit("/", 1)[0]  # where the experiment is now (a moved folder, another head)
    if settings["storage"].rstrip("/") != here.rstrip("/"):
        print(f"resume: the experiment was created in {settings['storage']}; continuing it in "
              f"{store.describe(exp, args.s3_endpoint)}", flush=True)
        settings["storage"] = here
        journal.write_json(folder / journal.SETTINGS_FILE, settings)
    from search.tuner import can_restore

    if can_restore(settings, args.s3_endpoint):  # Tune ran: its searcher state points into the study
        check_study(settings, folder)
    elif (folder / journal.STUDY_FILE).is_file():
        print(f"resume: Tune's state of {args.name!r} was never saved (killed at its start); starting its "
              f"trials again, with the study's", flush=True)
    return settings, j


IGNORED_ON_RESUME = ("space", "encoder", "weights", "data", "num_samples", "per_cell", "max_epochs", "seed",
                     "batch_size", "grace_period", "reduction_factor", "sampler", "cell_start", "scheduler",
                     "multi_objective",
                     "workers_per_trial", "gpus_per_worker", "trainable")


def warn_ignored(args, settings: dict) -> None:
    """--resume continues the saved search: say which given flags it does not take."""
    defaults = vars(parser().parse_args([]))
    ignored = [f"--{k.replace('_', '-')}" for k in IGNORED_ON_RESUME
               if getattr(args, k, None) != defaults.get(k) and getattr(args, k, None) != settings.get(k)]
    if ignored:
        print(f"note: --resume continues the saved search; ignoring {', '.join(ignored)}", flush=True)


def check_study(settings: dict, folder: Path) -> None:
    """A resumable experiment has its study (a missing one used to surface as a KeyError in ask())."""
    import optuna

    from search.study import study_url

    if not (folder / journal.STUDY_FILE).is_file():
        raise InputError(f"experiment {settings['name']!r} has no {journal.STUDY_FILE} here or in its storage; "
                         f"its Optuna study is lost and it cannot be resumed")
    names = [s.study_name for s in optuna.get_all_study_summaries(study_url(folder))]
    if settings["study_name"] not in names:
        raise InputError(f"{folder / journal.STUDY_FILE} lacks study {settings['study_name']!r} "
                         f"(has {', '.join(names) or 'none'}); the experiment cannot be resumed")


def new_experiment(args) -> tuple[Path, journal.Journal]:
    folder = local_folder(args)
    exp = experiment_uri(str(Path(args.storage).resolve()) if not store.is_remote(args.storage) else args.storage,
                         args.name)
    j = journal.Journal(folder, exp, args.s3_endpoint)
    if (folder / journal.SETTINGS_FILE).exists() or (j.remote and j.exists_remotely()):
        raise InputError(f"experiment {args.name!r} already exists in {store.describe(exp, args.s3_endpoint)}; "
                         f"add --resume to continue it or choose another --name")
    return folder, j


def base_config(args, settings: dict) -> dict:
    from trainables.config import DataCfg, EncoderCfg, TrialConfig

    weights = None if weights_map(settings.get("weights")) else settings.get("weights")
    cfg = TrialConfig(encoder=EncoderCfg(settings["encoder"], weights=weights,
                                         weights_sha256=settings.get("weights_sha256")),
                      data=DataCfg(uri=settings["data"], s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir,
                                   batch_size=settings["batch_size"]),
                      epochs=settings["max_epochs"], seed=settings["seed"], workers=settings["workers_per_trial"],
                      cache_views=settings.get("cache_views", 0),
                      use_gpu=settings["gpus_per_worker"] > 0,
                      storage=experiment_uri(settings["storage"], settings["name"]))
    return cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def prepare(args) -> tuple[dict, journal.Journal, list[str], dict | None, bool]:
    """Everything before the Tuner: settings, checks, the experiment folder; nothing is created
    until every check has passed. Returns (settings, journal, notes, cluster, created)."""
    from search.tuner import start_ray

    check_numbers(args)
    if args.resume:
        settings, j = resumed_settings(args)
        return settings, j, [], None, False
    cluster = None
    if args.address:  # a cluster's GPUs decide the defaults, not this machine's
        cluster = start_ray(args.address)
        gpus = cluster.get("GPU", 0)
        if not gpus and args.gpus_per_worker is None and args.trainable == "train":
            raise InputError("the cluster at --address has no GPU node (yet: an autoscaled pool starts at 0); "
                             "say what trials need: --gpus-per-worker 1 (and --max-concurrent N) to train on GPU "
                             "nodes the autoscaler adds, or --gpus-per-worker 0 to train on CPUs")
        gpus = gpus or args.gpus_per_worker or 0
    else:
        import torch
        gpus = torch.cuda.device_count()
    notes = resolve_defaults(args, gpus)
    check_inputs(args)
    folder, j = new_experiment(args)
    return {}, j, notes, cluster, True


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.encoder_given = args.encoder is not None
    j = None
    created = False
    try:
        settings, j, notes, cluster, fresh = prepare(args)
        from search.cluster import check_storage
        from search.tuner import start_ray

        cluster = cluster or start_ray(args.address)
        check_storage(args.storage, cluster, args.shared_storage)
        check_gpus(args, cluster)
        if fresh:
            settings = settings_from(args, cluster)
            notes += settings["sampler_notes"]
            j.local.mkdir(parents=True, exist_ok=True)
            created = True
            journal.write_json(j.local / journal.SETTINGS_FILE, settings)
            j.push((journal.SETTINGS_FILE,))
    except (InputError, ValueError, OSError, store.StorageError) as exc:
        return fail(exc, j if created else None)
    except Exception as exc:  # ShardError and the like: still one line, not a traceback
        return fail(exc, j if created else None, prefix=f"{type(exc).__name__}: ")
    return run(args, settings, j, notes, cluster)


def check_gpus(args, cluster: dict) -> None:
    """Trials that ask for GPUs on a local instance without any would wait for them for ever."""
    if args.gpus_per_worker and not cluster.get("GPU") and not args.address:
        raise InputError(f"--gpus-per-worker {args.gpus_per_worker} asks for GPUs, but this machine's Ray instance has "
                         f"none; use --gpus-per-worker 0 (CPU), or --address of a cluster with GPU nodes")


def fail(exc: BaseException, created: journal.Journal | None, prefix: str = "") -> int:
    """One line on stderr; an experiment folder made by this run is removed so the name stays free."""
    if created is not None:
        shutil.rmtree(created.local, ignore_errors=True)
    print(f"error: {prefix}{exc}", file=sys.stderr)
    return 2


def run(args, settings: dict, j: journal.Journal, notes: list[str], cluster: dict) -> int:
    from search.tuner import build_tuner, can_restore, restore_tuner

    restoring = args.resume and can_restore(settings, args.s3_endpoint)
    announce(settings, notes, j.local, args.resume)
    if restoring:
        tuner = restore_tuner(settings, cluster, args.s3_endpoint)
    else:  # new, or a resumed experiment that never got as far as Tune's first snapshot
        tuner = build_tuner(settings, base_config(args, settings), j.local, cluster, args.s3_endpoint,
                            resumed=args.resume)
    grid = tuner.fit()
    try:
        j.push()
    except store.StorageError as exc:
        print(f"warning: the final study could not be copied to the experiment storage: {exc}", file=sys.stderr)
    return print_summary(grid, settings, j.local)


def announce(settings: dict, notes: list[str], folder: Path, resumed: bool) -> None:
    exp = experiment_uri(settings["storage"], settings["name"])
    lines = [f"EchoTune search {'(resumed) ' if resumed else ''}{settings['name']}",
             *[f"  {n}" for n in notes],
             f"  space {settings['space']}, encoder {settings['encoder']}, {settings['num_samples']} trials "
             f"({settings['per_cell']} per cell) x {settings['max_epochs']} epochs, sampler {settings['sampler']}, "
             f"scheduler {settings['scheduler']}, {settings['max_concurrent']} at a time",
             f"  experiment folder: {exp}",
             f"  TensorBoard:       tensorboard --logdir {exp}",
             f"  Optuna study:      optuna-dashboard sqlite:///{folder / journal.STUDY_FILE}",
             f"  Pareto front:      python -m search.pareto {folder}"]
    print("\n".join(lines), flush=True)


def print_summary(grid, settings: dict, folder: Path) -> int:
    from search.pareto import export, pareto_stops, summary_table

    try:
        summary = export(folder)  # pareto.csv / .json / .png and regimes.csv / .md beside the study
    except (ValueError, store.StorageError) as exc:
        print(f"\nno Pareto export: {exc}", file=sys.stderr)
        return 1
    trials = summary["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    paused = len(pareto_stops(folder, "deferred"))
    print(f"\nfinished: {len(trials)} trials: {states['COMPLETE']} ran all {settings['max_epochs']} epochs, "
          f"{states['PRUNED']} stopped early, {states['FAIL']} failed"
          f"{f' ({paused} paused as dominated and resumed last)' if paused else ''}; "
          f"Pareto front of {len(summary['front'])} "
          f"(hypervolume {summary['hypervolume']:.3g}) in {folder}/pareto.png")
    print(summary_table(trials))
    print(f"\nregimes: {folder}/regimes.md")
    print(f"next: tensorboard --logdir {experiment_uri(settings['storage'], settings['name'])}    and    "
          f"python -m search.pareto {folder} --evaluate-test")
    return 0 if not grid.errors else 1


if __name__ == "__main__":
    sys.exit(main())
