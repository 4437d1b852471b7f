"""Landmark metrics over a whole split, summed per rank and all-reduced across DDP ranks.

* point error: mean Euclidean distance between matched points, in px of the 112-px frame and in
  % of the image size (EchoGraphs reported %, the paper px; both are given, per ED and ES);
* Dice of the landmark polygons (40 points, closed through the base), rasterised on 112x112;
* EF from the predicted ED/ES contours by the method of discs (20 chords (i, 39-i), long axis from
  the base midpoint to the apex, chords taken at disc centres) vs the label EF, as MAE in points.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

SIZE = 112
KEYS = ("err_ed", "err_es", "dice_ed", "dice_es", "ef_abs", "n")


def point_error_px(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(..., 40, 2) normalised -> mean point distance in px per leading index."""
    return np.linalg.norm((pred - target) * SIZE, axis=-1).mean(-1)


def polygon_mask(points_px: np.ndarray) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [np.round(points_px * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def dice(pred_px: np.ndarray, target_px: np.ndarray) -> float:
    a, b = polygon_mask(pred_px), polygon_mask(target_px)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def volume_from_points(points: np.ndarray) -> float:
    """Method of discs from 40 contour points (any unit; the constant cancels in EF)."""
    p = np.asarray(points, np.float64)
    chords = p[:20] - p[::-1][:20]  # (i, 39 - i)
    diam = np.linalg.norm(chords, axis=1)
    mids = (p[:20] + p[::-1][:20]) / 2
    # Chord 0 is basal, chord 19 apical; their centres are 19/20 of the long axis apart.
    length = np.linalg.norm(mids[0] - mids[19]) * 20 / 19
    return float(np.sum(np.pi * (diam / 2) ** 2) * length / 20)


def ef_from_landmarks(landmarks: np.ndarray) -> float:
    """(2, 40, 2) ED then ES -> EF in %."""
    ved, ves = volume_from_points(landmarks[0]), volume_from_points(landmarks[1])
    return 100.0 * (ved - ves) / ved if ved > 0 else float("nan")


class LandmarkMetrics:
    """Accumulates sums on one rank; ``compute`` all-reduces them when a process group is up."""

    def __init__(self):
        self.sums = dict.fromkeys(KEYS, 0.0)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, ef) -> None:
        pred, target = _np(pred), _np(target)
        ef = np.asarray(_np(ef), np.float64).reshape(-1)
        err = point_error_px(pred, target)  # (B, 2)
        self.sums["err_ed"] += float(err[:, 0].sum())
        self.sums["err_es"] += float(err[:, 1].sum())
        for b in range(len(pred)):
            self.sums["dice_ed"] += dice(pred[b, 0] * SIZE, target[b, 0] * SIZE)
            self.sums["dice_es"] += dice(pred[b, 1] * SIZE, target[b, 1] * SIZE)
            est = ef_from_landmarks(pred[b])
            self.sums["ef_abs"] += abs(est - ef[b]) if np.isfinite(est) else 100.0
        self.sums["n"] += len(pred)

    def compute(self) -> dict[str, float]:
        t = torch.tensor([self.sums[k] for k in KEYS], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t)
        s = dict(zip(KEYS, t.cpu().tolist()))
        n = max(s["n"], 1.0)
        ed, es = s["err_ed"] / n, s["err_es"] / n
        return {"val_px_error": (ed + es) / 2, "val_px_error_ed": ed, "val_px_error_es": es,
                "val_pct_error": 100 * (ed + es) / 2 / SIZE, "val_dice_ed": s["dice_ed"] / n,
                "val_dice_es": s["dice_es"] / n, "val_ef_mae": s["ef_abs"] / n, "val_n": int(s["n"])}


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
