"""The per-worker training loop (one Ray Train worker = one DDP rank).

setup (config, model, freezing, optimiser, data, resume) -> per epoch: train, validate over the
whole validation split (all-reduced), report one flat metrics dict with a checkpoint.

* Randomness: initial weights come from ``seed`` on every rank (identical models), then each rank
  reseeds from (seed, rank), so dropout and stochastic depth differ between ranks.
* Checkpoints hold the model, optimiser, global step, next epoch, every RNG state (Python, NumPy,
  torch CPU and CUDA, in types ``torch.load(weights_only=True)`` accepts), the metrics history and
  ``complete.json`` (written last); they are loaded on the CPU whatever the device. A restarted
  worker group resumes from the run's newest complete checkpoint (trainables/checkpoints.py) and
  continues bit for bit as an uninterrupted run would (tests/test_regimes.py).
* Gradient accumulation divides each group's loss by the group's real size (the last group of an
  epoch may be short); under bf16 autocast only the encoder runs in bf16, the head in fp32.
* Frozen-prefix feature cache (``feature_cache.py``): with part of the encoder frozen (split > 0)
  and ``data.feature_cache`` on, the frozen prefix of each validation clip, and of each training
  clip when training clips are deterministic (aug_strength 0, or ``cache_views`` fixed views), is
  read from the node's cache or computed here in one batch and stored; only the suffix and the head
  run on it, under the same DDP wrapper and autocast. Entries are pure functions of (weights, clip)
  and computing them draws no random numbers, so hits, misses and resumes give the same run.
  Each epoch reports ``feature_cache`` (0/1), ``feature_cache_train`` (0/1) and the all-reduced
  ``feature_cache_hits`` / ``feature_cache_misses``.
* A non-finite training loss or validation error ends the run at that epoch with a reason
  (``non_finite`` in the metrics, ``stopped.json`` in the last checkpoint); the search fails the
  trial and goes on.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainables import feature_cache
from trainables.augment import Augment, jittered_clip_indices
from trainables.checkpoints import mark_complete
from trainables.config import TrialConfig
from trainables.data.stream import EchoClipDataset, make_loader
from trainables.metrics import LandmarkMetrics
from trainables.models.encoders import build_encoder, set_drop_path
from trainables.models.freezing import freeze, param_groups
from trainables.models.heads import LandmarkModel, build_head

CHECKPOINT_FILE, CONFIG_FILE, HISTORY_FILE = "state.pt", "config.json", "history.json"  # see tune_report.py
STOPPED_FILE = "stopped.json"  # a run that stopped for a non-finite loss: its last checkpoint has no state


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------

def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of every group's base LR at ``step``: linear warm-up, then cosine to 0 or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class JitteredClips:
    """``augment.jittered_clip_indices(s)`` as a picklable object: spawned DataLoader workers
    (num_workers > 0) get the dataset by pickling, and a closure does not pickle."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, ed: int, es: int, rng: np.random.Generator) -> np.ndarray:
        return jittered_clip_indices(self.strength)(ed, es, rng)


def build_model(cfg: TrialConfig, load_weights: bool = True) -> tuple[LandmarkModel, list[str]]:
    """Encoder (weights loaded first, then LoRA adapters if ``encoder.lora``), head, freezing."""
    encoder = build_encoder(cfg.encoder.name, cfg.encoder.weights if load_weights else None,
                            cfg.encoder.weights_sha256)
    set_drop_path(encoder, cfg.encoder.drop_path)
    head = build_head(cfg.head.type, encoder.embed_dim, **cfg.head.options())
    groups = freeze(encoder, cfg.encoder.n_unfrozen, cfg.encoder.lora)
    return LandmarkModel(encoder, head), groups


