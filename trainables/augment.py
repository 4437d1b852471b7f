"""One augmentation strength s in [0, 1] for clips and their landmarks.

s scales every transform: rotation (up to ±25°), scale (±20 %), shift (±10 % of the frame), a
horizontal flip (probability s/2) that reverses the point list so index 0 keeps its meaning
(EchoGraphs' HorizontalFlipKeepIndexOrder), brightness, contrast, gamma, speckle-like noise, and
a jitter of the 14 interior clip frames (ED at 0 and ES at 15 never move). One transform is drawn
per clip and applied to all 16 frames and both landmark sets exactly; s = 0 is the identity.
Randomness comes from the sample's generator (``stream.sample_rng``), so it is reproducible.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from trainables.data.stream import ed_es_clip_indices

SIZE = 112
MAX_ROT_DEG, MAX_SCALE, MAX_SHIFT = 25.0, 0.20, 0.10
MAX_BRIGHT, MAX_CONTRAST, MAX_LOG_GAMMA, MAX_NOISE = 0.15, 0.25, 0.35, 10.0
MAX_JITTER = 2  # frames


def affine(rng: np.random.Generator, s: float) -> tuple[np.ndarray, bool]:
    """2x3 pixel-space matrix (pixel centres at integer coordinates) and whether it flips."""
    angle = math.radians(rng.uniform(-1, 1) * MAX_ROT_DEG * s)
    scale = 1 + rng.uniform(-1, 1) * MAX_SCALE * s
    shift = rng.uniform(-1, 1, 2) * MAX_SHIFT * s * SIZE
    flip = bool(rng.random() < 0.5 * s)
    c = (SIZE - 1) / 2
    a, b = scale * math.cos(angle), scale * math.sin(angle)
    rot = np.array([[a, -b, c - a * c + b * c + shift[0]], [b, a, c - b * c - a * c + shift[1]]])
    if flip:  # x -> (SIZE - 1) - x, applied before the rotation
        rot = rot @ np.array([[-1, 0, SIZE - 1], [0, 1, 0], [0, 0, 1]], dtype=float)
    return rot, flip


def transform_landmarks(landmarks: np.ndarray, matrix: np.ndarray, flip: bool) -> np.ndarray:
    """(2, 40, 2) normalised -> transformed normalised; a flip also reverses the point order."""
    px = landmarks * SIZE
    out = px @ matrix[:, :2].T + matrix[:, 2]
    if flip:
        out = out[:, ::-1]
    return (out / SIZE).astype(np.float32)


def photometric(clip: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    x = clip.astype(np.float32) / 255
    gamma = math.exp(rng.uniform(-1, 1) * MAX_LOG_GAMMA * s)
    contrast = 1 + rng.uniform(-1, 1) * MAX_CONTRAST * s
    bright = rng.uniform(-1, 1) * MAX_BRIGHT * s
    x = np.clip(x, 0, 1) ** gamma
    x = (x - x.mean()) * contrast + x.mean() + bright
    x = x * 255 + rng.normal(0, MAX_NOISE * s, x.shape).astype(np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def jittered_clip_indices(s: float):
    """A ``clip_fn`` for the stream: ED..ES indices with interior frames moved by up to 2*s frames.

    Frames stay inside the traced segment (so inside every shard window) and in temporal order.
    """
    def clip_fn(ed: int, es: int, rng: np.random.Generator) -> np.ndarray:
        idx = ed_es_clip_indices(ed, es)
        amp = int(round(MAX_JITTER * s))
        if amp == 0:
            return idx
        lo, hi = min(ed, es), max(ed, es)
        inner = np.clip(idx[1:-1] + rng.integers(-amp, amp + 1, 14), lo, hi)
        inner = np.sort(inner) if es >= ed else np.sort(inner)[::-1]
        return np.concatenate([[ed], inner, [es]]).astype(np.int64)
    return clip_fn


def augment(item: dict, rng: np.random.Generator, strength: float) -> dict:
    """Return a new item with the clip and landmarks transformed consistently (s = 0: unchanged)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"aug_strength must be in [0, 1], not {strength}")
    if strength == 0:
        return item
    matrix, flip = affine(rng, strength)
    frames = [cv2.warpAffine(f, matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderValue=0)
              for f in item["clip"]]
    clip = photometric(np.stack(frames), rng, strength)
    return item | {"clip": clip, "landmarks": transform_landmarks(item["landmarks"], matrix, flip)}


class Augment:
    """Picklable ``transform(item, rng)`` for the stream's DataLoader workers."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        return augment(item, rng, self.strength)
