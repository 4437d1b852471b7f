"""Low-rank adaptation (LoRA; Hu et al. 2021, arXiv:2106.09685) of the last blocks of an encoder.

The LoRA regime trains, in each of the last ``last`` blocks, a rank-``r`` update of a few Linear
maps and nothing else of the encoder: ``y = W x + b + (alpha / r) · B A dropout(x)``, with ``A``
(r × in) drawn as ``nn.Linear`` draws its weights (Kaiming-uniform) and ``B`` (out × r) zero, so
the adapted model starts as the frozen one. The conventions are peft's (``LoraConfig``: ``r=8``,
``lora_alpha=8``, ``lora_dropout=0``, dropout on the input of A, biases frozen).

Targets are named per block kind; a block adapts the listed targets it has:

====================  ==========================  =====================================  ===========
block kind            encoders                    targets (module in the block)          default
====================  ==========================  =====================================  ===========
MViTv2 block          echoprime, mvit_v2_s        qkv (attn.qkv), proj (attn.project.0), qkv, proj
                                                  mlp1 (mlp.0), mlp2 (mlp.3)
Transformer layer     tiny, panecho 18-21         qkv (self_attn in_proj, packed),       qkv, proj
                                                  proj (self_attn.out_proj), mlp1
                                                  (linear1), mlp2 (linear2)
ViT block             vit_b_16                    qkv, proj (self_attention), mlp1       qkv, proj
                                                  (mlp.0), mlp2 (mlp.3)
ConvNeXt block        panecho 0-17                mlp1 (block.3), mlp2 (block.5): the    mlp1, mlp2
                                                  two pointwise convolutions (Linears)
====================  ==========================  =====================================  ===========

A ConvNeXt block has no attention, so its default is its two pointwise Linears (its MLP).
``nn.MultiheadAttention`` keeps q, k and v in one packed ``in_proj_weight`` (3E × E) and never
calls its ``out_proj``'s forward, so targeting it is done by a replacement attention module
(``LoraMultiheadAttention``) that adds the low-rank delta to the packed projection, one A/B pair
as for a Linear(E, 3E), as peft does. The ResNets have no Linear in their blocks: no LoRA.

Why not peft (measured, README "LoRA"): peft 0.21 pulls in transformers, accelerate, tokenizers
and huggingface_hub (17 packages, 182 MB, +5 s import), renames every adapted weight
(``qkv.weight`` -> ``qkv.base_layer.weight``), and on ``nn.TransformerEncoderLayer`` (tiny,
PanEcho's temporal model) its adapters are silently skipped in eval mode: PyTorch's inference
fast path reads the layer's raw weights. Here the base keys do not change (adapters add
``lora_A``/``lora_B`` next to them) and an adapted Transformer layer always takes the slow path.

Example::

    enc = build_encoder("tiny")
    inject(enc, plan("tiny", rank=4, last=2))   # freezing.freeze(enc, 0, lora_cfg) does this
    merge_and_unload(enc)                       # plain modules again, adapters folded into W
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LORA_GROUP = "lora"  # the optimiser group of every adapter (its LR: optim.lr["lora"], else base_lr)
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_DROPOUT = 8, 8.0, 0.0  # peft's LoraConfig defaults


# ---------------------------------------------------------------------------------------------
# Adapted modules
# ---------------------------------------------------------------------------------------------

class _Adapter:
    """The low-rank pair of one Linear map (in -> out): ``lora_A`` (r × in), ``lora_B`` (out × r)."""

    def _init_adapter(self, n_in: int, n_out: int, rank: int, alpha: float, dropout: float, like: torch.Tensor):
        self.rank, self.alpha, self.scaling, self.merged = rank, alpha, alpha / rank, False
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, as peft
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def dropout_active(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout)


class LoraLinear(nn.Module, _Adapter):
    """``nn.Linear`` plus a low-rank update. It holds the adapted Linear's own ``weight`` and
    ``bias`` Parameters, so their state-dict keys do not change; ``merge``/``unmerge`` fold the
    update into ``weight`` and back (peft's ``merge_adapter``/``unmerge_adapter``)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self._init_adapter(base.in_features, base.out_features, rank, alpha, dropout, base.weight)
        self._base = (base,)  # the plain module merge_and_unload puts back (not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + self.lora_delta(x)

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.merged else self.weight + self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def unload(self) -> nn.Linear:
        """The plain Linear, holding this module's (current) weight and bias."""
        base = self._base[0]
        base.weight, base.bias = self.weight, self.bias
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class LoraMultiheadAttention(nn.Module, _Adapter):
    """``nn.MultiheadAttention`` (q, k, v of one size, no bias_k/v) with LoRA on the packed in_proj
    (``qkv``: one A/B pair, as for a Linear(E, 3E)) and/or its out_proj (``proj``).

    It holds the attention's own Parameters under their own names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``). Without active LoRA dropout it adds
    the deltas to the weights and calls ``F.multi_head_attention_forward`` as the attention does
    (so with B = 0 the output is bit for bit the frozen attention's); with LoRA dropout in train
    mode it projects explicitly (dropout on the input of A), masks not supported there. The
    attention's own dropout stays off, as in every frozen module."""

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float, dropout: float, qkv: bool, proj: bool):
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise ValueError("LoRA supports nn.MultiheadAttention with kdim = vdim = embed_dim, no bias_k/v, "
                             "no add_zero_attn")
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = base.embed_dim, base.num_heads, base.head_dim
        self.batch_first, self.dropout = base.batch_first, base.dropout
        self._qkv_same_embed_dim, self.bias_k, self.bias_v, self.add_zero_attn = True, None, None, False
        self.in_proj_weight, self.in_proj_bias = base.in_proj_weight, base.in_proj_bias
        self.out_proj = LoraLinear(base.out_proj, rank, alpha, dropout) if proj else base.out_proj
        self.has_qkv = qkv
        if qkv:
            self._init_adapter(self.embed_dim, 3 * self.embed_dim, rank, alpha, dropout, base.in_proj_weight)
        else:
            self.merged = False
        self._base = (base,)

    def merge_masks(self, *args, **kwargs):  # read by nn.TransformerEncoderLayer's fast-path check
        return nn.MultiheadAttention.merge_masks(self, *args, **kwargs)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if self.batch_first and batched:  # as nn.MultiheadAttention, keeping the "is" relations
            if key is value and query is key:
                query = key = value = query.transpose(1, 0)
            elif key is value:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if self._dropout_active():
            if key_padding_mask is not None or attn_mask is not None or need_weights or not batched:
                raise ValueError("LoRA dropout in train mode: only batched input, no masks, no attention weights")
            out, weights = self._explicit(query, key, value, is_causal), None
        else:
            w_in = self.in_proj_weight
            if self.has_qkv and not self.merged:
                w_in = w_in + self.delta_weight().to(w_in.dtype)
            w_out = self.out_proj.effective_weight() if isinstance(self.out_proj, LoraLinear) else self.out_proj.weight
            out, weights = F.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, w_in, self.in_proj_bias, None, None, False,
                0.0, w_out, self.out_proj.bias, training=False, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal)
        return (out.transpose(1, 0), weights) if self.batch_first and batched else (out, weights)

    def _dropout_active(self) -> bool:
        qkv = self.has_qkv and not self.merged and self.dropout_active()
        proj = isinstance(self.out_proj, LoraLinear) and not self.out_proj.merged and self.out_proj.dropout_active()
        return qkv or proj

    def _explicit(self, query, key, value, is_causal):
        """(L, N, E) inputs: projections with LoRA dropout, then scaled dot-product attention."""
        def in_proj(x):
            y = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            return y + self.lora_delta(x) if self.has_qkv and not self.merged else y

        e, h = self.embed_dim, self.num_heads
        if query is key and key is value:
            q, k, v = in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = in_proj(query)[..., :e], in_proj(key)[..., e:2 * e], in_proj(value)[..., 2 * e:]
        heads = [t.reshape(t.shape[0], t.shape[1], h, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, is_causal=is_causal)  # (N, H, L, hd)
        out = out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], e)
        return self.out_proj(out)

    @torch.no_grad()
    def merge(self) -> None:
        if self.has_qkv and not self.merged:
            self.in_proj_weight += self.delta_weight().to(self.in_proj_weight.dtype)
        self.merged = True
        if isinstance(self.out_proj, LoraLinear):
            self.out_proj.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.has_qkv and self.merged:
            self.in_proj_weight -= self.delta_weight().to(self.in_proj_weight.dtype)
        self.merged = False
        if isinstance(self.out_proj, LoraLinear):
            self.out_proj.unmerge()

    def unload(self) -> nn.MultiheadAttention:
        """The plain attention, holding this module's (current) Parameters."""
        base = self._base[0]
        base.in_proj_weight, base.in_proj_bias = self.in_proj_weight, self.in_proj_bias
        base.out_proj = self.out_proj.unload() if isinstance(self.out_proj, LoraLinear) else self.out_proj
        return base


