"""The per-worker training loop (one Ray Train worker = one DDP rank).

setup (config, model, freezing, optimiser, data, resume) -> per epoch: train, validate over the
whole validation split (all-reduced), report one flat metrics dict with a checkpoint.
A checkpoint holds the model, optimiser, global step, next epoch, and RNG states, so a restarted
worker group continues exactly at the next epoch with the same sample order.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.augment import Augment, jittered_clip_indices
from trainables.config import TrialConfig
from trainables.data.stream import EchoClipDataset, make_loader
from trainables.metrics import LandmarkMetrics
from trainables.models.encoders import build_encoder
from trainables.models.freezing import freeze, param_groups
from trainables.models.heads import LandmarkModel, build_head

CHECKPOINT_FILE, CONFIG_FILE = "state.pt", "config.json"


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


def build_model(cfg: TrialConfig, load_weights: bool = True) -> tuple[LandmarkModel, list[str]]:
    encoder = build_encoder(cfg.encoder.name, cfg.encoder.weights if load_weights else None,
                            cfg.encoder.weights_sha256)
    head = build_head(cfg.head.type, encoder.embed_dim, **cfg.head.options())
    groups = freeze(encoder, cfg.encoder.n_unfrozen)
    return LandmarkModel(encoder, head), groups


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def make_optimizer(cfg: TrialConfig, model: LandmarkModel, groups: list[str]) -> torch.optim.Optimizer:
    pg = param_groups(model.encoder, model.head, groups, cfg.optim.lr, cfg.optim.base_lr, cfg.optim.weight_decay)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(pg, momentum=0.9)
    return (torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam)(pg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class Trial:
    """State of one rank's training run; ``run()`` is the whole loop."""

    def __init__(self, cfg: TrialConfig, rank: int, world_size: int, device: torch.device, report):
        self.cfg, self.rank, self.world, self.device, self.report = cfg, rank, world_size, device, report
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model, self.groups = build_model(cfg)
        self.trainable, self.total = count_params(self.model)
        self.optimizer = make_optimizer(cfg, self.model, self.groups)
        self.data_kwargs = dict(seed=cfg.seed, s3_endpoint=cfg.data.s3_endpoint, cache_dir=cfg.data.cache_dir)
        s = cfg.aug_strength
        self.train_ds = EchoClipDataset(cfg.data.uri, cfg.data.train_split, **self.data_kwargs,
                                        clip_fn=jittered_clip_indices(s) if s > 0 else None,
                                        transform=Augment(s) if s > 0 else None)
        self.val_ds = EchoClipDataset(cfg.data.uri, cfg.data.val_split, **self.data_kwargs)
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

    def restore(self, folder: Path) -> None:
        state = torch.load(folder / CHECKPOINT_FILE, map_location=self.device, weights_only=False)
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
        accum, loss_sum, n, t0 = self.cfg.optim.grad_accum, 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            clip, target = batch["clip"].to(self.device), batch["landmarks"].to(self.device)
            last = (i + 1) % accum == 0 or i + 1 == len(loader)
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else nullcontext()
            with sync:
                with self.autocast():
                    loss = F.mse_loss(self.model(clip).float(), target)
                (loss / accum).backward()
            if last:
                self.set_lr()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
            loss_sum += loss.item() * len(clip)
            n += len(clip)
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
            with self.autocast():
                pred = core(batch["clip"].to(self.device)).float()
            metrics.update(pred, batch["landmarks"], batch["ef"])
            if self.rank == 0 and len(overlays) < self.cfg.overlay_videos:
                overlays += [(batch["file_name"][b], batch["clip"][b].numpy(), pred[b].cpu().numpy(),
                              batch["landmarks"][b].numpy()) for b in range(len(pred))]
        return metrics.compute(), overlays[: self.cfg.overlay_videos]

    def run(self) -> None:
        tb = TensorBoard(self.cfg) if self.rank == 0 and self.cfg.tensorboard else None
        while self.epoch < self.cfg.epochs:
            lrs = self.set_lr()
            train_loss, samples_per_s = self.train_epoch()
            val, overlays = self.validate()
            # `epoch` counts completed epochs (1..epochs): ASHA's time_attr and max_t use it.
            metrics = {"epoch": self.epoch + 1, "train_loss": train_loss, **val, "trainable_params": self.trainable,
                       "total_params": self.total, "samples_per_s": samples_per_s, **lrs}
            if tb:
                tb.write(metrics, overlays, self.epoch + 1)
            if self.rank == 0:
                print(f"[epoch {self.epoch + 1}/{self.cfg.epochs}] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()
                                                          if not k.startswith("lr/")), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                if self.rank == 0:
                    self.save(Path(tmp))
                self.report(metrics, Path(tmp) if self.rank == 0 else None)
            self.epoch += 1
        if tb:
            tb.close()


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
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray.train
    import ray.train.torch

    cfg = TrialConfig.from_dict(config).validate()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    trial = Trial(cfg, ctx.get_world_rank(), ctx.get_world_size(), device,
                  report=lambda m, folder: ray.train.report(
                      m, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None))
    trial.wrap(ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trial.restore(Path(folder))
    trial.run()
