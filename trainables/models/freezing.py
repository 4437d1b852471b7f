"""Freezing regimes and per-stage-group learning rates.

``freeze(encoder, k)`` is the one place that decides what trains:

* ``k = 0``: the encoder is frozen whole (only the landmark head trains);
* ``0 < k < n_blocks``: the last k blocks plus the final norm/projection train;
* ``k = n_blocks``: every block and the final train, the stem stays frozen;
* ``k = "all"``: everything, the stem included (full fine-tuning).

Frozen modules stay in eval mode (norm statistics and dropout frozen) and the frozen prefix runs
under ``torch.no_grad()`` (``VideoEncoder.forward``), so it keeps no activations.
"""

from __future__ import annotations

from torch import nn

from trainables.models.encoders import VideoEncoder

HEAD_GROUP = "head"


def parse_k(value) -> int | str:
    """``"all"`` or a non-negative int (from a CLI string or JSON)."""
    if value == "all":
        return "all"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"n_unfrozen must be a non-negative integer or 'all', not {value!r}") from None
    if k < 0:
        raise ValueError(f"n_unfrozen must be >= 0, not {k}")
    return k


def check_k(k, n_blocks: int, encoder_name: str) -> int | str:
    k = parse_k(k)
    if k != "all" and k > n_blocks:
        raise ValueError(f"n_unfrozen={k} is larger than the {n_blocks} blocks of encoder {encoder_name!r}; "
                         f"use 0..{n_blocks} or 'all'")
    return k


def group_parameters(items) -> list[nn.Parameter]:
    """Parameters of a group's modules and loose parameters, in order, without duplicates."""
    out, seen = [], set()
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def unfrozen_groups(n_blocks: int, k) -> list[str]:
    """Names of the encoder groups that train for k (pure: no model needed)."""
    if k == "all":
        return ["stem"] + [f"blocks.{i}" for i in range(n_blocks)] + ["final"]
    if k == 0:
        return []
    return [f"blocks.{i}" for i in range(n_blocks - k, n_blocks)] + ["final"]


def freeze(encoder: VideoEncoder, n_unfrozen) -> list[str]:
    """Set ``requires_grad`` for regime k and return the trainable encoder group names."""
    k = check_k(n_unfrozen, encoder.n_blocks, encoder.registry_name)
    trainable = unfrozen_groups(encoder.n_blocks, k)
    groups = encoder.groups()
    frozen_modules = []
    for name, items in groups.items():
        on = name in trainable
        for p in group_parameters(items):
            p.requires_grad_(on)
        if not on:
            frozen_modules += [m for m in items if isinstance(m, nn.Module)]
    encoder.frozen_modules = frozen_modules
    encoder.split = None if k == "all" else encoder.n_blocks - k
    encoder.train(encoder.training)
    return [g for g in trainable if group_parameters(groups[g])]


def stage_of(encoder: VideoEncoder, group: str) -> str:
    """The learning-rate stage group of an encoder group (stem, a stage, or the last stage for final)."""
    return _stage(encoder.stages, group)


def lr_groups_for(encoder_name: str, n_unfrozen) -> list[str]:
    """Stage groups (plus ``head``) that get a learning rate for regime k, without building a model.

    The search spaces use this to ask for exactly the learning rates a trial will use.
    """
    from trainables.models.encoders import ENCODERS

    spec = ENCODERS[encoder_name]
    k = check_k(n_unfrozen, spec.n_blocks, encoder_name)
    stages = []
    for g in unfrozen_groups(spec.n_blocks, k):
        s = _stage(spec.stages, g)
        if s not in stages:
            stages.append(s)
    return stages + [HEAD_GROUP]


def _stage(stages: dict[str, range], group: str) -> str:
    if group in ("stem", "final"):
        return "stem" if group == "stem" else list(stages)[-1]
    block = int(group.split(".", 1)[1])
    return next(s for s, blocks in stages.items() if block in blocks)


def lr_group_names(encoder: VideoEncoder, trainable_groups: list[str]) -> list[str]:
    """Stage groups that have something to train, input to output, then the head."""
    names = []
    for g in trainable_groups:
        s = stage_of(encoder, g)
        if s not in names:
            names.append(s)
    return names + [HEAD_GROUP]


def param_groups(encoder: VideoEncoder, head: nn.Module, trainable_groups: list[str], lrs: dict[str, float],
                 base_lr: float, weight_decay: float) -> list[dict]:
    """Optimiser param groups: one per unfrozen stage group plus the head, each with its own LR.

    ``lrs`` maps a stage group (or ``head``) to its learning rate; missing groups use ``base_lr``.
    """
    by_stage: dict[str, list] = {s: [] for s in lr_group_names(encoder, trainable_groups)}
    groups = encoder.groups()
    for g in trainable_groups:
        by_stage[stage_of(encoder, g)] += group_parameters(groups[g])
    by_stage[HEAD_GROUP] = list(head.parameters())
    return [{"params": params, "lr": lrs.get(name, base_lr), "base_lr": lrs.get(name, base_lr),
             "weight_decay": weight_decay, "name": name} for name, params in by_stage.items() if params]
