"""Named search spaces: define-by-run functions of an Optuna trial.

Each space suggests its parameters with ``trial.suggest_*`` (plain branches for conditional ones)
and returns nothing else; it does no I/O and builds no model. ``apply(params, base)`` turns the
suggested values into a trial config. Every space states its scientific parameters (the effect
under study), nuisance parameters (tuned away for a fair comparison) and fixed ones
(tuning_playbook; STYLE.md §8-9).

``python -m search.run --space NAME`` looks names up in ``SPACES``; an unknown name lists them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from trainables.models.encoders import ENCODERS
from trainables.models.freezing import lr_groups_for

HEADS = ("mlp", "gcn")
BASELINES = ("resnet18_2d", "r3d_18", "vit_b_16", "mvit_v2_s")
FOUNDATION = ("echoprime", "panecho")


@dataclass(frozen=True)
class Space:
    fn: Callable
    description: str
    scientific: tuple[str, ...]
    nuisance: tuple[str, ...]
    fixed: tuple[str, ...] = ()
    encoders: tuple[str, ...] | None = None  # None: any encoder (the one given by --encoder)
    choose_encoder: bool = False  # the space itself picks the encoder

    def check_encoder(self, name: str) -> None:
        if self.encoders is not None and not self.choose_encoder and name not in self.encoders:
            raise ValueError(f"this space needs an encoder among {', '.join(self.encoders)}, not {name!r}")


SPACES: dict[str, Space] = {}


def register_space(name: str, **kwargs):
    def wrap(fn):
        SPACES[name] = Space(fn=fn, **kwargs)
        return fn
    return wrap


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ValueError(f"unknown space {name!r}; choose one of {', '.join(SPACES)}")
    return SPACES[name]


# --- building blocks ------------------------------------------------------------------------------

def suggest_head(trial) -> None:
    head = trial.suggest_categorical("head", list(HEADS))
    if head == "gcn":
        trial.suggest_categorical("gcn_graph", ["sparse", "full"])
        trial.suggest_categorical("gcn_width", [16, 32, 64])
    else:
        trial.suggest_categorical("mlp_width", [128, 256, 512])


def suggest_stage_lrs(trial, encoder: str, k) -> None:
    """One log-uniform LR per stage group that k unfreezes, and one for the head (conditional)."""
    for group in lr_groups_for(encoder, k):
        lo, hi = (1e-4, 1e-2) if group == "head" else (1e-6, 1e-3)
        trial.suggest_float(f"lr_{group}", lo, hi, log=True)


def sensible_k(encoder: str) -> list:
    return ENCODERS[encoder].sensible_k


# --- spaces ---------------------------------------------------------------------------------------

@register_space("selective_ft", description="how many last blocks to unfreeze, with LRs per stage group",
                scientific=("n_unfrozen", "head"), nuisance=("lr_<stage>", "lr_head", "head options",
                                                             "aug_strength", "weight_decay"),
                fixed=("encoder", "optimiser AdamW", "cosine schedule"))
def selective_ft(trial, encoder: str) -> None:
    k = trial.suggest_categorical("n_unfrozen", sensible_k(encoder))
    suggest_stage_lrs(trial, encoder, k)
    suggest_head(trial)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("frozen", description="frozen encoder: only the head trains (linear-probe regime)",
                scientific=("head",), nuisance=("lr_head", "head options", "aug_strength", "weight_decay"),
                fixed=("encoder", "n_unfrozen=0"))
def frozen(trial, encoder: str) -> None:
    trial.suggest_categorical("n_unfrozen", [0])
    suggest_stage_lrs(trial, encoder, 0)
    suggest_head(trial)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("full_ft", description="full fine-tuning (stem included), LRs per stage group",
                scientific=("head",), nuisance=("lr_<stage>", "lr_head", "head options", "aug_strength",
                                                "weight_decay"), fixed=("encoder", "n_unfrozen=all"))
def full_ft(trial, encoder: str) -> None:
    trial.suggest_categorical("n_unfrozen", ["all"])
    suggest_stage_lrs(trial, encoder, "all")
    suggest_head(trial)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("baselines", description="ResNet-18 2D/3D, ViT-B/16 and MViTv2-S, fully fine-tuned",
                scientific=("encoder",), nuisance=("lr_base", "lr_head", "head options", "aug_strength"),
                fixed=("n_unfrozen=all",), encoders=BASELINES, choose_encoder=True)
def baselines(trial, encoder: str) -> None:
    trial.suggest_categorical("encoder", list(BASELINES))
    trial.suggest_categorical("n_unfrozen", ["all"])
    trial.suggest_float("lr_base", 1e-6, 1e-3, log=True)  # one LR: stage names differ per encoder
    trial.suggest_float("lr_head", 1e-4, 1e-2, log=True)
    suggest_head(trial)
    trial.suggest_float("aug_strength", 0.0, 1.0)


@register_space("paper", description="the paper's grid: {EchoPrime, PanEcho} x {frozen, 2, 4, full} x "
                "{MLP, GCN} x {no aug, aug}, LRs tuned per cell",
                scientific=("encoder", "n_unfrozen", "head", "aug"), nuisance=("lr_base", "lr_head"),
                fixed=("GCN sparse graph", "MLP width 256", "aug strength 0.5 when on"),
                encoders=FOUNDATION, choose_encoder=True)
def paper(trial, encoder: str) -> None:
    trial.suggest_categorical("encoder", list(FOUNDATION))
    trial.suggest_categorical("n_unfrozen", [0, 2, 4, "all"])
    trial.suggest_categorical("head", list(HEADS))
    trial.suggest_categorical("aug_strength", [0.0, 0.5])
    trial.suggest_float("lr_base", 1e-6, 1e-3, log=True)
    trial.suggest_float("lr_head", 1e-4, 1e-2, log=True)


@register_space("smoke", description="seconds per trial on CPU: tiny encoder, frozen vs full, MLP vs GCN",
                scientific=("n_unfrozen", "head"), nuisance=("lr_head",), fixed=("encoder=tiny",),
                encoders=("tiny",))
def smoke(trial, encoder: str) -> None:
    trial.suggest_categorical("n_unfrozen", [0, "all"])
    trial.suggest_categorical("head", list(HEADS))
    trial.suggest_float("lr_head", 3e-4, 3e-3, log=True)


# --- from suggested values to a trial config -------------------------------------------------------

@dataclass
class SpaceFn:
    """Picklable define-by-run callable for OptunaSearch: runs a space and returns the constants
    every trial needs (the base config), which OptunaSearch merges into the Tune config."""

    space: str
    encoder: str
    base: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # encoder -> weights, for spaces that choose the encoder

    def __call__(self, trial) -> dict:
        SPACES[self.space].fn(trial, self.encoder)
        return {"base": self.base, "weights": self.weights}


CONSTANTS = ("base", "weights")


def apply(params: dict, base: dict, weights: dict | None = None) -> dict:
    """Trial config dict = ``base`` with the suggested ``params`` written into it."""
    cfg = copy.deepcopy(base)
    enc, head, optim = cfg.setdefault("encoder", {}), cfg.setdefault("head", {}), cfg.setdefault("optim", {})
    if "encoder" in params:
        enc["name"] = params["encoder"]
        enc["weights"] = (weights or {}).get(params["encoder"])
        enc["weights_sha256"] = None
    if "n_unfrozen" in params:
        enc["n_unfrozen"] = params["n_unfrozen"]
    if "head" in params:
        head["type"] = params["head"]
    if params.get("head", head.get("type")) == "gcn":
        head["graph"] = params.get("gcn_graph", head.get("graph", "sparse"))
        if "gcn_width" in params:
            w = params["gcn_width"]
            head["channels"] = [w // 2, w, w]
    elif "mlp_width" in params:
        head["channels"] = [params["mlp_width"]] * 3
    lrs = {k[len("lr_"):]: v for k, v in params.items() if k.startswith("lr_") and k != "lr_base"}
    optim["lr"] = {**optim.get("lr", {}), **lrs}
    if "lr_base" in params:
        optim["base_lr"] = params["lr_base"]
    if "aug_strength" in params:
        cfg["aug_strength"] = params["aug_strength"]
    if "weight_decay" in params:
        optim["weight_decay"] = params["weight_decay"]
    return cfg


def params_of(config: dict) -> dict:
    """The suggested parameters in a Tune trial config (everything but the merged constants)."""
    return {k: v for k, v in config.items() if k not in CONSTANTS}