def accum_group_size(i: int, n_batches: int, accum: int) -> int:
    """Number of batches in the gradient-accumulation group of batch ``i`` (the last may be short)."""
    start = i - i % accum
    return min(accum, n_batches - start)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def make_optimizer(cfg: TrialConfig, model: LandmarkModel, groups: list[str]) -> torch.optim.Optimizer:
    pg = param_groups(model.encoder, model.head, groups, cfg.optim.lr, cfg.optim.base_lr, cfg.optim.weight_decay)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(pg, momentum=0.9)
    return (torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam)(pg)


def unpickling_problem(exc: Exception) -> tuple[bool, str]:
    """(whether ``torch.load(weights_only=True)`` refused a Python object, i.e. possible code, and
    the line that says what it was)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    named = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[-1] if lines else "")
    return "GLOBAL" in str(exc), named[:200]


def load_state(path: Path) -> dict:
    """A checkpoint's state, loaded with ``weights_only=True`` onto the CPU: tensors and plain data
    only, so a planted pickle payload is refused instead of run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code, what = unpickling_problem(exc)
        if code:
            raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors and plain "
                             f"data, which could run code ({what}). Checkpoints written by EchoTune never do.") from None
        raise ValueError(f"{path}: not a PyTorch checkpoint ({what})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank``'s random streams (dropout, stochastic depth), distinct per rank."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rng_state() -> dict:
    """Every random stream of this process, in types ``torch.load(weights_only=True)`` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``; the tensors may have been loaded onto any device."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():  # per visible device; a restart may see fewer
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class Trial:
    """State of one rank's training run; ``run()`` is the whole loop."""

    def __init__(self, cfg: TrialConfig, rank: int, world_size: int, device: torch.device, report):
        self.cfg, self.rank, self.world, self.device, self.report = cfg, rank, world_size, device, report
        seed_everything(cfg.seed)  # identical initial weights on every rank ...
        self.model, self.groups = build_model(cfg)
        seed_everything(rank_seed(cfg.seed, rank))  # ... but each rank its own dropout / drop-path stream
        self.trainable, self.total = count_params(self.model)
        self.head_params = sum(p.numel() for p in self.model.head.parameters())
        self.history: list[dict] = []  # every epoch's metrics so far (kept in each checkpoint)
        self.stopped: str | None = None  # why the run ended early (a non-finite loss or metric)
        self.after_report: Callable[[], None] | None = None  # run once after the next report
        self.optimizer = make_optimizer(cfg, self.model, self.groups)
        self.data_kwargs = dict(seed=cfg.seed, s3_endpoint=cfg.data.s3_endpoint, cache_dir=cfg.data.cache_dir)
        s = cfg.aug_strength
        views = cfg.cache_views if s > 0 else 0  # without augmentation every view would be the same
        aug = dict(clip_fn=JitteredClips(s), transform=Augment(s)) if s > 0 else {}
        if views:  # a fixed pool of augmented views, one drawn per epoch (feature_cache.ViewDataset)
            base = EchoClipDataset(cfg.data.uri, cfg.data.train_split, **(self.data_kwargs | {
                "seed": feature_cache.VIEW_SEED}), **aug)
            self.train_ds = feature_cache.ViewDataset(base, views, seed=cfg.seed)
        else:
            self.train_ds = EchoClipDataset(cfg.data.uri, cfg.data.train_split, **self.data_kwargs, **aug)
        self.val_ds = EchoClipDataset(cfg.data.uri, cfg.data.val_split, **self.data_kwargs)
        self.features = feature_cache.for_trial(cfg, self.model, device)  # None: off, or nothing frozen
        self.cache_train = self.features is not None and (s == 0 or views > 0)  # deterministic inputs only
        self.view_tag = feature_cache.view_tag(s) if views else None
        self.shards = ({**feature_cache.shard_map(self.train_ds), **feature_cache.shard_map(self.val_ds)}
                       if self.features else {})
        self.cache_counts = [0, 0]  # this epoch's hits and misses on this rank
        per_rank = len(self.train_ds) // world_size
        if per_rank == 0:
            raise ValueError(f"{cfg.data.uri}: {len(self.train_ds)} training videos for {world_size} workers")
        # Optimiser steps (what the LR schedule counts): batches per epoch over gradient accumulation.
        self.steps_per_epoch = math.ceil(math.ceil(per_rank / cfg.data.batch_size) / cfg.optim.grad_accum)
        self.epoch, self.step = 0, 0

    def wrap(self, prepare) -> None:
        self.model = prepare(self.model)

    @property
    def core(self) -> LandmarkModel:
        return getattr(self.model, "module", self.model)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        torch.save({"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "next_epoch": self.epoch + 1, "rng": rng_state()}, folder / CHECKPOINT_FILE)
        (folder / CONFIG_FILE).write_text(self.cfg.to_json())
        (folder / HISTORY_FILE).write_text(json.dumps(self.history))
        mark_complete(folder, self.epoch + 1)

    def save_stopped(self, folder: Path, reason: str) -> None:
        """The last checkpoint of a diverged run: its history and why, but no weights worth resuming."""
        (folder / CONFIG_FILE).write_text(self.cfg.to_json())
        (folder / HISTORY_FILE).write_text(json.dumps(self.history))
        (folder / STOPPED_FILE).write_text(json.dumps({"reason": reason, "epoch": self.epoch + 1}))
        mark_complete(folder, self.epoch + 1)

    def restore(self, folder: Path) -> None:
        history = folder / HISTORY_FILE
        self.history = json.loads(history.read_text()) if history.is_file() else []
        if (folder / STOPPED_FILE).is_file():  # the run already ended on a non-finite loss
            self.stopped = json.loads((folder / STOPPED_FILE).read_text())["reason"]
            self.epoch = self.cfg.epochs
            return
        # Loaded onto the CPU whatever the device: the RNG states must stay CPU tensors, and
        # load_state_dict copies weights and optimiser state onto the parameters' own device.
        state = load_state(folder / CHECKPOINT_FILE)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["next_epoch"]
        set_rng_state(state["rng"])

    # --- epochs -------------------------------------------------------------------------------
    def set_lr(self) -> dict[str, float]:
        total = self.cfg.epochs * self.steps_per_epoch
        warmup = int(self.cfg.optim.warmup_epochs * self.steps_per_epoch)
        f = lr_factor(self.step, total, warmup, self.cfg.optim.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}

    def train_epoch(self) -> tuple[float, float]:
        self.model.train()
        loader = make_loader(self.train_ds, batch_size=self.cfg.data.batch_size, epoch=self.epoch, rank=self.rank,
                             world_size=self.world, num_workers=self.cfg.data.num_workers)
        accum, n_batches = self.cfg.optim.grad_accum, len(loader)
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            inputs, target = self.inputs(batch, self.cache_train), batch["landmarks"].to(self.device)
            last = (i + 1) % accum == 0 or i + 1 == n_batches
            group = accum_group_size(i, n_batches, accum)
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else nullcontext()
            with sync:
                with self.autocast():
                    loss = F.mse_loss(self.model(**inputs).float(), target)
                (loss / group).backward()  # the group's mean loss, also for a short last group
            if last:
                self.set_lr()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
            loss_sum += loss.item() * len(target)
            n += len(target)
        elapsed = time.perf_counter() - t0
        loss_sum, n = _all_reduce([loss_sum, n], self.device)  # ranks step together: global samples / wall time
        return loss_sum / max(n, 1), n / max(elapsed, 1e-9)

    @torch.no_grad()
    def validate(self) -> tuple[dict, list]:
        core = self.core.eval()  # not the DDP wrapper: ranks may hold different numbers of batches
        metrics, overlays = LandmarkMetrics(), []
        loader = make_loader(self.val_ds, batch_size=self.cfg.data.batch_size, epoch=0, rank=self.rank,
                             world_size=self.world, shuffle=False, equal=False,
                             num_workers=self.cfg.data.num_workers)
        for batch in loader:
            inputs = self.inputs(batch, self.features is not None)  # validation clips are deterministic
            with self.autocast():
                pred = core(**inputs).float()
            metrics.update(pred, batch["landmarks"], batch["ef"])
            if self.rank == 0 and len(overlays) < self.cfg.overlay_videos:
                overlays += [(batch["file_name"][b], batch["clip"][b].numpy(), pred[b].cpu().numpy(),
                              batch["landmarks"][b].numpy()) for b in range(len(pred))]
        return metrics.compute(), overlays[: self.cfg.overlay_videos]

    def inputs(self, batch: dict, cached: bool) -> dict:
        """The model's keyword inputs for a batch: the clip, or (``cached``) the frozen prefix from the
        feature cache, the misses computed here in one batch (autocast as the trainer's) and stored."""
        if not cached:
            return {"clip": batch["clip"].to(self.device)}
        core = self.core

        def compute(rows: list[int]) -> list:
            with self.autocast():
                return core.prefix_samples(core.prefix(batch["clip"][rows].to(self.device)))

        keys = feature_cache.batch_keys(batch, self.shards, self.view_tag)
        samples, hits, misses = self.features.fetch(keys, compute, self.device)
        self.cache_counts[0] += hits
        self.cache_counts[1] += misses
        return {"prefix": core.prefix_batch(samples)}

    def cache_metrics(self) -> dict:
        """This epoch's feature-cache counters, summed over ranks (every rank must call it)."""
        hits, misses = _all_reduce([float(c) for c in self.cache_counts], self.device)
        return {"feature_cache": int(self.features is not None), "feature_cache_train": int(self.cache_train),
                "feature_cache_hits": int(hits), "feature_cache_misses": int(misses)}

    def epoch_metrics(self, train_loss: float, samples_per_s: float, val: dict, lrs: dict) -> dict:
        # `epoch` counts completed epochs (1..epochs): ASHA's time_attr and max_t use it.
        return {"epoch": self.epoch + 1, "train_loss": train_loss, **val, "trainable_params": self.trainable,
                "encoder_trainable_params": self.trainable - self.head_params, "head_params": self.head_params,
                "total_params": self.total, "samples_per_s": samples_per_s, **lrs}

    def replay_missing(self, tune_epoch: int) -> None:
        """Report again the epochs this run finished before a kill that Tune never recorded (a kill
        between Train persisting a checkpoint and Tune recording its result), even when no epoch is
        left to train. Every rank restored the same history, so every rank reports equally often."""
        for past in self.history:
            if past.get("epoch", 0) > tune_epoch:
                self.report(past | {"replayed": 1}, None)

    def run(self) -> str | None:
        """Train to ``cfg.epochs``; returns why it stopped early (a non-finite loss or metric), else None."""
        tb = TensorBoard(self.cfg) if self.rank == 0 and self.cfg.tensorboard else None
        reason = self.stopped
        while self.epoch < self.cfg.epochs and reason is None:
            lrs = self.set_lr()
            self.cache_counts = [0, 0]
            train_loss, samples_per_s = self.train_epoch()
            # The loss is all-reduced, so every rank takes the same branch (report is a barrier).
            val = self.validate() if math.isfinite(train_loss) else ({"val_px_error": math.nan}, [])
            metrics = self.epoch_metrics(train_loss, samples_per_s, val[0], lrs) | self.cache_metrics()
            reason = non_finite_reason(metrics, self.cfg)
            if reason:
                metrics["non_finite"] = reason
            self.history.append({k: v for k, v in metrics.items() if not k.startswith("lr/")})
            if tb:
                tb.write(metrics, val[1], self.epoch + 1)
            if self.rank == 0:
                print(f"[epoch {self.epoch + 1}/{self.cfg.epochs}] " + " ".join(
                    f"{k}={_fmt(v)}" for k, v in metrics.items() if not k.startswith("lr/")), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                if self.rank == 0 and reason:  # a diverged model is not worth resuming from: no weights
                    self.save_stopped(Path(tmp), reason)
                elif self.rank == 0:
                    self.save(Path(tmp))
                self.report(metrics, Path(tmp) if self.rank == 0 else None)
            if self.after_report is not None:
                self.after_report()
                self.after_report = None
            self.epoch += 1
        if tb:
            tb.close()
        if reason and self.rank == 0:
            print(f"[stopped] {reason}", flush=True)
        return reason


def non_finite_reason(metrics: dict, cfg: TrialConfig) -> str | None:
    """Why a trial cannot go on: its training loss or validation error is NaN or infinite."""
    for key in ("train_loss", "val_px_error"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            lrs = ", ".join(f"{k}={v:g}" for k, v in {"base": cfg.optim.base_lr, **cfg.optim.lr}.items())
            return (f"{key} is {value} at epoch {metrics['epoch']}: training diverged (learning rates {lrs}); "
                    f"lower the learning rate")
    return None


class TensorBoard:
    """Rank-0 scalars and landmark overlays, under ``<storage>/<name>/tensorboard``."""

    def __init__(self, cfg: TrialConfig):
        from torch.utils.tensorboard import SummaryWriter

        from trainables.data import storage

        self.remote = f"{cfg.storage.rstrip('/')}/{cfg.name}/tensorboard"
        self.is_remote = storage.is_remote(cfg.storage)
        self.local = Path(tempfile.mkdtemp(prefix="echotune-tb-")) if self.is_remote else Path(self.remote)
        self.writer = SummaryWriter(str(self.local))
        self.cfg = cfg

    def write(self, metrics: dict, overlays: list, epoch: int) -> None:
        from trainables.data.inspect import draw_points, magnify

        for k, v in metrics.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(k if "/" in k else f"trial/{k}", v, epoch)
        for name, clip, pred, true in overlays:  # ED | ES; true green, predicted red
            panels = [draw_points(draw_points(magnify(frame), true[f], (0, 220, 0)), pred[f], (0, 0, 255))
                      for f, frame in ((0, clip[0]), (1, clip[-1]))]
            self.writer.add_image(f"landmarks/{name}", np.hstack(panels)[..., ::-1], epoch, dataformats="HWC")
        self.writer.flush()
        if self.is_remote:
            from trainables.data import storage

            fs, path = storage.open_fs(self.remote, self.cfg.data.s3_endpoint)
            fs.put(str(self.local) + "/", path + "/", recursive=True)

    def close(self) -> None:
        self.writer.close()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``): ``config`` is a trial
    config dict, or ``{"trial": ..., "tune_epoch": n}`` when a restarted Tune trial already holds
    epochs 1..n (trainables/driver.py)."""
    import ray.train
    import ray.train.torch

    tune_epoch = int(config.get("tune_epoch", 0)) if "trial" in config else 0
    cfg = TrialConfig.from_dict(config.get("trial", config)).validate()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    trial = Trial(cfg, ctx.get_world_rank(), ctx.get_world_size(), device,
                  report=lambda m, folder: ray.train.report(
                      m, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None))
    trial.wrap(ray.train.torch.prepare_model)
    resume(trial, cfg, ray.train.get_checkpoint())
    trial.replay_missing(tune_epoch)
    trial.run()


def resume(trial: Trial, cfg: TrialConfig, given) -> None:
    """Restore from the run's newest complete checkpoint, which Train may not have registered
    (trainables/checkpoints.py); every rank restores the one rank 0 chose."""
    from trainables import checkpoints

    run = f"{cfg.storage.rstrip('/')}/{cfg.name}"
    found = [checkpoints.tidy(run, cfg.data.s3_endpoint) if trial.rank == 0 else None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(found, src=0)
    found = found[0]
    if found is None:  # nothing of ours (or a run older than complete.json): Train's own choice
        if given is not None:
            with given.as_directory() as folder:
                trial.restore(Path(folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trial.restore(checkpoints.fetch(run, found, Path(tmp), cfg.data.s3_endpoint))
    if not found.registered and trial.rank == 0:  # gone once Train has registered a newer one
        trial.after_report = lambda: checkpoints.remove(run, found, cfg.data.s3_endpoint)
