"""Write a synthetic dataset in the exact EchoNet-Dynamic layout (FileList.csv, VolumeTracings.csv,
Videos/*.avi as MJPG 112x112), so every data path can be tested without the real release.

The picture: an ultrasound sector with speckle, and a beating bullet-shaped left ventricle
(apex up, near the transducer) whose position, size and tilt vary per video. Tracings are
computed from the same analytic wall that is drawn, so the landmarks sit on the drawn cavity and
the task is learnable; EF/EDV/ESV follow from the written tracings by the method of discs.

    python -m trainables.data.synthetic --out DIR --videos N --seed S [--defects]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from trainables.data.echonet import FILELIST_HEADER, TRACINGS_HEADER, volume_by_discs

SIZE = 112
N_CHORDS = 20
GENERATOR_VERSION = 1
# Frame rates of the real release: median 50 (7,959 of 10,030 videos), range 18-138 (DOMAIN.md §1.2).
OTHER_FPS = (30, 37, 44, 52, 55, 60, 73, 88, 100)
DEFECTS = (
    "missing_avi", "unreadable_avi", "rows_per_frame", "one_traced_frame", "three_traced_frames",
    "untraced", "non_finite", "frame_out_of_range", "equal_areas", "duplicate_rows",
    "unknown_split", "frame_size", "frame_count", "not_in_filelist",
)


@dataclass
class Heart:
    """Analytic LV of one video; ``rows(t)`` gives the 21 tracing rows of frame t."""

    apex: np.ndarray  # (x, y) in px
    theta: float  # tilt of the long axis, rad
    length: float  # apex to base at ED, px
    width: float  # half-width at the base at ED, px
    es_w: float  # ES/ED width factor
    es_l: float  # ES/ED length factor
    t_ed: int
    n_sys: int  # frames ED -> ES
    n_dia: int  # frames ES -> next ED

    def contraction(self, t: int) -> float:
        """0 at every ED frame, 1 at every ES frame, smooth (cosine) in between."""
        phase = (t - self.t_ed) % (self.n_sys + self.n_dia)
        if phase <= self.n_sys:
            return (1 - math.cos(math.pi * phase / self.n_sys)) / 2
        return (1 + math.cos(math.pi * (phase - self.n_sys) / self.n_dia)) / 2

    def frame_shape(self, t: int) -> tuple[float, float]:
        g = self.contraction(t)
        return self.length * (1 - (1 - self.es_l) * g), self.width * (1 - (1 - self.es_w) * g)

    def _axes(self):
        down = np.array([math.sin(self.theta), math.cos(self.theta)])  # apex -> base
        side = np.array([math.cos(self.theta), -math.sin(self.theta)])
        return down, side

    @staticmethod
    def half_width(u: np.ndarray, width: float) -> np.ndarray:
        # Round apex (quarter ellipse) that narrows slightly towards the mitral annulus.
        return width * np.sqrt(np.clip(u * (2 - u), 0, 1)) * (1 - 0.12 * u ** 4)

    def wall(self, t: int, u: np.ndarray, grow: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Left and right wall points at axial fractions u (0 apex, 1 base), grown outwards by px."""
        length, width = self.frame_shape(t)
        down, side = self._axes()
        centre = self.apex[None] + (u * length)[:, None] * down[None] - grow * down[None] * (1 - u)[:, None]
        h = (self.half_width(u, width) + grow)[:, None]
        return centre - h * side[None], centre + h * side[None]

    def rows(self, t: int) -> np.ndarray:
        """Row 1: long axis apex -> base midpoint; rows 2..21: chords from base to apex."""
        length, _ = self.frame_shape(t)
        down, _ = self._axes()
        u = (np.arange(N_CHORDS)[::-1] + 0.5) / N_CHORDS
        left, right = self.wall(t, u)
        axis = np.concatenate([self.apex, self.apex + length * down])
        return np.vstack([axis, np.hstack([left, right])])

    def outline(self, t: int, grow: float = 0.0) -> np.ndarray:
        u = np.linspace(0, 1, 48)
        left, right = self.wall(t, u, grow)
        return np.vstack([left[::-1], right])


def _sector_mask() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = xx - 55.5, yy + 6
    ang, rad = np.arctan2(dx, dy), np.hypot(dx, dy)
    return ((np.abs(ang) < math.radians(38)) & (rad < 120)).astype(np.float32)


SECTOR = _sector_mask()


def _fill(img: np.ndarray, poly: np.ndarray, value: float) -> None:
    # 4 fractional bits: sub-pixel edges, pixel centres at integer coordinates like the labels.
    cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], value, lineType=cv2.LINE_AA, shift=4)


