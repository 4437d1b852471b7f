"""Named search spaces: define-by-run functions of an Optuna trial.

Each space suggests its parameters with ``trial.suggest_*`` (plain branches for conditional ones)
and returns nothing else; it does no I/O and builds no model (``cell_cost`` builds one on the meta
device, without weights, only to order the cells). ``apply(params, base)`` turns the
suggested values into a trial config. Every space states its scientific parameters (the effect
under study), nuisance parameters (tuned away for a fair comparison) and fixed ones
(tuning_playbook; STYLE.md §8-9), and its scientific *grid*: the values of each scientific
parameter whose combinations (the cells) the search must compare. The search enqueues every
cell before the sampler may exploit (cheapest first), tunes the nuisance parameters within each
cell, stops trials early within their cell and by default pauses one that a cheaper cell's trial
dominates (search/study.py, search/schedulers.py).

``python -m search.run --space NAME`` looks names up in ``SPACES``; an unknown name lists them.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Callable

from trainables.models.encoders import ENCODERS
from trainables.models.freezing import lr_groups_for
from trainables.models.heads import GRAPHS
from trainables.models.lora import LAYOUTS

LORA_ENCODERS = tuple(LAYOUTS)  # encoders whose blocks LoRA can adapt

HEADS = ("mlp", "gcn")
BASELINES = ("resnet18_2d", "r3d_18", "vit_b_16", "mvit_v2_s")
FOUNDATION = ("echoprime", "panecho")


@dataclass(frozen=True)
class Space:
    """A named search space. Convention: a space suggests its scientific parameters first, and the
    last one in ``scientific`` last of them (conditional ones in between), so that the cell of a
    trial is known once that parameter is (search/study.py ``CellwiseSampler``)."""

    fn: Callable
    description: str
    scientific: tuple[str, ...]
    nuisance: tuple[str, ...]
    fixed: tuple[str, ...] = ()
    encoders: tuple[str, ...] | None = None  # None: any encoder (the one given by --encoder)
    choose_encoder: bool = False  # the space itself picks the encoder
    # encoder -> {scientific param: values} (every combination is a cell), or the list of cells
    # itself when scientific parameters are conditional (a LoRA cell has lora_last, not n_unfrozen)
    grid: Callable[[str], dict[str, list] | list[dict]] | None = None

    def cells(self, encoder: str) -> list[dict]:
        """Every combination of the scientific values (or the grid's list of cells), cheapest first:
        by the trainable parameters of the cell's model (``cell_cost``), ties in the order the space
        lists them. A search enqueues cells in this order, so the cheaper regimes report first and
        each costlier trial meets their results at its rungs: the default scheduler pauses one that
        is no better than a cheaper model at equal epochs (search/schedulers.py). Both ends of the
        front first, the order before, let full fine-tuning run second, with only the frozen cell to
        meet (bench/search.py ``--cell-order spread``)."""
        grid = self.grid(encoder) if self.grid else {}
        if isinstance(grid, list):
            cells = [dict(c) for c in grid]
        else:
            cells = [{}]
            for name in self.scientific:
                cells = [c | {name: v} for c in cells for v in grid[name]]
        return sorted(cells, key=lambda c: cell_cost(c, encoder))

    def cell_of(self, params: dict) -> str:
        """A cell's name from a trial's parameters, e.g. ``n_unfrozen=2 head=gcn``."""
        return cell_key(params, self.scientific)

    def check_encoder(self, name: str) -> None:
        if self.encoders is not None and not self.choose_encoder and name not in self.encoders:
            raise ValueError(f"this space needs an encoder among {', '.join(self.encoders)}, not {name!r}")


SPACES: dict[str, Space] = {}


def register_space(name: str, **kwargs):
    def wrap(fn):
        SPACES[name] = Space(fn=fn, **kwargs)
        return fn
    return wrap


def cell_cost(cell: dict, encoder: str) -> int:
    """Trainable parameters of a cell's model with the trainer's default options for everything
    the cell leaves open (head widths, LoRA rank 8): what a trial of the cell reports as
    ``trainable_params``, up to its nuisance settings. Built as the trainer builds it
    (``trainables.loop.build_model``), on the meta device: no memory, no weights, milliseconds."""
    return _cost(encoder, json.dumps(cell, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _cost(encoder: str, cell_json: str) -> int:
    import torch

    from trainables.config import TrialConfig
    from trainables.loop import build_model, count_params

    cell = json.loads(cell_json)
    cfg = apply(cell, {"encoder": {"name": cell.get("encoder", encoder)}})
    cfg["encoder"].pop("weights", None)
    cfg["encoder"].pop("weights_sha256", None)
    with torch.device("meta"):
        model, _ = build_model(TrialConfig.from_dict(cfg), load_weights=False)
    return count_params(model)[0]


def cell_key(params: dict, scientific: tuple[str, ...]) -> str:
    return " ".join(f"{name}={params.get(name)}" for name in scientific)


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ValueError(f"unknown space {name!r}; choose one of {', '.join(SPACES)}")
    return SPACES[name]


# --- building blocks ------------------------------------------------------------------------------

def suggest_head_options(trial, head: str) -> None:
    """The head's nuisance options: width, graph (GCN), and dropout on the embedding."""
    if head == "gcn":
        trial.suggest_categorical("gcn_graph", list(GRAPHS))
        trial.suggest_categorical("gcn_width", [16, 32, 64])
    else:
        trial.suggest_categorical("mlp_width", [128, 256, 512])
    trial.suggest_float("head_dropout", 0.0, 0.5)


def suggest_stage_lrs(trial, encoder: str, k, lora: dict | None = None) -> None:
    """One log-uniform LR per stage group that k unfreezes (or one for the LoRA adapters), and one
    for the head (conditional parameters)."""
    for group in lr_groups_for(encoder, k, lora):
        lo, hi = {"head": (1e-4, 1e-2), "lora": (1e-5, 1e-2)}.get(group, (1e-6, 1e-3))
        trial.suggest_float(f"lr_{group}", lo, hi, log=True)


def sensible_k(encoder: str) -> list:
    return ENCODERS[encoder].sensible_k


# The CPU demo encoder gets a coarser grid, so that the embedded default tries every cell of
# selective_ft within its few minutes: frozen, half and full unfreezing, and LoRA on half the blocks.
COARSE = {"tiny": {"n_unfrozen": (0, 2, "all"), "lora_last": (2,)}}
LORA_RANKS = (2, 4, 8, 16)


def lora_encoders() -> tuple[str, ...]:
    return LORA_ENCODERS


def lora_lasts(encoder: str) -> list:
    """Adapted-block counts worth comparing: 2, 4 (below the encoder's depth) and every block."""
    if encoder in COARSE:
        return list(COARSE[encoder]["lora_last"])
    n = ENCODERS[encoder].n_blocks
    return [k for k in (2, 4) if k < n] + [n]


def unfreeze_ks(encoder: str) -> list:
    return list(COARSE.get(encoder, {}).get("n_unfrozen", sensible_k(encoder)))


def regime_cells(encoder: str) -> list[dict]:
    """selective_ft's cells: unfreeze k x head, then LoRA on the last L blocks x head."""
    cells = [{"regime": "unfreeze", "n_unfrozen": k, "head": h} for k in unfreeze_ks(encoder) for h in HEADS]
    if encoder in lora_encoders():
        cells += [{"regime": "lora", "lora_last": n, "head": h} for n in lora_lasts(encoder) for h in HEADS]
    return cells


def _grid(**values):
    """A grid that is the same for every encoder (values may be callables of the encoder)."""
    return lambda encoder: {k: (v(encoder) if callable(v) else list(v)) for k, v in values.items()}


# --- spaces ---------------------------------------------------------------------------------------

@register_space("selective_ft", description="how much of the encoder to adapt: unfreeze the last k blocks (one LR per "
                "stage group), or LoRA on the last L blocks (one LR for the adapters); MLP or GCN head",
                scientific=("regime", "n_unfrozen", "lora_last", "head"),
                nuisance=("lr_<stage> / lr_lora", "lr_head", "lora_rank", "head options", "head_dropout",
                          "aug_strength", "weight_decay"),
                fixed=("encoder", "optimiser AdamW", "cosine schedule", "LoRA alpha 8, dropout 0, default targets"),
                grid=regime_cells)
def selective_ft(trial, encoder: str) -> None:
    regimes = ["unfreeze", "lora"] if encoder in lora_encoders() else ["unfreeze"]
    regime = trial.suggest_categorical("regime", regimes)
    if regime == "lora":
        lora = {"last": trial.suggest_categorical("lora_last", lora_lasts(encoder))}
        k = 0
    else:
        lora, k = None, trial.suggest_categorical("n_unfrozen", unfreeze_ks(encoder))
    head = trial.suggest_categorical("head", list(HEADS))
    if lora is not None:
        # Rank is a nuisance parameter here (as head width): it moves the trainable count, which the
        # Pareto export shows point by point; the peft space compares ranks as cells.
        lora["rank"] = trial.suggest_categorical("lora_rank", list(LORA_RANKS))
    suggest_stage_lrs(trial, encoder, k, lora)
    suggest_head_options(trial, head)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("peft", description="LoRA alone: how many of the last blocks to adapt and with what rank, "
                "MLP or GCN head", scientific=("lora_last", "lora_rank", "head"),
                nuisance=("lr_lora", "lr_head", "head options", "head_dropout", "aug_strength", "weight_decay"),
                fixed=("encoder", "regime=lora", "LoRA alpha 8, dropout 0, default targets"),
                encoders=LORA_ENCODERS, grid=lambda encoder: {"lora_last": lora_lasts(encoder), "lora_rank": list(LORA_RANKS),
                                                     "head": list(HEADS)})
def peft(trial, encoder: str) -> None:
    last = trial.suggest_categorical("lora_last", lora_lasts(encoder))
    rank = trial.suggest_categorical("lora_rank", list(LORA_RANKS))
    head = trial.suggest_categorical("head", list(HEADS))
    suggest_stage_lrs(trial, encoder, 0, {"last": last, "rank": rank})
    suggest_head_options(trial, head)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("frozen", description="frozen encoder: only the head trains (linear-probe regime)",
                scientific=("head",), nuisance=("lr_head", "head options", "head_dropout", "aug_strength",
                                                "weight_decay"),
                fixed=("encoder", "n_unfrozen=0"), grid=_grid(head=HEADS))
def frozen(trial, encoder: str) -> None:
    trial.suggest_categorical("n_unfrozen", [0])
    head = trial.suggest_categorical("head", list(HEADS))  # scientific first: nuisance is tuned per cell
    suggest_stage_lrs(trial, encoder, 0)
    suggest_head_options(trial, head)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("full_ft", description="full fine-tuning (stem included), LRs per stage group",
                scientific=("head",), nuisance=("lr_<stage>", "lr_head", "head options", "head_dropout",
                                                "aug_strength", "weight_decay"), fixed=("encoder", "n_unfrozen=all"),
                grid=_grid(head=HEADS))
def full_ft(trial, encoder: str) -> None:
    trial.suggest_categorical("n_unfrozen", ["all"])
    head = trial.suggest_categorical("head", list(HEADS))
    suggest_stage_lrs(trial, encoder, "all")
    suggest_head_options(trial, head)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)


