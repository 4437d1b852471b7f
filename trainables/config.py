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
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

OPTIMISERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class LoraCfg:
    """LoRA on the last ``last`` blocks (trainables/models/lora.py); defaults are peft's."""

    rank: int = 8
    last: int | None = None  # adapted blocks, counted from the output end; None: every block
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the input of A, train mode only
    targets: list[str] | None = None  # e.g. ["qkv", "proj"]; None: each block kind's defaults

    def validate(self, encoder_name: str) -> None:
        from trainables.models.lora import plan_from

        plan_from(encoder_name, self)


@dataclass
class EncoderCfg:
    name: str = "tiny"
    weights: str | None = None  # local path, s3:// URI, or "torchvision" (baselines only)
    weights_sha256: str | None = None
    n_unfrozen: int | str = "all"  # 0..n_blocks or "all" (stem included); 0 with lora
    lora: LoraCfg | None = None  # the LoRA regime: adapters in a frozen encoder (absent: none)
    # Stochastic depth at the last block (linear in depth). Off by default: an unfrozen block then
    # computes what it computes frozen or LoRA-adapted, so regimes differ only in what trains.
    drop_path: float = 0.0

    def __post_init__(self):
        if isinstance(self.lora, dict):  # from JSON
            valid = [f.name for f in fields(LoraCfg)]
            bad = sorted(set(self.lora) - set(valid))
            if bad:
                raise ValueError(f"unknown keys {bad} in 'encoder.lora'; valid: {valid}")
            self.lora = LoraCfg(**self.lora)
        elif self.lora is not None and not isinstance(self.lora, LoraCfg):
            raise ValueError(f"encoder.lora must be an object {{rank, last, alpha, dropout, targets}} or null, "
                             f"not {json.dumps(self.lora)}")

    def validate(self) -> None:
        from trainables.models.encoders import ENCODERS
        from trainables.models.freezing import check_k, check_lora_k

        if self.name not in ENCODERS:
            raise ValueError(f"encoder.name {self.name!r} is unknown; choose one of {', '.join(ENCODERS)}")
        self.n_unfrozen = check_k(self.n_unfrozen, ENCODERS[self.name].n_blocks, self.name)
        if self.lora is not None:
            check_lora_k(self.n_unfrozen, self.name)
            self.lora.validate(self.name)
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"encoder.drop_path={self.drop_path} must be in [0, 1)")


@dataclass
class HeadCfg:
    type: str = "mlp"
    channels: list[int] | None = None  # None: the head's default
    graph: str = "sparse"  # gcn only: heads.GRAPHS, "sparse" (relational) or "full" (learned pair weights)
    dropout: float = 0.0  # on the embedding, train mode only; a head nuisance parameter, the same for every k

    def validate(self) -> None:
        from trainables.models.heads import GRAPHS, HEADS

        if self.type not in HEADS:
            raise ValueError(f"head.type {self.type!r} is unknown; choose one of {', '.join(HEADS)}")
        if self.graph not in GRAPHS:
            raise ValueError(f"head.graph {self.graph!r} is unknown; choose one of {', '.join(GRAPHS)}")
        if self.channels is not None and (not self.channels or min(self.channels) < 1):
            raise ValueError(f"head.channels must be positive integers, not {self.channels}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"head.dropout={self.dropout} must be in [0, 1)")

    def options(self) -> dict:
        """The keyword options of ``build_head(self.type, ...)``: only those this head takes."""
        from trainables.models.heads import head_options

        opts = {"channels": self.channels, "graph": self.graph, "dropout": self.dropout}
        return {k: v for k, v in opts.items() if k in head_options(self.type)}


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
    # Frozen-prefix feature cache (trainables/feature_cache.py), under <cache_dir>/features/ and
    # shared by every trial on the node; used when part of the encoder is frozen (split > 0).
    feature_cache: bool = True
    feature_cache_gb: float | None = None  # size cap; None: $ECHOTUNE_FEATURE_CACHE_GB, else 8

    def validate(self) -> None:
        if not self.uri:
            raise ValueError("data.uri is empty: give a shard set URI (local folder or s3://bucket/prefix)")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")
        if self.feature_cache_gb is not None and not self.feature_cache_gb > 0:
            raise ValueError(f"data.feature_cache_gb={self.feature_cache_gb} must be > 0 (or null for the default); "
                             f"turn the cache off with data.feature_cache: false")


@dataclass
class TrialConfig:
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    aug_strength: float = 0.0
    # With aug_strength > 0: N fixed augmented views per video, one drawn per epoch, so the frozen
    # prefix of each view can be cached; 0: a fresh augmentation every epoch (no cache for training).
    cache_views: int = 0
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
        check_types(self)
        for part in (self.encoder, self.head, self.optim, self.data):
            part.validate()
        if not 0 <= self.aug_strength <= 1:
            raise ValueError(f"aug_strength={self.aug_strength} must be in [0, 1]")
        if self.cache_views < 0:
            raise ValueError(f"cache_views={self.cache_views} must be >= 0 (0: a fresh augmentation every epoch)")
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
        if not isinstance(d, dict):
            raise ValueError(f"a trial config is a JSON object, not {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trial config keys {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        kwargs = {}
        for key, value in d.items():
            if key in parts:
                if not isinstance(value, dict):
                    raise ValueError(f"trial config field {key!r} must be an object, not {json.dumps(value)}")
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


# ---------------------------------------------------------------------------------------------
# Types: a JSON config is checked against the annotations, so "epochs": "ten", "lr": null or
# "use_gpu": "false" are one clear line instead of a TypeError deep in the trainer (or a GPU wait).
# ---------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
    if origin is list:
        return f"a list of {plural.get(typing.get_args(tp)[0], 'values')}"
    if origin is dict:
        return f"an object of {plural.get(typing.get_args(tp)[1], 'values')}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, tp.__name__)


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (object,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp) or (object, object)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    return tp is object or isinstance(value, tp)


def check_types(cfg, where: str = "") -> None:
    """Raise ValueError naming the first field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, tp, name = getattr(cfg, f.name), hints[f.name], f"{where}{f.name}"
        if is_dataclass(value):
            check_types(value, f"{name}.")
        elif not _matches(value, tp):
            raise ValueError(f"trial config field {name!r} must be {_type_name(tp)}, not {json.dumps(value)}")
