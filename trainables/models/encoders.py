"""Video encoders by name, each with an ordered list of blocks and stage groups.

Every encoder takes a uint8 clip (B, 16, 112, 112) (index 0 = ED, 15 = ES), does its own resize and
normalisation, and returns an embedding (B, D). It exposes

* ``groups()``: ``{"stem": [...], "blocks.0": [...], ..., "blocks.{n-1}": [...], "final": [...]}``
  (modules or parameters), input to output, covering every parameter exactly once;
* ``stages``: stage group name -> block indices, for one learning rate per stage group
  (``final`` belongs to the last stage);
* ``forward_prefix(clip, n)`` / ``forward_suffix(h, n)``: the encoder split after block n, so a
  frozen prefix can run under ``torch.no_grad()`` and its output can be cached;
* ``prefix_samples(h)`` / ``prefix_batch(samples)``: that output split into one value per sample
  and merged back (``trainables/feature_cache.py`` stores one entry per sample);
* ``preprocess_version``: names the clip -> model-input mapping (a feature cache keys on it).

The published contract (DOMAIN.md §6.1). With the published weights, ``echoprime`` and ``panecho``
return in eval mode the embedding that the published inference code returns for the same 16 grey
frames: the same OpenCV resize and crop on uint8 frames (``preprocess.py``), the same
normalisation, and for PanEcho the same (B, 3, T, H, W) -> (B*T, 3, H, W) reshape *without* a
permute, so each "frame" its ConvNeXt sees is three consecutive (channel, time) planes: the
released weights were trained on that layout. One deliberate difference: EchoPrime's
Dropout(0.5) before its 512-d projection is an Identity here, so the embedding is the same in
train and eval mode and only the trained parameters change with k (dropout on the embedding is
the landmark head's option). Landmark targets stay in the 112-px frame whatever the crop.

Architectures are written from their published descriptions (DOMAIN.md §5-6); no EchoPrime or
PanEcho code or weights are shipped. ``--weights`` points at the user's own copy. The baselines
(``mvit_v2_s``, ``r3d_18``, ``resnet18_2d``, ``vit_b_16``) and ``tiny`` resize with torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models import preprocess as published

CLIP_LEN = 16
ENCODERS: dict[str, "EncoderSpec"] = {}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    build: Callable[[], "VideoEncoder"]
    n_blocks: int
    embed_dim: int
    description: str
    stages: dict[str, range]  # stage group -> block indices (the last stage also owns "final")

    @property
    def sensible_k(self) -> list[int | str]:
        """Block counts worth comparing: 0, 1, 2, 4, 8, ... below n_blocks, then all."""
        ks = [k for k in (0, 1, 2, 4, 8, 16) if k < self.n_blocks]
        return ks + [self.n_blocks, "all"] if self.n_blocks not in ks else ks + ["all"]


def register_encoder(name: str, *, n_blocks: int, embed_dim: int, description: str):
    def wrap(cls):
        ENCODERS[name] = EncoderSpec(name, cls, n_blocks, embed_dim, description, dict(cls.stages))
        cls.registry_name = name
        return cls
    return wrap


def build_encoder(name: str, weights: str | None = None, weights_sha256: str | None = None) -> "VideoEncoder":
    """Build a registered encoder, optionally loading weights (a path, an object-store URI, or
    ``"torchvision"`` for the torchvision pretrained weights of the baselines)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    encoder = ENCODERS[name].build()
    if weights:
        from trainables.models.weights import load_weights
        load_weights(encoder, weights, weights_sha256)
    return encoder


