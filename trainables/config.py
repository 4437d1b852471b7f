"""One trial's configuration: typed dataclasses with a JSON round-trip and validation.

This is the only contract between ``search/`` (which builds configs) and ``trainables/`` (which
runs them). Component classes are referred to by registry *name*, so a config stays JSON.
Credentials never belong here: object stores authenticate through the usual AWS chain.

Example::

    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=2), head=HeadCfg("gcn"),
                      data=DataCfg(uri="s3://bucket/echonet/v1"), epochs=5)
    TrialConfig.from_json(cfg.to_json()) == cfg
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMISERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class EncoderCfg:
    name: str = "tiny"
    weights: str | None = None  # local path, s3:// URI, or "torchvision" (baselines only)
    weights_sha256: str | None = None
    n_unfrozen: int | str = "all"  # 0..n_blocks or "all" (stem included)

    def validate(self) -> None:
        from trainables.models.encoders import ENCODERS
        from trainables.models.freezing import check_k

        if self.name not in ENCODERS:
            raise ValueError(f"encoder.name {self.name!r} is unknown; choose one of {', '.join(ENCODERS)}")
        self.n_unfrozen = check_k(self.n_unfrozen, ENCODERS[self.name].n_blocks, self.name)


@dataclass
class HeadCfg:
    type: str = "mlp"
    channels: list[int] | None = None  # None: the head's default
    graph: str = "sparse"  # gcn only: "sparse" (contour, chord, time edges) or "full"

    def validate(self) -> None:
        from trainables.models.heads import GRAPHS, HEADS

        if self.type not in HEADS:
            raise ValueError(f"head.type {self.type!r} is unknown; choose one of {', '.join(HEADS)}")
        if self.graph not in GRAPHS:
            raise ValueError(f"head.graph {self.graph!r} is unknown; choose one of {', '.join(GRAPHS)}")
        if self.channels is not None and (not self.channels or min(self.channels) < 1):
            raise ValueError(f"head.channels must be positive integers, not {self.channels}")

    def options(self) -> dict:
        opts = {"channels": self.channels}
        if self.type == "gcn":
            opts["graph"] = self.graph
        return opts


@dataclass
class OptimCfg:
    name: str = "adamw"
    base_lr: float = 1e-4
    lr: dict[str, float] = field(default_factory=dict)  # stage group or "head" -> LR (else base_lr)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_accum: int = 1

    def validate(self) -> None:
        if self.name not in OPTIMISERS:
            raise ValueError(f"optim.name {self.name!r} is unknown; choose one of {', '.join(OPTIMISERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        for name, lr in {"base_lr": self.base_lr, **self.lr}.items():
            if not lr > 0:
                raise ValueError(f"learning rate {name}={lr} must be > 0")
        if self.grad_accum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.grad_accum must be >= 1, weight_decay and warmup_epochs >= 0")


@dataclass
class DataCfg:
    uri: str = ""
    s3_endpoint: str | None = None
    cache_dir: str | None = None
    batch_size: int = 8
    num_workers: int = 0  # DataLoader workers per Train worker (spawn)
    train_split: str = "train"
    val_split: str = "val"

    def validate(self) -> None:
        if not self.uri:
            raise ValueError("data.uri is empty: give a shard set URI (local folder or s3://bucket/prefix)")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")


@dataclass
class TrialConfig:
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    aug_strength: float = 0.0
    epochs: int = 10
    seed: int = 0
    workers: int = 1  # Ray Train (DDP) workers
    use_gpu: bool = False
    max_failures: int = 1  # worker-group restarts inside one Train run
    storage: str = ""  # Train run storage (shared by every node); empty: <cwd>/results/train
    name: str = ""  # Train run name; a Tune trial sets train-<trial_id>
    tensorboard: bool = True
    overlay_videos: int = 4  # validation videos drawn with landmarks each epoch (rank 0)

    def validate(self) -> "TrialConfig":
        for part in (self.encoder, self.head, self.optim, self.data):
            part.validate()
        if not 0 <= self.aug_strength <= 1:
            raise ValueError(f"aug_strength={self.aug_strength} must be in [0, 1]")
        if self.epochs < 1 or self.workers < 1 or self.max_failures < 0:
            raise ValueError("epochs and workers must be >= 1, max_failures >= 0")
        return self

    # --- JSON round trip --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        parts = {"encoder": EncoderCfg, "head": HeadCfg, "optim": OptimCfg, "data": DataCfg}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trial config keys {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        kwargs = {}
        for key, value in d.items():
            if key in parts:
                valid = {f.name for f in fields(parts[key])}
                bad = set(value) - valid
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in '{key}'; valid: {sorted(valid)}")
                kwargs[key] = parts[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "TrialConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "TrialConfig":
        try:
            return cls.from_json(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