@register_space("baselines", description="ResNet-18 2D/3D, ViT-B/16 and MViTv2-S, fully fine-tuned",
                scientific=("encoder", "head"), nuisance=("lr_base", "lr_head", "head options", "head_dropout",
                                                          "aug_strength"),
                fixed=("n_unfrozen=all",), encoders=BASELINES, choose_encoder=True,
                grid=_grid(encoder=BASELINES, head=HEADS))
def baselines(trial, encoder: str) -> None:
    trial.suggest_categorical("encoder", list(BASELINES))
    trial.suggest_categorical("n_unfrozen", ["all"])
    head = trial.suggest_categorical("head", list(HEADS))
    trial.suggest_float("lr_base", 1e-6, 1e-3, log=True)  # one LR: stage names differ per encoder
    trial.suggest_float("lr_head", 1e-4, 1e-2, log=True)
    suggest_head_options(trial, head)
    trial.suggest_float("aug_strength", 0.0, 1.0)


@register_space("paper", description="the paper's grid: {EchoPrime, PanEcho} x {frozen, 2, 4, full} x "
                "{MLP, GCN} x {no aug, aug}, LRs tuned per cell",
                scientific=("encoder", "n_unfrozen", "head", "aug_strength"), nuisance=("lr_base", "lr_head"),
                fixed=("GCN sparse graph", "MLP width 256", "aug strength 0.5 when on", "no head dropout"),
                encoders=FOUNDATION, choose_encoder=True,
                grid=_grid(encoder=FOUNDATION, n_unfrozen=(0, 2, 4, "all"), head=HEADS, aug_strength=(0.0, 0.5)))
