"""Freezing regimes and per-stage-group learning rates.

``freeze(encoder, k)`` is the one place that decides what trains:

* ``k = 0``: the encoder is frozen whole (only the landmark head trains);
* ``0 < k < n_blocks``: the last k blocks plus the final norm/projection train;
* ``k = n_blocks``: every block and the final train, the stem stays frozen;
* ``k = "all"``: everything, the stem included (full fine-tuning);
* ``freeze(encoder, 0, lora)``: the LoRA regime (``lora.py``): adapters in the last ``lora.last``
  blocks train, the whole encoder is frozen; the split is the first adapted block, so the frozen
  prefix (and a feature cache) runs up to it, and the adapters get one optimiser group, ``lora``.

Frozen modules stay in eval mode (norm statistics and dropout frozen) and the frozen prefix runs
under ``torch.no_grad()`` (``VideoEncoder.forward``), so it keeps no activations.
"""

from __future__ import annotations

from torch import nn

from trainables.models import lora as lora_mod
from trainables.models.encoders import VideoEncoder
from trainables.models.lora import LORA_GROUP

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


def check_lora_k(n_unfrozen, encoder_name: str) -> None:
    """LoRA adapts a frozen encoder: n_unfrozen must be 0 next to a LoRA config."""
    if parse_k(n_unfrozen) != 0:
        raise ValueError(f"encoder.lora adapts a frozen encoder: set encoder.n_unfrozen to 0, not {n_unfrozen!r} "
                         f"(encoder {encoder_name!r})")


def freeze(encoder: VideoEncoder, n_unfrozen, lora=None) -> list[str]:
    """Set ``requires_grad`` for regime k and return the trainable encoder group names.

    With ``lora`` (a ``config.LoraCfg``; n_unfrozen must be 0) the adapters are put into the last
    ``lora.last`` blocks first (once), only they train, and the returned groups are the blocks
    that hold them.
    """
    if lora is not None:
        return _freeze_lora(encoder, n_unfrozen, lora)
    if getattr(encoder, "lora_plan", None) is not None:
        raise ValueError("this encoder holds LoRA adapters: freeze it with its LoRA config, or merge them first "
                         "(lora.merge_and_unload)")
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


def _freeze_lora(encoder: VideoEncoder, n_unfrozen, lora) -> list[str]:
    check_lora_k(n_unfrozen, encoder.registry_name)
    plan = lora_mod.plan_from(encoder.registry_name, lora)
    lora_mod.inject(encoder, plan)
    adapters = {id(p) for p in lora_mod.adapter_parameters(encoder)}
    for p in encoder.parameters():
        p.requires_grad_(id(p) in adapters)
    encoder.frozen_modules = lora_mod.frozen_parts([m for items in encoder.groups().values() for m in items])
    encoder.split = plan.first_block
    encoder.train(encoder.training)
    return plan.adapted_groups


def stage_of(encoder: VideoEncoder, group: str) -> str:
    """The learning-rate stage group of an encoder group (stem, a stage, or the last stage for final)."""
    return _stage(encoder.stages, group)


def lr_groups_for(encoder_name: str, n_unfrozen, lora=None) -> list[str]:
    """Stage groups (plus ``head``) that get a learning rate for regime k, without building a model;
    with a LoRA config (n_unfrozen 0): ``["lora", "head"]``.

    The search spaces use this to ask for exactly the learning rates a trial will use.
    """
    from trainables.models.encoders import ENCODERS

    if lora is not None:
        check_lora_k(n_unfrozen, encoder_name)
        lora_mod.plan_from(encoder_name, lora)
        return [LORA_GROUP, HEAD_GROUP]
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
    """Stage groups that have something to train, input to output, then the head (LoRA: ``lora``)."""
    if getattr(encoder, "lora_plan", None) is not None:
        return [LORA_GROUP, HEAD_GROUP]
    names = []
    for g in trainable_groups:
        s = stage_of(encoder, g)
        if s not in names:
            names.append(s)
    return names + [HEAD_GROUP]


# timm's convention (timm/optim/_param_groups.py): no weight decay on biases, norm weights and other
# 1-D gains, nor on position embeddings, class tokens, relative-position tables, layer scales and node
# embeddings: decaying them towards 0 shrinks what the model *is*, not how complex it is.
NO_DECAY_KEYS = ("pos_embed", "pos_encoding", "class_token", "cls_token", "rel_pos", "layer_scale", "node_emb")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies to a named parameter (timm's rule, see NO_DECAY_KEYS)."""
    return param.ndim > 1 and not name.endswith(".bias") and not any(k in name for k in NO_DECAY_KEYS)


def param_groups(encoder: VideoEncoder, head: nn.Module, trainable_groups: list[str], lrs: dict[str, float],
                 base_lr: float, weight_decay: float) -> list[dict]:
    """Optimiser param groups: per unfrozen stage group plus the head, each with its own LR.

    ``lrs`` maps a stage group (or ``head``, or ``lora``) to its learning rate; missing groups use
    ``base_lr``. Each stage is split into a decayed and a non-decayed group (``decays``); both
    carry the stage's ``name`` and LR, the latter ``no_decay: True`` and weight decay 0. In the
    LoRA regime every adapter is in the ``lora`` group (A and B are matrices: decayed).
    """
    by_stage: dict[str, list] = {s: [] for s in lr_group_names(encoder, trainable_groups)}
    groups = encoder.groups()
    adapters = {id(p) for p in lora_mod.adapter_parameters(encoder)}
    for g in trainable_groups:
        for p in group_parameters(groups[g]):
            if p.requires_grad:
                by_stage[LORA_GROUP if id(p) in adapters else stage_of(encoder, g)].append(p)
    by_stage[HEAD_GROUP] = list(head.parameters())
    names = {id(p): n for n, p in encoder.named_parameters()}
    names.update({id(p): f"head.{n}" for n, p in head.named_parameters()})
    out = []
    for stage, params in by_stage.items():
        lr = lrs.get(stage, base_lr)
        decay = [p for p in params if decays(names[id(p)], p)]
        rest = [p for p in params if not decays(names[id(p)], p)]
        out += [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": stage, "no_decay": nd}
                for ps, wd, nd in ((decay, weight_decay, False), (rest, 0.0, True)) if ps]
    return out
