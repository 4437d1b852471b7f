"""The published preprocessing of EchoPrime and PanEcho, as fixed linear maps (DOMAIN.md §5, §6, §6.1).

Both published pipelines resize uint8 frames with OpenCV: EchoPrime crops 10 % from every side
(``crop_and_scale``, zoom 0.1) and resizes to 224 with INTER_CUBIC; PanEcho resizes to 256 with
INTER_AREA and centre-crops 224. A resize of fixed size is a linear map applied separably along
each axis, so ``cv2.resize(X) == R @ X @ R.T`` for a per-axis matrix R. R is read off OpenCV once
(by resizing unit impulses) and applied as two matmuls, on the CPU or the GPU. Crops are zero
columns of R. The published result is uint8, so the output is rounded and saturated to 0..255;
OpenCV's uint8 path uses fixed-point weights, which leaves at most 1 grey level of difference on a
few pixels (measured: < 0.01 % of pixels for the cubic map, about 5 % for the area map).

A feature cache keys on ``PREPROCESS_VERSION``: change the string whenever the output changes.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from torch import nn

PREPROCESS_VERSION = {
    "echoprime": "ep-crop0.1-cubic224-u8-v1",
    "panecho": "pe-area256-u8-centre224-imagenet-v1",
}

CLIP_SIZE = 112
ECHOPRIME_SIZE, ECHOPRIME_ZOOM = 224, 0.1
ECHOPRIME_MEAN = (29.110628, 28.076836, 29.096405)  # 0-255 scale (DOMAIN.md §5)
ECHOPRIME_STD = (47.989223, 46.456997, 47.20083)
PANECHO_RESIZE, PANECHO_CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, interpolation: int) -> np.ndarray:
    """(n_out, n_in) per-axis weights of ``cv2.resize`` from n_in to n_out pixels, read off OpenCV.

    Resizing the identity in height only gives R @ I = R. On float32 input OpenCV applies exactly
    these weights (no fixed-point rounding), and the same ones along the other axis.
    """
    weights = cv2.resize(np.eye(n_in, dtype=np.float32), (n_in, n_out), interpolation=interpolation)
    weights.setflags(write=False)  # cached and shared: nobody may modify it
    return weights


def crop_resize_matrix(n_in: int, start: int, stop: int, n_out: int, interpolation: int) -> np.ndarray:
    """(n_out, n_in): keep pixels [start, stop) of an axis, then resize them to n_out."""
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    weights[:, start:stop] = resize_matrix(stop - start, n_out, interpolation)
    return weights


def echoprime_axis(size: int = CLIP_SIZE) -> np.ndarray:
    """EchoPrime's ``crop_and_scale(zoom=0.1)`` along one axis of a square frame.

    On a square frame the aspect-ratio crop is a no-op; then ``round(int(size * 0.1))`` pixels go
    from each side (11 of 112, leaving 90) and the rest is cubic-resized to 224.
    """
    pad = round(int(size * ECHOPRIME_ZOOM))
    return crop_resize_matrix(size, pad, size - pad, ECHOPRIME_SIZE, cv2.INTER_CUBIC)


def panecho_axis(size: int = CLIP_SIZE) -> np.ndarray:
    """PanEcho along one axis: INTER_AREA resize to 256, then CenterCrop(224) (pixels 16..239)."""
    top = int(round((PANECHO_RESIZE - PANECHO_CROP) / 2))  # torchvision's centre-crop offset
    return resize_matrix(size, PANECHO_RESIZE, cv2.INTER_AREA)[top:top + PANECHO_CROP].copy()


class PublishedPreprocess(nn.Module):
    """uint8 grey clip (B, T, H, W) -> the published float input (B, 3, T, h, w).

    Steps: resample every frame (``rows @ frame @ cols.T``), round and saturate as OpenCV's uint8
    output does, divide by ``scale``, repeat grey into 3 channels, normalise per channel.

    Args:
        rows, cols: per-axis resampling matrices (h, H) and (w, W).
        scale: 1 for a 0-255 normalisation (EchoPrime), 255 for a 0-1 one (PanEcho).
        mean, std: per-channel normalisation on that scale.
        version: the preprocessing version string (a feature cache keys on it).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, scale: float, mean, std, version: str):
        super().__init__()
        # Non-persistent buffers: .to(device) moves them, state_dict (published key layout) ignores them.
        self.register_buffer("rows", torch.as_tensor(np.array(rows, dtype=np.float32)), persistent=False)
        self.register_buffer("cols", torch.as_tensor(np.array(cols, dtype=np.float32)), persistent=False)
        for name, value in (("mean", mean), ("std", std)):
            per_channel = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1, 1)
            self.register_buffer(name, per_channel, persistent=False)
        self.scale = scale
        self.version = version

    def resample(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W) -> float32 (B, T, h, w) holding the published uint8 frames."""
        # float64, outside autocast: bf16 autocast or TF32 matmuls would move pixels across a
        # rounding boundary; float64 is exempt from both and costs little at these sizes.
        with torch.autocast(clip.device.type, enabled=False):
            x = clip.to(torch.float64)
            x = torch.matmul(torch.matmul(self.rows.double(), x), self.cols.double().t())
            return x.round_().clamp_(0, 255).float()

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = self.resample(clip).unsqueeze(1) / self.scale  # (B, 1, T, h, w)
        return (x - self.mean) / self.std  # broadcasts grey to 3 channels: (B, 3, T, h, w)


def echoprime_preprocess(size: int = CLIP_SIZE) -> PublishedPreprocess:
    """EchoPrime: crop 10 % per side, cubic to 224, uint8, (x - mean) / std on the 0-255 scale."""
    axis = echoprime_axis(size)
    version = PREPROCESS_VERSION["echoprime"]
    return PublishedPreprocess(axis, axis, 1.0, ECHOPRIME_MEAN, ECHOPRIME_STD, version)


def panecho_preprocess(size: int = CLIP_SIZE) -> PublishedPreprocess:
    """PanEcho: area resize to 256, uint8, centre crop 224, scale to 0-1, ImageNet normalisation."""
    axis = panecho_axis(size)
    return PublishedPreprocess(axis, axis, 255.0, IMAGENET_MEAN, IMAGENET_STD, PREPROCESS_VERSION["panecho"])
