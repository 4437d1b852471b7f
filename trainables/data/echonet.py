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
    """Rows as {column: text}, plus ``_line`` (1-based line number) and ``_cells`` (cells found).

    Short and long rows are kept, not padded or cut: judging them is per video (``_row_problem``).
    """
    if not path.is_file():
        raise EchoNetLayoutError(f"{path}: missing; an EchoNet-Dynamic root holds FileList.csv, "
                                 f"VolumeTracings.csv and Videos/")
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark that is not part of the header.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            found = next(reader, None)
            if found is None or [h.strip() for h in found] != header:
                raise EchoNetLayoutError(f"{path}: header {found!r} is not the EchoNet-Dynamic header "
                                         f"{','.join(header)}")
            return [dict(zip(header, row), _line=reader.line_num, _cells=len(row))
                    for row in reader if any(c.strip() for c in row)]
        except UnicodeDecodeError as exc:
            raise EchoNetLayoutError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                                     f"at offset {exc.start}); re-save it as UTF-8 CSV") from None
        except csv.Error as exc:
            raise EchoNetLayoutError(f"{path} line {reader.line_num}: not readable as CSV ({exc})") from None


def _stem(name: str | None) -> str:
    name = (name or "").strip()
    return name[:-4] if name.lower().endswith(".avi") else name


def _row_problem(row: dict, header: list[str], code: str, where: str) -> str | None:
    """``code: ...`` naming the first missing, empty or surplus cell of a CSV row, else None."""
    if row["_cells"] > len(header):
        return (f"{code}: {row['_cells']} cells, the header has {len(header)} "
                f"(a comma inside a value?) ({where})")
    for key in header:
        if key not in row:
            return f"{code}: {key} is missing, the row has {row['_cells']} of {len(header)} cells ({where})"
        if not row[key].strip():
            return f"{code}: {key} is empty ({where})"
    return None


def _number(row: dict, key: str, where: str,
            non_finite: str = "bad_value") -> tuple[float | None, str | None]:
    """(value, None) for a finite number in ``row[key]``, else (None, reason naming the column)."""
    text = row[key].strip()
    try:
        value = float(text)
    except ValueError:
        return None, f"bad_value: {key} {text!r} is not a number ({where})"
    if not math.isfinite(value):
        return None, f"{non_finite}: {key} {text!r} is not finite ({where})"
    return value, None


def _count(row: dict, key: str, where: str, minimum: int = 0) -> tuple[int | None, str | None]:
    """(value, None) for a whole number >= ``minimum`` in ``row[key]`` (``12`` or ``12.0``), else a reason."""
    text = row[key].strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        return None, f"bad_value: {key} {text!r} is not an integer ({where})"
    if value < minimum:
        limit = "negative" if minimum == 0 else f"below {minimum}"
        return None, f"bad_value: {key} {int(value)} is {limit} ({where})"
    return int(value), None


def _parse_tracing(row: dict) -> tuple[int, tuple[float, ...], str | None]:
    """(frame, (x1, y1, x2, y2), None), or (-1, NaNs, reason naming the column and line)."""
    where = f"VolumeTracings.csv line {row['_line']}"
    bad = (-1, (math.nan,) * 4)
    problem = _row_problem(row, TRACINGS_HEADER, "bad_tracing_row", where)
    if problem:
        return (*bad, problem)
    coords = []
    for key in ("X1", "Y1", "X2", "Y2"):
        value, problem = _number(row, key, where, non_finite="non_finite")
        if problem:
            return (*bad, problem)
        coords.append(value)
    frame, problem = _count(row, "Frame", where)
    if problem:
        return (*bad, problem)
    return frame, tuple(coords), None


def _group_tracings(rows: list[dict]) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """(file stem -> [(frame, (x1, y1, x2, y2), raw cells, problem)] in file order, rejected rows).

    A row with an unparsable cell stays in its video's list with the problem: the video is
    rejected with that reason (``_check_tracings``), never the run. A row without a FileName
    belongs to no video and is rejected on its own, under its line number.
    """
    groups: dict[str, list] = defaultdict(list)
    orphans = []
    for row in rows:
        stem = _stem(row.get("FileName"))
        if not stem:
            orphans.append((f"VolumeTracings.csv line {row['_line']}",
                            f"bad_tracing_row: FileName is empty (VolumeTracings.csv line {row['_line']})"))
            continue
        frame, coords, problem = _parse_tracing(row)
        groups[stem].append((frame, coords, tuple(row.get(k) for k in TRACINGS_HEADER), problem))
    return groups, orphans