class VideoEncoder(nn.Module):
    """Base: runs stem -> blocks -> final, with the first ``split`` blocks frozen under no_grad."""

    registry_name = ""
    embed_dim = 0
    stages: dict[str, range] = {}
    preprocess_version = ""  # what a clip becomes before the stem; a feature cache keys on it

    def __init__(self):
        super().__init__()
        self.split: int | None = None  # None: nothing frozen; n: stem + first n blocks frozen
        self.frozen_modules: list[nn.Module] = []

    # --- per-encoder pieces ---------------------------------------------------------------
    def groups(self) -> dict[str, list]:
        raise NotImplementedError

    def embed(self, clip: torch.Tensor):
        raise NotImplementedError

    def block(self, i: int, h):
        raise NotImplementedError

    def finish(self, h) -> torch.Tensor:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return ENCODERS[self.registry_name].n_blocks

    def forward_prefix(self, clip: torch.Tensor, n: int):
        h = self.embed(clip)
        for i in range(n):
            h = self.block(i, h)
        return h

    def forward_suffix(self, h, n: int) -> torch.Tensor:
        for i in range(n, self.n_blocks):
            h = self.block(i, h)
        return self.finish(h)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.forward_suffix(self.forward_prefix(clip, 0), 0)
        # The frozen prefix keeps no activations: that is most of the saving of selective FT.
        with torch.no_grad():
            h = self.forward_prefix(clip, self.split)
            if self.split == self.n_blocks:
                return self.finish(h)
        return self.forward_suffix(h, self.split)

    # --- the prefix output per sample (a feature cache stores one entry per sample) --------------
    def prefix_samples(self, h) -> list:
        """``forward_prefix``'s output for a batch as one value per sample, batch dimension removed;
        ``prefix_batch`` is the inverse. Here ``h`` is a (B, ...) tensor."""
        return list(h.unbind(0))

    def prefix_batch(self, samples: list):
        return torch.stack(samples)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules:  # frozen norm statistics and dropout stay in eval mode
            m.eval()
        return self

    def load_published(self, state: dict) -> None:
        """Load a checkpoint in its published key layout (strict; lists missing/unexpected keys)."""
        strict_load(self, state, self.registry_name)


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth of the encoder's blocks: ``rate`` at the last, linear in depth (torchvision's
    rule); 0 turns it off. Only trained blocks are affected: frozen ones run in eval mode."""
    from torchvision.ops import StochasticDepth

    layers = [m for m in encoder.modules() if isinstance(m, StochasticDepth)]
    for i, layer in enumerate(layers):
        layer.p = rate * i / max(1, len(layers) - 1)


def strict_load(module: nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what} weights do not match the architecture: "
                         f"missing keys {result.missing_keys[:20]}{' ...' if len(result.missing_keys) > 20 else ''}; "
                         f"unexpected keys {result.unexpected_keys[:20]}"
                         f"{' ...' if len(result.unexpected_keys) > 20 else ''}")


def resize_frames(clip: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, T, H, W) -> float (B, T, size, size) on the 0-255 scale (bicubic, as EchoPrime)."""
    b, t, h, w = clip.shape
    x = clip.reshape(b * t, 1, h, w).float()
    if size != h:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 255)
    return x.reshape(b, t, size, size)


def normalise(x: torch.Tensor, mean, std, channel_dim: int) -> torch.Tensor:
    """Grey -> 3 identical channels, then per-channel (x - mean) / std."""
    x = x.unsqueeze(channel_dim).expand(*x.shape[:channel_dim], 3, *x.shape[channel_dim:])
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean) / std


def _temporal_keep_ed_es(f: torch.Tensor) -> torch.Tensor:
    """(B, T, D) per-frame features -> (B, 3D): ED frame, ES frame and the temporal mean."""
    return torch.cat([f[:, 0], f[:, -1], f.mean(1)], dim=1)


# ---------------------------------------------------------------------------------------------
# MViTv2-S: EchoPrime and the MViTv2-S baseline
# ---------------------------------------------------------------------------------------------

KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
MVIT_STAGES = {"stage1": range(0, 1), "stage2": range(1, 3), "stage3": range(3, 14), "stage4": range(14, 16)}


class _MViT(VideoEncoder):
    stages = MVIT_STAGES

    def __init__(self, head: nn.Module):
        super().__init__()
        from torchvision.models.video import mvit_v2_s

        self.model = mvit_v2_s()
        self.model.head = head

    def groups(self):
        m = self.model
        out = {"stem": [m.conv_proj, m.pos_encoding]}
        out.update({f"blocks.{i}": [b] for i, b in enumerate(m.blocks)})
        out["final"] = [m.norm, m.head]
        return out

    def preprocess(self, clip):
        raise NotImplementedError

    def embed(self, clip):
        x = self.model.conv_proj(self.preprocess(clip))
        x = self.model.pos_encoding(x.flatten(2).transpose(1, 2))
        return x, (self.model.pos_encoding.temporal_size,) + tuple(self.model.pos_encoding.spatial_size)

    def block(self, i, h):
        return self.model.blocks[i](*h)

    def finish(self, h):
        return self.model.head(self.model.norm(h[0])[:, 0])

    def prefix_samples(self, h) -> list:  # h = (tokens (B, N, C), thw): one (tokens (N, C), thw) each
        return [(x, tuple(h[1])) for x in h[0].unbind(0)]

    def prefix_batch(self, samples: list):
        return torch.stack([x for x, _ in samples]), tuple(samples[0][1])

    def load_published(self, state):
        # Published EchoPrime encoder = a plain mvit_v2_s state dict with the 512-d head.
        strict_load(self.model, state, self.registry_name)