ADAPTED = (LoraLinear, LoraMultiheadAttention)


def _no_fast_path(module, args):
    """Forward pre-hook of an adapted ``nn.TransformerEncoderLayer``. In eval mode without
    gradients PyTorch runs such a layer as one fused kernel on its raw weights
    (``torch._transformer_encoder_layer_fwd``), which would skip the adapters; any forward hook
    on the layer turns that path off ("forward pre-/hooks are attached to the module")."""
    return None


# ---------------------------------------------------------------------------------------------
# Block kinds and per-encoder layouts (pure: shapes, no model)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockKind:
    name: str
    linears: dict[str, str]  # target -> path of an nn.Linear inside the block
    attention: str | None  # path of the block's nn.MultiheadAttention (targets qkv, proj), if any
    default: tuple[str, ...]

    @property
    def targets(self) -> tuple[str, ...]:
        return (("qkv", "proj") if self.attention else ()) + tuple(self.linears)


MVIT = BlockKind("MViTv2 block", {"qkv": "attn.qkv", "proj": "attn.project.0", "mlp1": "mlp.0", "mlp2": "mlp.3"},
                 None, ("qkv", "proj"))
TRANSFORMER = BlockKind("Transformer layer", {"mlp1": "linear1", "mlp2": "linear2"}, "self_attn", ("qkv", "proj"))
VIT = BlockKind("ViT block", {"mlp1": "mlp.0", "mlp2": "mlp.3"}, "self_attention", ("qkv", "proj"))
CONVNEXT = BlockKind("ConvNeXt block", {"mlp1": "block.3", "mlp2": "block.5"}, None, ("mlp1", "mlp2"))
TARGET_ORDER = ("qkv", "proj", "mlp1", "mlp2")