def _check_tracings(entries: list) -> tuple[dict[int, np.ndarray] | None, str | None]:
    """Validate one video's tracing rows; returns ({frame: (21, 4) rows}, None) or (None, reason)."""
    if not entries:
        return None, "untraced: no rows in VolumeTracings.csv"
    problem = next((e[3] for e in entries if e[3]), None)
    if problem:
        return None, problem
    raw = [e[2] for e in entries]
    if len(set(raw)) != len(raw):
        return None, "duplicate_rows: identical tracing rows repeated in VolumeTracings.csv"
    frames: dict[int, list] = defaultdict(list)
    for frame, coords, _, _ in entries:
        frames[frame].append(coords)
    if len(frames) != 2:
        return None, f"traced_frames: {len(frames)} traced frame(s) {sorted(frames)}, expected 2"
    out = {}
    for frame, coords in frames.items():
        if len(coords) != ROWS_PER_FRAME:
            return None, f"rows_per_frame: traced frame {frame} has {len(coords)} rows, expected {ROWS_PER_FRAME}"
        out[frame] = np.asarray(coords, dtype=np.float64)
    return out, None


def _parse_filelist_row(row: dict) -> tuple[dict | None, str | None]:
    where = f"FileList.csv line {row['_line']}"
    problem = _row_problem(row, FILELIST_HEADER, "bad_filelist_row", where)
    if problem:
        return None, problem
    split = row["Split"].strip().upper()
    if split not in SPLITS:
        return None, f"unknown_split: Split {row['Split']!r} is not one of {', '.join(SPLITS)}"
    vals = {}
    for key in ("EF", "ESV", "EDV", "FPS"):
        vals[key], problem = _number(row, key, where)
        if problem:
            return None, problem
    if vals["FPS"] <= 0:
        return None, f"bad_value: FPS {row['FPS'].strip()!r} is not positive ({where})"
    ints = {}
    for key in ("FrameHeight", "FrameWidth", "NumberOfFrames"):
        ints[key], problem = _count(row, key, where, minimum=1)
        if problem:
            return None, problem
    h, w = ints["FrameHeight"], ints["FrameWidth"]
    if (h, w) != (FRAME_SIZE, FRAME_SIZE):
        return None, f"frame_size: FileList.csv lists {h}x{w}, expected {FRAME_SIZE}x{FRAME_SIZE}"
    return dict(split=SPLITS[split], listed_frames=ints["NumberOfFrames"], **vals), None


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
    tracings, rejected = _group_tracings(_read_csv(root / "VolumeTracings.csv", TRACINGS_HEADER))
    videos = root / "Videos"
    if not videos.is_dir():
        raise EchoNetLayoutError(f"{videos}: missing Videos/ folder (it holds <FileName>.avi)")

    samples, seen = [], set()
    for row in filelist:
        name, sample, reason = _judge_row(row, seen, tracings, videos)
        if sample is None:
            rejected.append((name, reason))
        else:
            samples.append(sample)
        if progress:
            progress()
    for stem in sorted(set(tracings) - seen):
        rejected.append((stem, "not_in_filelist: traced in VolumeTracings.csv but absent from FileList.csv"))
    return samples, rejected


def _judge_row(row: dict, seen: set, tracings: dict,
               videos: Path) -> tuple[str, EchoSample | None, str | None]:
    """(name, sample, None) or (name, None, reason) for one FileList row; ``seen`` collects names."""
    stem = _stem(row.get("FileName"))
    if not stem:  # no name to file the rejection under: the line number stands in for it
        where = f"FileList.csv line {row['_line']}"
        return where, None, f"bad_filelist_row: FileName is empty ({where})"
    if stem in seen:
        return stem, None, "duplicate_video: listed more than once in FileList.csv"
    seen.add(stem)
    sample, reason = _judge(stem, row, tracings.get(stem, []), videos)
    return stem, sample, reason


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