@register_encoder("echoprime", n_blocks=16, embed_dim=512,
                  description="EchoPrime video encoder: MViTv2-S, Linear(768->512) head, 16x224x224")
class EchoPrimeEncoder(_MViT):
    """The published head is Sequential(Dropout(0.5), Linear(768->512)). The Dropout is replaced by
    an Identity (keeping ``head.1.*`` as the published key names): in the ``final`` group it would
    be off for k = 0 and on for every k >= 1, a confound between regimes (DOMAIN.md §6.1)."""

    embed_dim = 512
    preprocess_version = published.PREPROCESS_VERSION["echoprime"]

    def __init__(self):
        super().__init__(nn.Sequential(nn.Identity(), nn.Linear(768, 512)))
        self.published_input = published.echoprime_preprocess()

    def preprocess(self, clip):
        return self.published_input(clip)  # (B, 3, T, 224, 224), as EchoPrime's crop_and_scale


@register_encoder("mvit_v2_s", n_blocks=16, embed_dim=768, description="MViTv2-S baseline (Kinetics-400)")
class MViTBaseline(_MViT):
    embed_dim = 768
    preprocess_version = "torch-bicubic224-kinetics-v1"
    torchvision_weights = ("torchvision.models.video", "MViT_V2_S_Weights")

    def __init__(self):
        super().__init__(nn.Identity())

    def preprocess(self, clip):
        return normalise(resize_frames(clip, 224) / 255, KINETICS_MEAN, KINETICS_STD, channel_dim=1)

    def load_published(self, state):
        strict_load(self.model, {k: v for k, v in state.items() if not k.startswith("head.")}, self.registry_name)


# ---------------------------------------------------------------------------------------------
# ResNet-18 3D and 2D
# ---------------------------------------------------------------------------------------------

R3D_MEAN, R3D_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET_STAGES = {f"layer{s}": range(2 * s - 2, 2 * s) for s in range(1, 5)}


def _resnet_blocks(model) -> list[nn.Module]:
    return [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]


@register_encoder("r3d_18", n_blocks=8, embed_dim=512, description="ResNet-18 3D baseline (Kinetics-400), 112 px")
class R3D18(VideoEncoder):
    embed_dim = 512
    preprocess_version = "112-r3d-kinetics-v1"
    stages = RESNET_STAGES
    torchvision_weights = ("torchvision.models.video", "R3D_18_Weights")

    def __init__(self):
        super().__init__()
        from torchvision.models.video import r3d_18

        self.model = r3d_18()
        self.model.fc = nn.Identity()
        self._blocks = _resnet_blocks(self.model)

    def groups(self):
        return {"stem": [self.model.stem], **{f"blocks.{i}": [b] for i, b in enumerate(self._blocks)}, "final": []}

    def embed(self, clip):
        x = normalise(resize_frames(clip, 112) / 255, R3D_MEAN, R3D_STD, channel_dim=1)
        return self.model.stem(x)

    def block(self, i, h):
        return self._blocks[i](h)

    def finish(self, h):
        return self.model.avgpool(h).flatten(1)

    def load_published(self, state):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        strict_load(self.model, state, self.registry_name)


def _frames_per_sample(h) -> list:
    """(x, b) with x batch-major (B*T, ...) or (B, ...) -> one x slice of each sample."""
    x, b = h
    return list(x.reshape(b, -1, *x.shape[1:]).unbind(0))


def _frames_batch(samples: list):
    return torch.cat(samples), len(samples)


class _PerFrame(VideoEncoder):
    """2D backbones applied to each frame; temporal pooling keeps the ED and ES frame features."""

    prefix_samples = staticmethod(_frames_per_sample)
    prefix_batch = staticmethod(_frames_batch)

    def embed(self, clip):
        b = clip.shape[0]
        x = normalise(resize_frames(clip, self.image_size) / 255, IMAGENET_MEAN, IMAGENET_STD, channel_dim=2)
        return self.stem_forward(x.flatten(0, 1)), b

    def block(self, i, h):
        return self._blocks[i](h[0]), h[1]

    def finish(self, h):
        x, b = h
        f = self.pool(x)
        return _temporal_keep_ed_es(f.reshape(b, -1, f.shape[-1]))