def paper(trial, encoder: str) -> None:
    trial.suggest_categorical("encoder", list(FOUNDATION))
    trial.suggest_categorical("n_unfrozen", [0, 2, 4, "all"])
    trial.suggest_categorical("head", list(HEADS))
    trial.suggest_categorical("aug_strength", [0.0, 0.5])
    trial.suggest_float("lr_base", 1e-6, 1e-3, log=True)
    trial.suggest_float("lr_head", 1e-4, 1e-2, log=True)


@register_space("smoke", description="seconds per trial on CPU: tiny encoder, frozen vs full, MLP vs GCN",
                scientific=("n_unfrozen", "head"), nuisance=("lr_head",), fixed=("encoder=tiny",),
                encoders=("tiny",), grid=_grid(n_unfrozen=(0, "all"), head=HEADS))
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


CONSTANTS = ("base", "weights", "study_trial", "tune_epoch")  # merged into a Tune config, not suggested


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
    if params.get("regime") == "lora" or "lora_last" in params:
        enc["n_unfrozen"] = 0  # LoRA adapts a frozen encoder
        enc["lora"] = {"rank": params.get("lora_rank", 8), "last": params["lora_last"]}
    elif "regime" in params:
        enc["lora"] = None
    if "head" in params:
        head["type"] = params["head"]
    if params.get("head", head.get("type")) == "gcn":
        head["graph"] = params.get("gcn_graph", head.get("graph", "sparse"))
        if "gcn_width" in params:
            w = params["gcn_width"]
            head["channels"] = [w // 2, w, w]
    elif "mlp_width" in params:
        head["channels"] = [params["mlp_width"]] * 3
    if "head_dropout" in params:
        head["dropout"] = params["head_dropout"]
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