Shape = dict[str, tuple[int, int]]  # target -> (in_features, out_features)


def _attention_shapes(d: int, hidden: int) -> Shape:
    return {"qkv": (d, 3 * d), "proj": (d, d), "mlp1": (d, hidden), "mlp2": (hidden, d)}


def _mvit_layout() -> list[tuple[BlockKind, Shape]]:
    dims = [(96, 96), (96, 192), (192, 192), (192, 384)] + [(384, 384)] * 10 + [(384, 768), (768, 768)]
    return [(MVIT, {"qkv": (i, 3 * o), "proj": (o, o), "mlp1": (o, 4 * o), "mlp2": (4 * o, o)}) for i, o in dims]


def _panecho_layout() -> list[tuple[BlockKind, Shape]]:
    dims = [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3  # ConvNeXt-Tiny, then the 4 Transformer layers
    return [(CONVNEXT, {"mlp1": (d, 4 * d), "mlp2": (4 * d, d)}) for d in dims] + \
        [(TRANSFORMER, _attention_shapes(768, 768))] * 4


# encoder name -> its blocks (kind, target shapes), input to output; checked against the built
# modules by inject() and tests/test_lora.py
LAYOUTS: dict[str, Callable[[], list[tuple[BlockKind, Shape]]]] = {
    "echoprime": _mvit_layout,
    "mvit_v2_s": _mvit_layout,
    "panecho": _panecho_layout,
    "tiny": lambda: [(TRANSFORMER, _attention_shapes(64, 128))] * 4,
    "vit_b_16": lambda: [(VIT, _attention_shapes(768, 3072))] * 12,
}


@lru_cache(maxsize=None)
def layout(encoder_name: str) -> tuple[tuple[BlockKind, Shape], ...]:
    if encoder_name not in LAYOUTS:
        raise ValueError(f"encoder {encoder_name!r} has no LoRA targets (no Linear maps in its blocks); "
                         f"LoRA supports {', '.join(sorted(LAYOUTS))}")
    return tuple(LAYOUTS[encoder_name]())


def valid_targets(encoder_name: str) -> list[str]:
    kinds = {kind.name: kind for kind, _ in layout(encoder_name)}
    return [t for t in TARGET_ORDER if any(t in k.targets for k in kinds.values())]


def default_targets(encoder_name: str) -> dict[str, tuple[str, ...]]:
    """Block kind -> its default targets, for this encoder."""
    return {kind.name: kind.default for kind, _ in layout(encoder_name)}


@dataclass(frozen=True)
class Plan:
    """What a LoRA config adapts in one encoder: per adapted block, its targets' (in, out)."""

    encoder: str
    rank: int
    alpha: float
    dropout: float
    first_block: int  # the encoder's split: blocks before it are the frozen prefix
    blocks: tuple[tuple[int, BlockKind, tuple[tuple[str, tuple[int, int]], ...]], ...]

    @property
    def n_params(self) -> int:
        """Trainable parameters: sum of r · (in + out) over the adapted Linear maps."""
        return sum(self.rank * (i + o) for _, _, targets in self.blocks for _, (i, o) in targets)

    @property
    def adapted_groups(self) -> list[str]:
        return [f"blocks.{i}" for i, _, _ in self.blocks]


def plan(encoder_name: str, rank: int = DEFAULT_RANK, last: int | None = None, alpha: float = DEFAULT_ALPHA,
         dropout: float = DEFAULT_DROPOUT, targets: list[str] | None = None) -> Plan:
    """Validate a LoRA config for an encoder (no model needed); ``last=None``: every block,
    ``targets=None``: each block kind's defaults. Errors are one line and list the valid values."""
    from trainables.models.encoders import ENCODERS

    if encoder_name not in ENCODERS:
        raise ValueError(f"encoder {encoder_name!r} is unknown; choose one of {', '.join(ENCODERS)}")
    blocks = layout(encoder_name)
    n = len(blocks)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"encoder.lora.rank must be a positive integer, not {rank!r}")
    last = n if last is None else last
    if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= n:
        raise ValueError(f"encoder.lora.last={last!r}: {encoder_name!r} has {n} blocks; use 1..{n} (or null: all)")
    if not alpha > 0:
        raise ValueError(f"encoder.lora.alpha={alpha!r} must be > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"encoder.lora.dropout={dropout!r} must be in [0, 1)")
    valid = valid_targets(encoder_name)
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None:
        unknown = [t for t in targets if t not in valid]
        if unknown or not targets:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "empty"
            raise ValueError(f"encoder.lora.targets {list(targets)}: {what}; valid targets of {encoder_name!r}: "
                             f"{', '.join(valid)} (null: the defaults, {_defaults_text(encoder_name)})")
        targets = list(dict.fromkeys(targets))
    chosen = []
    for i in range(n - last, n):
        kind, shapes = blocks[i]
        names = [t for t in (targets or kind.default) if t in kind.targets]
        if not names:
            raise ValueError(f"encoder.lora.targets {targets} select nothing in block {i} of {encoder_name!r} "
                             f"(a {kind.name}; its targets: {', '.join(kind.targets)}); add one or lower last")
        chosen.append((i, kind, tuple((t, shapes[t]) for t in names)))
    return Plan(encoder_name, rank, float(alpha), float(dropout), n - last, tuple(chosen))


def plan_from(encoder_name: str, cfg) -> Plan:
    """``plan`` from a ``config.LoraCfg`` or a dict of its fields (missing ones: the defaults)."""
    if isinstance(cfg, dict):
        from trainables.config import EncoderCfg

        cfg = EncoderCfg(encoder_name, lora=cfg).lora  # unknown keys: one line listing the valid ones
    return plan(encoder_name, cfg.rank, cfg.last, cfg.alpha, cfg.dropout, cfg.targets)


def _defaults_text(encoder_name: str) -> str:
    return "; ".join(f"{kind}: {', '.join(t)}" for kind, t in default_targets(encoder_name).items())


def count_params(encoder_name: str, rank: int = DEFAULT_RANK, last: int | None = None,
                 targets: list[str] | None = None) -> int:
    """Trainable encoder parameters of a LoRA config, without building a model (alpha and
    dropout do not change it). ``count_params("echoprime", 8, 4) == 107520``."""
    return plan(encoder_name, rank, last, targets=targets).n_params


# ---------------------------------------------------------------------------------------------
# Injection, freezing support, merging
# ---------------------------------------------------------------------------------------------

def block_module(encoder: nn.Module, index: int, kind: BlockKind) -> nn.Module:
    """The module of block ``index`` (from ``encoder.groups()``) that is of ``kind``."""
    items = [m for m in encoder.groups()[f"blocks.{index}"] if isinstance(m, nn.Module)]
    for m in items:
        if isinstance(m, _kind_classes()[kind.name]):
            return m
    raise TypeError(f"block {index} of {encoder.registry_name!r} holds no {kind.name} "
                    f"({[type(m).__name__ for m in items]}); LAYOUTS in lora.py is out of date")


@lru_cache(maxsize=None)
def _kind_classes() -> dict[str, type]:
    from torchvision.models.convnext import CNBlock
    from torchvision.models.video.mvit import MultiscaleBlock
    from torchvision.models.vision_transformer import EncoderBlock

    return {MVIT.name: MultiscaleBlock, TRANSFORMER.name: nn.TransformerEncoderLayer, VIT.name: EncoderBlock,
            CONVNEXT.name: CNBlock}


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def inject(encoder: nn.Module, p: Plan) -> None:
    """Put adapters into the planned blocks (once: an encoder with adapters must get the same plan)."""
    current = getattr(encoder, "lora_plan", None)
    if current is not None:
        if current != p:
            raise ValueError(f"this encoder already has other LoRA adapters (rank {current.rank}, blocks "
                             f"{current.first_block}-{len(layout(current.encoder)) - 1}); build a fresh one")
        return
    if has_adapters(encoder):
        raise ValueError("this encoder already holds LoRA modules; build a fresh one")
    for index, kind, targets in p.blocks:
        block = block_module(encoder, index, kind)
        wanted = dict(targets)
        mha = block.get_submodule(kind.attention) if kind.attention else None
        for name, shape in targets:
            linear = None if name in ("qkv", "proj") and mha is not None else block.get_submodule(kind.linears[name])
            actual = _shape(linear) if linear is not None else \
                (mha.embed_dim, 3 * mha.embed_dim) if name == "qkv" else _shape(mha.out_proj)
            if actual != shape:
                raise TypeError(f"{encoder.registry_name!r} block {index} target {name!r} maps {actual}, not {shape}: "
                                f"LAYOUTS in lora.py is out of date")
            if linear is not None:
                _set(block, kind.linears[name], LoraLinear(linear, p.rank, p.alpha, p.dropout))
        if mha is not None and ("qkv" in wanted or "proj" in wanted):
            _set(block, kind.attention, LoraMultiheadAttention(mha, p.rank, p.alpha, p.dropout,
                                                               qkv="qkv" in wanted, proj="proj" in wanted))
        if isinstance(block, nn.TransformerEncoderLayer):
            block.register_forward_pre_hook(_no_fast_path)
    encoder.lora_plan = p


def _shape(linear: nn.Module) -> tuple[int, int] | None:
    return (linear.in_features, linear.out_features) if isinstance(linear, nn.Linear) else None


def has_adapters(module: nn.Module) -> bool:
    return any(isinstance(m, ADAPTED) for m in module.modules())


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every ``lora_A``/``lora_B`` in ``module``, in module order."""
    return [p for m in module.modules() if isinstance(m, ADAPTED)
            for name, p in m.named_parameters(recurse=False) if name.startswith("lora_")]


def frozen_parts(items: list) -> list[nn.Module]:
    """The modules to keep in eval mode when only adapters train: everything, except that inside
    an adapted block only the pieces that hold no adapter (so LoRA dropout follows train/eval)."""
    out = []
    for item in items:
        if not isinstance(item, nn.Module) or isinstance(item, ADAPTED):
            continue
        if has_adapters(item):
            out += frozen_parts(list(item.children()))
        else:
            out.append(item)
    return out


def merge_and_unload(module: nn.Module) -> int:
    """Fold every adapter into its base weights and put the plain modules back (peft's
    ``merge_and_unload``): the state dict then has exactly the unadapted model's keys, and an
    adapted Transformer layer may take PyTorch's fast path again. Returns the number of adapted
    modules (an attention with both qkv and proj counts once)."""
    top: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, ADAPTED) and not any(name.startswith(f"{t}.") for t in top):
            top.append(name)
    for name in top:
        adapted = module.get_submodule(name)
        adapted.merge()
        _set(module, name, adapted.unload())
    for m in module.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _no_fast_path:
                del m._forward_pre_hooks[key]
    if hasattr(module, "lora_plan"):
        del module.lora_plan
    return len(top)