@register_encoder("resnet18_2d", n_blocks=8, embed_dim=3 * 512,
                  description="ResNet-18 per frame (ImageNet), features of ED, ES and the temporal mean")
class ResNet18Frames(_PerFrame):
    embed_dim = 3 * 512
    preprocess_version = "112-imagenet-per-frame-v1"
    image_size = 112
    stages = RESNET_STAGES
    torchvision_weights = ("torchvision.models", "ResNet18_Weights")

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18

        self.model = resnet18()
        self.model.fc = nn.Identity()
        self._blocks = _resnet_blocks(self.model)

    def groups(self):
        m = self.model
        return {"stem": [m.conv1, m.bn1], **{f"blocks.{i}": [b] for i, b in enumerate(self._blocks)}, "final": []}

    def stem_forward(self, x):
        m = self.model
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    def pool(self, x):
        return self.model.avgpool(x).flatten(1)

    def load_published(self, state):
        strict_load(self.model, {k: v for k, v in state.items() if not k.startswith("fc.")}, self.registry_name)


@register_encoder("vit_b_16", n_blocks=12, embed_dim=3 * 768,
                  description="ViT-B/16 per frame at 224 px (ImageNet), features of ED, ES and the temporal mean")
class ViTB16Frames(_PerFrame):
    embed_dim = 3 * 768
    preprocess_version = "torch-bicubic224-imagenet-per-frame-v1"
    image_size = 224
    stages = {"early": range(0, 4), "middle": range(4, 8), "late": range(8, 12)}
    torchvision_weights = ("torchvision.models", "ViT_B_16_Weights")

    def __init__(self):
        super().__init__()
        from torchvision.models import vit_b_16

        self.model = vit_b_16()
        self.model.heads = nn.Identity()
        self._blocks = list(self.model.encoder.layers)

    def groups(self):
        m = self.model
        return {"stem": [m.conv_proj, m.class_token, m.encoder.pos_embedding],
                **{f"blocks.{i}": [b] for i, b in enumerate(self._blocks)}, "final": [m.encoder.ln]}

    def stem_forward(self, x):
        m = self.model
        x = m._process_input(x)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def pool(self, x):
        return self.model.encoder.ln(x)[:, 0]

    def load_published(self, state):
        strict_load(self.model, {k: v for k, v in state.items() if not k.startswith("heads.")}, self.registry_name)


# ---------------------------------------------------------------------------------------------
# PanEcho: ConvNeXt-Tiny per frame -> 4-layer Transformer -> mean over time
# ---------------------------------------------------------------------------------------------

