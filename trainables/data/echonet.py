"""Read the official EchoNet-Dynamic layout into validated, labelled samples.

Layout (DOMAIN.md §1): ``<root>/FileList.csv``, ``<root>/VolumeTracings.csv``,
``<root>/Videos/<FileName>.avi``. Every video that cannot become a sample is returned in
``rejected`` with a reason of the form ``"<code>: <detail>"``; nothing is dropped silently and
no defect of one video raises. Only layout-level problems (a missing file or folder, a wrong CSV
header) raise :class:`EchoNetLayoutError`, because then no video can be trusted.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILELIST_HEADER = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
TRACINGS_HEADER = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}
FRAME_SIZE = 112
ROWS_PER_FRAME = 21  # 1 long-axis row + 20 chords (DOMAIN.md §1.3)
N_POINTS = 40


class EchoNetLayoutError(ValueError):
    """The dataset folder itself is unusable (missing file/folder, wrong CSV header)."""


@dataclass
class EchoSample:
    """One video that passed every check; coordinates are pixels of the 112-px frame."""

    file_name: str  # without ".avi", as in FileList.csv
    split: str  # "train" | "val" | "test"
    fps: float
    n_frames: int  # decoded frame count
    ef: float
    edv: float
    esv: float
    ed_frame: int
    es_frame: int
    ed_rows: np.ndarray  # (21, 4) raw X1,Y1,X2,Y2 rows in file order
    es_rows: np.ndarray
    avi_path: Path = field(repr=False, default=None)

    @property
    def ed_points(self) -> np.ndarray:
        return rows_to_points(self.ed_rows)

    @property
    def es_points(self) -> np.ndarray:
        return rows_to_points(self.es_rows)

    @property
    def ed_axis(self) -> np.ndarray:
        return self.ed_rows[0].copy()

    @property
    def es_axis(self) -> np.ndarray:
        return self.es_rows[0].copy()


# ---------------------------------------------------------------------------------------------
# Geometry shared by the reader, the synthetic writer and the stream
# ---------------------------------------------------------------------------------------------

def rows_to_points(rows: np.ndarray) -> np.ndarray:
    """21 tracing rows -> (40, 2) landmarks in the EchoGraphs order (DESIGN.md conventions).

    Points 0-19 are (X1, Y1) of chord rows 2..21, points 20-39 are (X2, Y2) of rows 21..2, so the
    open contour walks down one wall and back up the other and (i, 39 - i) span one chord.
    """
    rows = np.asarray(rows, dtype=np.float64)
    chords = rows[1:]
    return np.concatenate([chords[:, 0:2], chords[::-1, 2:4]]).astype(np.float32)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of the closed polygon through ``points`` (N, 2)."""
    x, y = np.asarray(points, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def volume_by_discs(rows: np.ndarray) -> float:
    """Method of discs on one tracing, in px³: 20 discs of height L/20 along the long axis.

    The constant in the disc height cancels in EF; EDV/ESV in mL need a pixel spacing, which
    EchoNet does not publish (DOMAIN.md §1.1).
    """
    rows = np.asarray(rows, dtype=np.float64)
    axis_len = math.hypot(rows[0, 2] - rows[0, 0], rows[0, 3] - rows[0, 1])
    diameters = np.hypot(rows[1:, 2] - rows[1:, 0], rows[1:, 3] - rows[1:, 1])
    return float(np.sum(np.pi * (diameters / 2) ** 2) * axis_len / len(diameters))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _read_csv(path: Path, header: list[str]) -> list[dict]:
    if not path.is_file():
        raise EchoNetLayoutError(f"{path}: missing; an EchoNet-Dynamic root holds FileList.csv, "
                                 f"VolumeTracings.csv and Videos/")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        found = next(reader, None)
        if found is None or [h.strip() for h in found] != header:
            raise EchoNetLayoutError(f"{path}: header {found!r} is not the EchoNet-Dynamic header "
                                     f"{','.join(header)}")
        return [dict(zip(header, row)) for row in reader if row]


def _stem(name: str) -> str:
    name = name.strip()
    return name[:-4] if name.lower().endswith(".avi") else name


def _group_tracings(rows: list[dict]) -> dict[str, list[tuple[int, tuple[float, ...], str]]]:
    """file stem -> [(frame, (x1, y1, x2, y2), raw line)] in file order."""
    groups: dict[str, list] = defaultdict(list)
    for row in rows:
        stem = _stem(row["FileName"])
        try:
            coords = tuple(float(row[k]) for k in ("X1", "Y1", "X2", "Y2"))
            frame = int(float(row["Frame"]))
        except (TypeError, ValueError):
            coords, frame = (math.nan,) * 4, -1  # judged per video below, never raised
        groups[stem].append((frame, coords, tuple(row.get(k) for k in TRACINGS_HEADER)))
    return groups


def _check_tracings(entries: list) -> tuple[dict[int, np.ndarray] | None, str | None]:
    """Validate one video's tracing rows; returns ({frame: (21, 4) rows}, None) or (None, reason)."""
    if not entries:
        return None, "untraced: no rows in VolumeTracings.csv"
    raw = [e[2] for e in entries]
    if len(set(raw)) != len(raw):
        return None, "duplicate_rows: identical tracing rows repeated in VolumeTracings.csv"
    if any(e[0] < 0 for e in entries):
        return None, "bad_value: a Frame value is not an integer"
    frames: dict[int, list] = defaultdict(list)
    for frame, coords, _ in entries:
        frames[frame].append(coords)
    if len(frames) != 2:
        return None, f"traced_frames: {len(frames)} traced frame(s) {sorted(frames)}, expected 2"
    out = {}
    for frame, coords in frames.items():
        if len(coords) != ROWS_PER_FRAME:
            return None, f"rows_per_frame: traced frame {frame} has {len(coords)} rows, expected {ROWS_PER_FRAME}"
        arr = np.asarray(coords, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            return None, f"non_finite: traced frame {frame} has NaN/inf or unparsable coordinates"
        out[frame] = arr
    return out, None


def _parse_filelist_row(row: dict) -> tuple[dict | None, str | None]:
    split = row["Split"].strip().upper()
    if split not in SPLITS:
        return None, f"unknown_split: Split {row['Split']!r} is not one of {', '.join(SPLITS)}"
    try:
        vals = {k: float(row[k]) for k in ("EF", "ESV", "EDV", "FPS")}
        h, w, n = (int(float(row[k])) for k in ("FrameHeight", "FrameWidth", "NumberOfFrames"))
    except (TypeError, ValueError) as exc:
        return None, f"bad_value: FileList.csv row is not numeric ({exc})"
    if not all(math.isfinite(v) for v in vals.values()) or vals["FPS"] <= 0:
        return None, "bad_value: FileList.csv EF/ESV/EDV/FPS not finite or FPS <= 0"
    if (h, w) != (FRAME_SIZE, FRAME_SIZE):
        return None, f"frame_size: FileList.csv lists {h}x{w}, expected {FRAME_SIZE}x{FRAME_SIZE}"
    return dict(split=SPLITS[split], listed_frames=n, **vals), None


def probe_avi(path: Path) -> tuple[int, int, int]:
    """(n_frames, height, width) of an MJPEG AVI by demuxing its packets (no full decode).

    Raises ``ValueError`` with the cause when the file cannot be read.
    """
    from trainables.data.mjpeg import read_packets, decode_gray

    packets, _ = read_packets(path)
    if not packets:
        raise ValueError("no video packets")
    first = decode_gray(packets[0])
    return len(packets), first.shape[0], first.shape[1]


def _check_video(stem: str, meta: dict, traced: dict, videos: Path) -> tuple[EchoSample | None, str | None]:
    avi = videos / f"{stem}.avi"
    if not avi.is_file():
        return None, f"missing_avi: {avi} does not exist"
    try:
        n_frames, h, w = probe_avi(avi)
    except Exception as exc:  # any decoder failure is this video's defect, not the run's
        return None, f"unreadable_avi: {avi.name}: {type(exc).__name__}: {exc}"
    if (h, w) != (FRAME_SIZE, FRAME_SIZE):
        return None, f"frame_size: {avi.name} decodes to {h}x{w}, expected {FRAME_SIZE}x{FRAME_SIZE}"
    if n_frames != meta["listed_frames"]:
        return None, f"frame_count: FileList.csv lists {meta['listed_frames']} frames, {avi.name} has {n_frames}"
    beyond = [f for f in traced if f >= n_frames]
    if beyond:
        return None, f"frame_out_of_range: traced frame {beyond[0]} >= {n_frames} decoded frames"
    (fa, ra), (fb, rb) = traced.items()
    area_a, area_b = polygon_area(rows_to_points(ra)), polygon_area(rows_to_points(rb))
    if math.isclose(area_a, area_b, rel_tol=1e-9, abs_tol=1e-9):
        return None, f"equal_areas: traced frames {fa} and {fb} have equal polygon areas ({area_a:.3f})"
    (ed, ed_rows), (es, es_rows) = ((fa, ra), (fb, rb)) if area_a > area_b else ((fb, rb), (fa, ra))
    return EchoSample(file_name=stem, split=meta["split"], fps=meta["FPS"], n_frames=n_frames,
                      ef=meta["EF"], edv=meta["EDV"], esv=meta["ESV"], ed_frame=ed, es_frame=es,
                      ed_rows=ed_rows.astype(np.float32), es_rows=es_rows.astype(np.float32),
                      avi_path=avi), None


def read_echonet(root: str | Path, progress=None) -> tuple[list[EchoSample], list[tuple[str, str]]]:
    """Read an EchoNet-Dynamic root.

    Returns ``(samples, rejected)``: samples in FileList order, and ``(file_name, reason)`` for
    every FileList row or traced video that could not become a sample.

    ``progress`` is an optional callable invoked once per FileList row (e.g. ``tqdm.update``).

    Example::

        samples, rejected = read_echonet("/data/EchoNet-Dynamic")
        print(len(samples), "videos;", len(rejected), "rejected")
    """
    root = Path(root)
    if not root.is_dir():
        raise EchoNetLayoutError(f"{root}: not a folder")
    filelist = _read_csv(root / "FileList.csv", FILELIST_HEADER)
    tracings = _group_tracings(_read_csv(root / "VolumeTracings.csv", TRACINGS_HEADER))
    videos = root / "Videos"
    if not videos.is_dir():
        raise EchoNetLayoutError(f"{videos}: missing Videos/ folder (it holds <FileName>.avi)")

    samples, rejected, seen = [], [], set()
    for row in filelist:
        stem = _stem(row["FileName"])
        if stem in seen:
            rejected.append((stem, "duplicate_video: listed more than once in FileList.csv"))
            continue
        seen.add(stem)
        sample, reason = _judge(stem, row, tracings.get(stem, []), videos)
        if sample is None:
            rejected.append((stem, reason))
        else:
            samples.append(sample)
        if progress:
            progress()
    for stem in sorted(set(tracings) - seen):
        rejected.append((stem, "not_in_filelist: traced in VolumeTracings.csv but absent from FileList.csv"))
    return samples, rejected


def _judge(stem: str, row: dict, entries: list, videos: Path) -> tuple[EchoSample | None, str | None]:
    # FileList-level defects first: the 6 real 768-px videos are also untraced, and their size
    # is the more useful reason.
    meta, reason = _parse_filelist_row(row)
    if reason:
        return None, reason
    traced, reason = _check_tracings(entries)
    if reason:
        return None, reason
    return _check_video(stem, meta, traced, videos)


def rejection_code(reason: str) -> str:
    """The stable code before the colon of a rejection reason (used for summaries)."""
    return reason.split(":", 1)[0]
