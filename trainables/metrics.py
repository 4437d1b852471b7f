"""Landmark metrics over a whole split, summed per rank and all-reduced across DDP ranks.

* point error: mean Euclidean distance between matched points, in px of the 112-px frame and in
  % of the image size (EchoGraphs reported %, the paper px; both are given, per ED and ES);
* Dice of the landmark polygons (40 points, closed through the base), from exact polygon areas
  (shapely), both as the mean over videos (``val_dice_ed``) and pooled over the split as
  EchoNet-Dynamic reports it, 2·ΣI / Σ(|A| + |B|) (``val_dice_ed_pooled``);
* EF from the predicted ED/ES contours by the method of discs (20 chords (i, 39-i), long axis from
  the base midpoint to the apex, chords taken at disc centres), as MAE in points against two
  references: the FileList EF (``val_ef_mae_label``) and the EF computed by the *same* method from
  the ground-truth contours (``val_ef_mae_contour``). On real data the label EF comes from the
  clinical tracing workflow, not from these 40 points, so the first mixes method mismatch with
  landmark error; the second isolates landmark error (on the synthetic data they agree closely).
"""

from __future__ import annotations

import numpy as np
import shapely
import torch

SIZE = 112
FRAMES = ("ed", "es")
KEYS = ("err_ed", "err_es", "dice_ed", "dice_es", "inter_ed", "inter_es", "areas_ed", "areas_es",
        "ef_abs_label", "ef_abs_contour", "n")
NON_FINITE_EF_ERROR = 100.0  # EF points charged for a degenerate predicted contour (ED volume 0)


def point_error_px(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(..., 40, 2) normalised -> mean point distance in px per leading index."""
    return np.linalg.norm((pred - target) * SIZE, axis=-1).mean(-1)


def polygon(points_px: np.ndarray) -> shapely.Geometry:
    """The region enclosed by the closed landmark polygon.

    A predicted contour may cross itself; ``make_valid`` turns a bow-tie into the union of its
    lobes (what a filled outline shows) instead of shapely's signed-area nonsense.
    """
    poly = shapely.Polygon(np.asarray(points_px, np.float64))
    return poly if poly.is_valid else shapely.make_valid(poly)


def overlap(pred_px: np.ndarray, target_px: np.ndarray) -> tuple[float, float]:
    """(intersection area, |pred| + |target|) of two landmark polygons, exact, in px²."""
    if not np.isfinite(pred_px).all():  # a diverged prediction overlaps nothing
        return 0.0, float(polygon(target_px).area)
    a, b = polygon(pred_px), polygon(target_px)
    return float(shapely.intersection(a, b).area), float(a.area + b.area)


def dice(pred_px: np.ndarray, target_px: np.ndarray) -> float:
    inter, areas = overlap(pred_px, target_px)
    return 1.0 if areas == 0 else 2.0 * inter / areas


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


def _ef_error(estimate: float, reference: float) -> float:
    if not np.isfinite(reference):
        return 0.0 if not np.isfinite(estimate) else NON_FINITE_EF_ERROR
    return abs(estimate - reference) if np.isfinite(estimate) else NON_FINITE_EF_ERROR


class LandmarkMetrics:
    """Accumulates sums on one rank; ``compute`` all-reduces them when a process group is up."""

    def __init__(self):
        self.sums = dict.fromkeys(KEYS, 0.0)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, ef) -> None:
        pred, target = _np(pred), _np(target)
        ef = np.asarray(_np(ef), np.float64).reshape(-1)
        err = point_error_px(pred, target)  # (B, 2)
        s = self.sums
        for f, name in enumerate(FRAMES):
            s[f"err_{name}"] += float(err[:, f].sum())
        for b in range(len(pred)):
            for f, name in enumerate(FRAMES):
                inter, areas = overlap(pred[b, f] * SIZE, target[b, f] * SIZE)
                s[f"dice_{name}"] += 1.0 if areas == 0 else 2.0 * inter / areas
                s[f"inter_{name}"] += inter
                s[f"areas_{name}"] += areas
            est = ef_from_landmarks(pred[b])
            s["ef_abs_label"] += _ef_error(est, ef[b])
            s["ef_abs_contour"] += _ef_error(est, ef_from_landmarks(target[b]))
        s["n"] += len(pred)

    def compute(self) -> dict[str, float]:
        t = torch.tensor([self.sums[k] for k in KEYS], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t)
        s = dict(zip(KEYS, t.cpu().tolist()))
        n = max(s["n"], 1.0)
        ed, es = s["err_ed"] / n, s["err_es"] / n
        out = {"val_px_error": (ed + es) / 2, "val_px_error_ed": ed, "val_px_error_es": es,
               "val_pct_error": 100 * (ed + es) / 2 / SIZE}
        for name in FRAMES:
            out[f"val_dice_{name}"] = s[f"dice_{name}"] / n
            out[f"val_dice_{name}_pooled"] = 2 * s[f"inter_{name}"] / s[f"areas_{name}"] if s[f"areas_{name}"] else 1.0
        out |= {"val_ef_mae_label": s["ef_abs_label"] / n, "val_ef_mae_contour": s["ef_abs_contour"] / n,
                "val_n": int(s["n"])}
        return out


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