class SinusoidalPE(nn.Module):
    """Fixed sinusoidal positions; a buffer, so unfreezing everything can never train it."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        pos = torch.arange(length).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(length, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x):
        return x + self.pe[: x.shape[1]]


class _ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models import convnext_tiny

        self.model = convnext_tiny()
        self.model.classifier[2] = nn.Identity()  # LayerNorm2d(768) + Flatten -> 768 per frame


N_CONVNEXT_BLOCKS = 18  # depths 3, 3, 9, 3


@register_encoder("panecho", n_blocks=N_CONVNEXT_BLOCKS + 4, embed_dim=768,
                  description="PanEcho: ConvNeXt-Tiny per frame (channel-major, as published) -> "
                              "4-layer Transformer (d 768) -> mean")
class PanEchoEncoder(VideoEncoder):
    """Blocks 0-17 are the ConvNeXt blocks (a stage's downsampling layer goes with its first block,
    the ConvNeXt's final LayerNorm with the last), blocks 18-21 the Transformer layers, so
    "unfreeze k <= 4" is the temporal model only (DOMAIN.md §9.5 leaves this choice open).

    The ConvNeXt sees the published layout: 16 "frames" cut from the channel-major (3, T) planes
    (``embed``), whose features become the 16 time tokens in order, as in the published model."""

    embed_dim = 768
    preprocess_version = published.PREPROCESS_VERSION["panecho"]
    prefix_samples = staticmethod(_frames_per_sample)  # h = (x, b): frames (B*T, ...) or tokens (B, T, 768)
    prefix_batch = staticmethod(_frames_batch)
    stages = {"convnext.stage1": range(0, 3), "convnext.stage2": range(3, 6), "convnext.stage3": range(6, 15),
              "convnext.stage4": range(15, 18), "temporal": range(18, 22)}

    def __init__(self):
        super().__init__()
        self.encoder = _ImageEncoder()
        layer = nn.TransformerEncoderLayer(768, 8, dim_feedforward=768, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=False)
        self.transformer = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.time_encoder = SinusoidalPE(CLIP_LEN, 768)
        self.published_input = published.panecho_preprocess()
        f = self.encoder.model.features
        self._units: list[list[nn.Module]] = []
        for stage in (1, 3, 5, 7):
            for j, blk in enumerate(f[stage]):
                self._units.append(([f[stage - 1]] if j == 0 and stage > 1 else []) + [blk])
        self._units[-1].append(self.encoder.model.classifier)

    def groups(self):
        out = {"stem": [self.encoder.model.features[0]]}
        out.update({f"blocks.{i}": u for i, u in enumerate(self._units)})
        out.update({f"blocks.{N_CONVNEXT_BLOCKS + i}": [l] for i, l in enumerate(self.transformer.layers)})
        out["final"] = []
        return out

    def embed(self, clip):
        x = self.published_input(clip)  # (B, 3, T, 224, 224), as PanEcho's dataset returns it
        b, c, t, h, w = x.shape
        # Published FrameTransformer: reshape with no permute, so each ConvNeXt "frame" holds three
        # consecutive (channel, time) planes. The released weights were trained on exactly this.
        return self.encoder.model.features[0](x.reshape(b * t, c, h, w)), b

    def block(self, i, h):
        x, b = h
        if i >= N_CONVNEXT_BLOCKS:
            return self.transformer.layers[i - N_CONVNEXT_BLOCKS](x), b
        for m in self._units[i][:-1] if i == N_CONVNEXT_BLOCKS - 1 else self._units[i]:
            x = m(x)
        if i == N_CONVNEXT_BLOCKS - 1:  # frame features -> (B, T, 768) tokens with positions
            x = self._units[i][-1](self.encoder.model.avgpool(x))
            x = self.time_encoder(x.reshape(b, -1, 768))
        return x, b

    def finish(self, h):
        return h[0].mean(1)

    def load_published(self, state):
        # Published: the whole multi-task model under 'weights'; the encoder is 'encoder.*', and
        # 'encoder.time_encoder.pe' is dropped (recomputed for any clip length).
        state = state.get("weights", state)
        mapped = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        mapped.pop("time_encoder.pe", None)
        if not mapped:
            raise ValueError("panecho weights: no 'encoder.*' keys; expected the published PanEcho checkpoint")
        strict_load(self, mapped, self.registry_name)


# ---------------------------------------------------------------------------------------------
# tiny: a small video transformer for CPU tests and the demo
# ---------------------------------------------------------------------------------------------

@register_encoder("tiny", n_blocks=4, embed_dim=128,
                  description="small video transformer (conv stem, 8x7x7 tokens, 4 blocks) for CPU tests and the demo")
class TinyVideoEncoder(VideoEncoder):
    """Conv stem -> 392 tokens (2 frames x 7 x 7 each) -> 4 Transformer blocks -> a projection of
    every token's reduced features, so the embedding keeps *where* things are (landmarks need it;
    a pooled or cls-token embedding learns localisation far more slowly at this size)."""

    embed_dim = 128
    preprocess_version = "tiny-112-v1"
    stages = {"stage1": range(0, 2), "stage2": range(2, 4)}
    dim, n_tokens, reduce = 64, 8 * 7 * 7, 4

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 32, (1, 4, 4), stride=(1, 4, 4)), nn.GELU(),
                                  nn.Conv3d(32, self.dim, (2, 4, 4), stride=(2, 4, 4)))
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_tokens, self.dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(self.dim, 4, 2 * self.dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(4))
        self.norm = nn.LayerNorm(self.dim)
        self.token_reduce = nn.Linear(self.dim, self.reduce)
        self.proj = nn.Linear(self.n_tokens * self.reduce, self.embed_dim)

    def groups(self):
        return {"stem": [self.stem, self.pos_embed], **{f"blocks.{i}": [b] for i, b in enumerate(self.blocks)},
                "final": [self.norm, self.token_reduce, self.proj]}

    def embed(self, clip):
        x = (clip.float().unsqueeze(1) / 255 - 0.25) / 0.25  # (B, 1, 16, 112, 112)
        return self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed

    def block(self, i, h):
        return self.blocks[i](h)

    def finish(self, h):
        return self.proj(self.token_reduce(self.norm(h)).flatten(1))