def render_frame(heart: Heart, t: int, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = tissue.copy()
    _fill(img, heart.outline(t, grow=5.0), 0.85)  # myocardium: bright band around the cavity
    length, width = heart.frame_shape(t)
    down, _ = heart._axes()
    base = heart.apex + length * down
    cv2.ellipse(img, (int(base[0]), int(base[1] + 14)), (int(width), 13), 0, 0, 360, 0.08, -1)  # atrium
    _fill(img, heart.outline(t), 0.06)  # blood pool
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    speckle = cv2.GaussianBlur(rng.rayleigh(0.8, (SIZE, SIZE)).astype(np.float32), (0, 0), 0.6)
    out = np.clip(img * speckle * 190 * SECTOR, 0, 255).astype(np.uint8)
    return out


def _tissue(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.uniform(0.25, 0.55, (7, 7)).astype(np.float32)
    return cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


def _draw_heart(rng: np.random.Generator, fps: float, n_frames: int) -> tuple[Heart, int, int]:
    period = fps * 60 / rng.uniform(55, 110)
    n_sys = max(3, round(fps * float(np.clip(rng.normal(0.31, 0.08), 0.08, 0.6))))
    n_dia = max(4, round(period - n_sys))
    ef = float(np.clip(rng.normal(56, 11), 12, 85))
    ratio = 1 - ef / 100  # ESV/EDV = es_w² · es_l, split between width and length
    es_w, es_l = ratio ** (1 / 2.3), ratio ** (0.3 / 2.3)
    forward = bool(rng.random() < 0.5)
    lo = 0 if forward else n_dia
    hi = n_frames - 1 - (n_sys if forward else 0)
    t_ed = int(rng.integers(lo, max(lo, hi) + 1))
    t_es = t_ed + n_sys if forward else t_ed - n_dia
    heart = Heart(apex=np.array([rng.uniform(48, 64), rng.uniform(12, 24)]), theta=rng.uniform(-0.3, 0.3),
                  length=rng.uniform(50, 68), width=rng.uniform(13, 19), es_w=es_w, es_l=es_l,
                  t_ed=t_ed, n_sys=n_sys, n_dia=n_dia)
    return heart, t_ed, t_es


def _fmt(v: float) -> str:
    return f"{v:.8f}".rstrip("0").rstrip(".")


def write_avi(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """MJPG AVI as the EchoNet conversion writes it: OpenCV, grey replicated into 3 channels."""
    h, w = frames[0].shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG AVI {path}")
    for f in frames:
        writer.write(cv2.merge([f, f, f]))
    writer.release()


def _video(rng: np.random.Generator, max_frames: int | None) -> dict:
    fps = 50 if rng.random() < 0.8 else int(rng.choice(OTHER_FPS))
    n_frames = int(np.clip(round(rng.lognormal(math.log(171), 0.3)), 60, 400))
    if max_frames:
        n_frames = min(n_frames, max_frames)
    heart, t_ed, t_es = _draw_heart(rng, fps, n_frames)
    n_frames = max(n_frames, t_ed + 1, t_es + 1)
    tissue = _tissue(rng)
    frames = [render_frame(heart, t, tissue, rng) for t in range(n_frames)]
    # Round as the CSV will, so the volumes below match what a reader parses.
    ed_rows = np.vectorize(lambda v: float(_fmt(v)))(heart.rows(t_ed))
    es_rows = np.vectorize(lambda v: float(_fmt(v)))(heart.rows(t_es))
    spacing = rng.uniform(0.13, 0.17)  # cm per px: puts EDV near the real median (~100 mL)
    edv, esv = (volume_by_discs(r) * spacing ** 3 for r in (ed_rows, es_rows))
    groups = [(t_ed, ed_rows), (t_es, es_rows)]
    if rng.random() < 0.5:  # the release lists either frame first
        groups.reverse()
    return dict(fps=fps, n_frames=n_frames, frames=frames, groups=groups,
                ef=100 * (edv - esv) / edv, edv=edv, esv=esv)


def _tracing_lines(name: str, groups) -> list[list[str]]:
    return [[f"{name}.avi", *map(_fmt, row), str(frame)] for frame, rows in groups for row in rows]


def _apply_defect(kind: str, name: str, v: dict, fl_row: list, lines: list, videos: Path) -> tuple[list, list]:
    """Mutate one video's FileList row / tracing lines / AVI to show one defect of DOMAIN.md §1.4."""
    avi = videos / f"{name}.avi"
    (f0, r0), (f1, r1) = v["groups"]
    if kind == "missing_avi":
        avi.unlink()
    elif kind == "unreadable_avi":
        avi.write_bytes(b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(200))
    elif kind == "rows_per_frame":
        lines = _tracing_lines(name, [(f0, r0[:-1]), (f1, r1)])
    elif kind == "one_traced_frame":
        lines = _tracing_lines(name, [(f0, r0)])
    elif kind == "three_traced_frames":
        lines = _tracing_lines(name, [(f0, r0), (f1, r1), (min(f0, f1) + 1, (r0 + r1) / 2)])
    elif kind == "untraced":
        lines = []
    elif kind == "non_finite":
        lines[3][1] = "nan"
    elif kind == "frame_out_of_range":
        lines = _tracing_lines(name, [(f0, r0), (v["n_frames"] + 3, r1)])
    elif kind == "equal_areas":
        lines = _tracing_lines(name, [(f0, r0), (f1, r0)])
    elif kind == "duplicate_rows":
        lines = lines[:5] + [list(lines[4])] + lines[5:]
    elif kind == "unknown_split":
        fl_row[-1] = "HOLDOUT"
    elif kind == "frame_size":  # as the 6 real 768-px videos: large frames and no tracings
        fl_row[4:6] = ["768", "1024"]
        write_avi(avi, [np.full((768, 1024), 40, np.uint8)] * v["n_frames"], v["fps"])
        lines = []
    elif kind == "frame_count":
        fl_row[7] = str(v["n_frames"] + 7)
    elif kind == "not_in_filelist":
        fl_row = None
    return fl_row, lines


def _split_names(n: int, rng: np.random.Generator) -> list[str]:
    n_val = n_test = max(1, round(0.125 * n)) if n >= 3 else 0
    splits = ["VAL"] * n_val + ["TEST"] * n_test + ["TRAIN"] * (n - n_val - n_test)
    return [splits[i] for i in rng.permutation(n)]


def write_synthetic(out: str | Path, n_videos: int, seed: int = 0, defects: bool = False,
                    max_frames: int | None = None, progress: bool = False) -> dict[str, str]:
    """Write a synthetic EchoNet-Dynamic root at ``out``.

    Returns ``{file_name: defect}`` for the defective videos (empty unless ``defects``); the same
    map, with the generator settings, is saved in ``out/synthetic.json``.
    """
    if n_videos < 1:
        raise ValueError("--videos must be at least 1")
    out = Path(out)
    videos = out / "Videos"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = list(DEFECTS) if defects else []
    total = n_videos + len(kinds)
    names = [f"0X{rng.integers(0, 2**63):016X}" for _ in range(total)]
    splits = _split_names(n_videos, rng) + ["TRAIN"] * len(kinds)
    filelist, tracings, defect_map = [], [], {}
    bar = _progress(total, "synthetic videos", progress)
    for i, (name, split) in enumerate(zip(names, splits)):
        v = _video(np.random.default_rng([seed, i]), max_frames if i < n_videos else min(max_frames or 60, 60))
        write_avi(videos / f"{name}.avi", v["frames"], v["fps"])
        fl_row = [name, _fmt(v["ef"]), _fmt(v["esv"]), _fmt(v["edv"]), str(SIZE), str(SIZE),
                  str(v["fps"]), str(v["n_frames"]), split]
        lines = _tracing_lines(name, v["groups"])
        if i >= n_videos:
            kind = kinds[i - n_videos]
            fl_row, lines = _apply_defect(kind, name, v, fl_row, lines, videos)
            defect_map[name] = kind
        if fl_row is not None:
            filelist.append(fl_row)
        tracings.extend(lines)
        bar.update()
    bar.close()
    _write_csv(out / "FileList.csv", FILELIST_HEADER, filelist)
    _write_csv(out / "VolumeTracings.csv", TRACINGS_HEADER, tracings)
    meta = dict(generator="echotune.synthetic", version=GENERATOR_VERSION, seed=seed, videos=n_videos,
                max_frames=max_frames, defects=defect_map)
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return defect_map


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not enabled, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.data.synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--videos", type=int, default=32, help="number of valid videos (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--defects", action="store_true",
                   help=f"also write one malformed video per defect: {', '.join(DEFECTS)}")
    p.add_argument("--max-frames", type=int, default=None,
                   help="cap video length (default: lengths drawn like the real release, median ~170)")
    args = p.parse_args(argv)
    if args.videos < 1:
        p.error("--videos must be at least 1")
    defect_map = write_synthetic(args.out, args.videos, args.seed, args.defects, args.max_frames, progress=True)
    print(f"wrote {args.videos} synthetic EchoNet-format videos to {args.out}"
          + (f" (+{len(defect_map)} defective)" if defect_map else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
