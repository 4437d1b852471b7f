"""The EchoNet-Dynamic reader and the synthetic writer that stands in for the real release."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from trainables.data.echonet import (EchoNetLayoutError, polygon_area, read_echonet, rejection_code,
                                     rows_to_points, volume_by_discs)
from trainables.data.synthetic import DEFECTS, write_synthetic

EXPECTED_CODE = {d: d for d in DEFECTS} | {"one_traced_frame": "traced_frames",
                                           "three_traced_frames": "traced_frames"}


@pytest.fixture(scope="module")
def read(synthetic_root):
    root, defects = synthetic_root
    samples, rejected = read_echonet(root)
    return root, defects, samples, rejected


def test_every_valid_video_becomes_a_sample(read):
    root, defects, samples, rejected = read
    assert len(samples) == 12
    assert not {s.file_name for s in samples} & set(defects)
    assert {s.split for s in samples} == {"train", "val", "test"}
    for s in samples:
        assert s.ed_points.shape == s.es_points.shape == (40, 2)
        assert s.ed_axis.shape == (4,) and s.avi_path.is_file()


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_rejected_with_its_reason(read, defect):
    _, defects, _, rejected = read
    name = next(n for n, d in defects.items() if d == defect)
    reasons = [r for n, r in rejected if n == name]
    assert len(reasons) == 1, f"{defect}: {reasons}"
    assert rejection_code(reasons[0]) == EXPECTED_CODE[defect], reasons[0]
    assert len(reasons[0]) > len(EXPECTED_CODE[defect]) + 5  # a detail follows the code


def test_nothing_is_dropped_silently(read):
    root, defects, samples, rejected = read
    with (root / "FileList.csv").open() as f:
        listed = {row["FileName"] for row in csv.DictReader(f)}
    with (root / "VolumeTracings.csv").open() as f:
        traced = {row["FileName"][:-4] for row in csv.DictReader(f)}
    assert {s.file_name for s in samples} | {n for n, _ in rejected} == listed | traced


def test_ed_is_the_larger_polygon_whatever_the_row_order(read):
    root, _, samples, _ = read
    first_listed = {}
    with (root / "VolumeTracings.csv").open() as f:
        for row in csv.DictReader(f):
            first_listed.setdefault(row["FileName"][:-4], int(row["Frame"]))
    orders = {first_listed[s.file_name] == s.ed_frame for s in samples}
    assert orders == {True, False}, "the synthetic set must list ED first for some videos and ES first for others"
    for s in samples:
        assert polygon_area(s.ed_points) > polygon_area(s.es_points)
        # EF in FileList follows the tracings by the method of discs.
        ef = 100 * (1 - volume_by_discs(s.es_rows) / volume_by_discs(s.ed_rows))
        assert ef == pytest.approx(s.ef, abs=1e-4)


def test_rows_to_points_follows_the_echographs_order():
    rows = np.zeros((21, 4))
    rows[0] = [50, 10, 50, 90]  # long axis, dropped
    for r in range(1, 21):
        rows[r] = [r, 100 + r, 1000 + r, 2000 + r]
    pts = rows_to_points(rows)
    assert pts[0].tolist() == [1, 101] and pts[19].tolist() == [20, 120]
    assert pts[20].tolist() == [1020, 2020] and pts[39].tolist() == [1001, 2001]
    for i in range(20):  # (i, 39 - i) are the two ends of one chord
        assert pts[39 - i].tolist() == rows[i + 1, 2:].tolist()


def test_landmarks_sit_on_the_drawn_cavity(read):
    """Inside the ED contour the blood pool is dark; just outside it the wall is bright."""
    for s in read[2]:
        cap = cv2.VideoCapture(str(s.avi_path))
        cap.set(cv2.CAP_PROP_POS_FRAMES, s.ed_frame)
        frame = cap.read()[1][..., 0].astype(float)
        inside = np.zeros((112, 112), np.uint8)
        cv2.fillPoly(inside, [np.round(s.ed_points).astype(np.int32)], 1)
        eroded = cv2.erode(inside, np.ones((5, 5), np.uint8))
        ring = cv2.dilate(inside, np.ones((7, 7), np.uint8)) - inside
        assert frame[eroded > 0].mean() * 3 < frame[ring > 0].mean()


def test_synthetic_videos_are_mjpg_like_the_release(read):
    root, _, samples, _ = read
    with av.open(str(samples[0].avi_path)) as c:
        st = c.streams.video[0]
        assert (c.format.name, st.codec_context.name, st.codec_context.codec_tag) == ("avi", "mjpeg", "MJPG")
        assert (st.codec_context.width, st.codec_context.height) == (112, 112)
    cap = cv2.VideoCapture(str(samples[0].avi_path))
    bgr = cap.read()[1]
    assert np.abs(bgr[..., 0].astype(int) - bgr[..., 2]).max() <= 3  # grey replicated in 3 channels
    header = (root / "FileList.csv").read_text().splitlines()[0]
    assert header == "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"
    assert (root / "VolumeTracings.csv").read_text().splitlines()[0] == "FileName,X1,Y1,X2,Y2,Frame"


def test_synthetic_timing_is_drawn_like_the_release(tmp_path):
    """Lengths and rates like EchoNet (median ~170 frames, mostly 50 fps), both temporal orders, short gaps."""
    write_synthetic(tmp_path, n_videos=30, seed=3)
    samples, rejected = read_echonet(tmp_path)
    assert not rejected and len(samples) == 30
    assert 120 <= np.median([s.n_frames for s in samples]) <= 230
    assert np.mean([s.fps == 50 for s in samples]) >= 0.6
    gaps = [abs(s.es_frame - s.ed_frame) for s in samples]
    assert any(g < 16 for g in gaps) and any(g >= 16 for g in gaps)
    assert {s.es_frame < s.ed_frame for s in samples} == {True, False}


def test_synthetic_is_deterministic(tmp_path):
    write_synthetic(tmp_path / "a", 2, seed=5, max_frames=40)
    write_synthetic(tmp_path / "b", 2, seed=5, max_frames=40)
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "FileList.csv").unlink(), "FileList.csv: missing"),
    (lambda r: (r / "VolumeTracings.csv").unlink(), "VolumeTracings.csv: missing"),
    (lambda r: shutil.rmtree(r / "Videos"), "missing Videos/ folder"),
    (lambda r: (r / "FileList.csv").write_text("Name,EF\nx,1\n"), "FileList.csv: header"),
    (lambda r: (r / "VolumeTracings.csv").write_text("FileName,X,Y,Frame\n"), "VolumeTracings.csv: header"),
])
def test_layout_errors_name_the_file(synthetic_root, tmp_path, damage, message):
    root = _copy_root(synthetic_root[0], tmp_path / "root")
    damage(root)
    with pytest.raises(EchoNetLayoutError, match=message):
        read_echonet(root)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(EchoNetLayoutError, match="not a folder"):
        read_echonet(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Bad cells in the CSVs: one video is rejected with a reason naming the column, the run goes on
# ---------------------------------------------------------------------------------------------

# (what a user might feed in, the message fragment they see). tests below check each one.
BAD_INPUTS = [
    ("FileList row with a missing cell", "bad_filelist_row: Split is missing, the row has 8 of 9 cells"),
    ("FileList row with an empty value", "bad_filelist_row: EF is empty (FileList.csv line"),
    ("FileList row with an extra cell",
     "bad_filelist_row: 10 cells, the header has 9 (a comma inside a value?)"),
    ("FileList row with no FileName", "bad_filelist_row: FileName is empty (FileList.csv line"),
    ("FileList text in a number column", "bad_value: EDV 'abc' is not a number (FileList.csv line"),
    ("FileList NaN/inf in a number column", "bad_value: EF 'inf' is not finite"),
    ("FileList NumberOfFrames not a whole number", "bad_value: NumberOfFrames '7.5' is not an integer"),
    ("FileList NumberOfFrames infinite", "bad_value: NumberOfFrames 'inf' is not an integer"),
    ("FileList FPS zero or negative", "bad_value: FPS '0' is not positive"),
    ("VolumeTracings text in X1/Y1/X2/Y2", "bad_value: Y1 'abc' is not a number (VolumeTracings.csv line"),
    ("VolumeTracings NaN/inf coordinate", "non_finite: X2 'nan' is not finite (VolumeTracings.csv line"),
    ("VolumeTracings text in Frame", "bad_value: Frame 'abc' is not an integer (VolumeTracings.csv line"),
    ("VolumeTracings fractional or infinite Frame", "bad_value: Frame '3.5' is not an integer"),
    ("VolumeTracings negative Frame", "bad_value: Frame -3 is negative"),
    ("VolumeTracings row with a missing cell", "bad_tracing_row: Frame is missing, the row has 5 of 6 cells"),
    ("VolumeTracings row with no FileName", "bad_tracing_row: FileName is empty (VolumeTracings.csv line"),
    ("CSV that is not UTF-8", "FileList.csv: not UTF-8 text"),
]
MESSAGE = dict(BAD_INPUTS)

# FileList.csv columns: FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split
FILELIST_EDITS = {
    "FileList row with a missing cell": lambda r: r[:-1],
    "FileList row with an empty value": lambda r: [r[0], "", *r[2:]],
    "FileList row with an extra cell": lambda r: [*r, "extra"],
    "FileList text in a number column": lambda r: [*r[:3], "abc", *r[4:]],
    "FileList NaN/inf in a number column": lambda r: [r[0], "inf", *r[2:]],
    "FileList NumberOfFrames not a whole number": lambda r: [*r[:7], "7.5", r[8]],
    "FileList NumberOfFrames infinite": lambda r: [*r[:7], "inf", r[8]],
    "FileList FPS zero or negative": lambda r: [*r[:6], "0", *r[7:]],
}
# VolumeTracings.csv columns: FileName,X1,Y1,X2,Y2,Frame (the edit hits one row of the video)
TRACING_EDITS = {
    "VolumeTracings text in X1/Y1/X2/Y2": lambda r: [r[0], r[1], "abc", *r[3:]],
    "VolumeTracings NaN/inf coordinate": lambda r: [*r[:3], "nan", *r[4:]],
    "VolumeTracings text in Frame": lambda r: [*r[:5], "abc"],
    "VolumeTracings fractional or infinite Frame": lambda r: [*r[:5], "3.5"],
    "VolumeTracings negative Frame": lambda r: [*r[:5], "-3"],
    "VolumeTracings row with a missing cell": lambda r: r[:5],
}


def _edited_root(src: Path, dst: Path, name: str, filelist_edit=None, tracing_edit=None) -> Path:
    """A root sharing ``src``'s videos whose CSV rows for video ``name`` went through the edits."""
    dst.mkdir()
    (dst / "Videos").symlink_to(src / "Videos")
    for csv_name, edit in (("FileList.csv", filelist_edit), ("VolumeTracings.csv", tracing_edit)):
        rows = list(csv.reader((src / csv_name).open(newline="")))
        hit = next(i for i, r in enumerate(rows) if _stem(r[0]) == name)
        if edit:
            rows[hit] = edit(rows[hit])
        with (dst / csv_name).open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    return dst


def _stem(cell: str) -> str:
    return cell[:-4] if cell.endswith(".avi") else cell


def _one_more_rejection(read, root: Path, name: str) -> str:
    """Read ``root``; check that only ``name`` changed (rejected now), and return its reason."""
    _, _, samples, rejected = read
    new_samples, new_rejected = read_echonet(root)
    assert [s.file_name for s in new_samples] == [s.file_name for s in samples if s.file_name != name]
    before = {(n, rejection_code(r)) for n, r in rejected}  # reasons may hold the (other) root's path
    after = {(n, rejection_code(r)) for n, r in new_rejected}
    assert before < after and len(after) == len(before) + 1 == len(new_rejected)
    return dict(new_rejected)[name]


@pytest.mark.parametrize("what", list(FILELIST_EDITS))
def test_bad_filelist_cell_rejects_only_that_video(read, tmp_path, what):
    src, name = read[0], read[2][0].file_name
    root = _edited_root(src, tmp_path / "r", name, filelist_edit=FILELIST_EDITS[what])
    reason = _one_more_rejection(read, root, name)
    assert MESSAGE[what] in reason
    assert reason.split(":")[0] in ("bad_filelist_row", "bad_value")


@pytest.mark.parametrize("what", list(TRACING_EDITS))
def test_bad_tracing_cell_rejects_only_that_video_naming_the_column(read, tmp_path, what):
    src, name = read[0], read[2][0].file_name
    root = _edited_root(src, tmp_path / "r", name, tracing_edit=TRACING_EDITS[what])
    reason = _one_more_rejection(read, root, name)
    assert MESSAGE[what] in reason
    assert "line 2)" in reason  # the video's first tracing row is line 2 of the file


def test_tracing_text_in_y_is_not_reported_as_a_frame_error(read, tmp_path):
    src, name = read[0], read[2][0].file_name
    text_in_y1 = TRACING_EDITS["VolumeTracings text in X1/Y1/X2/Y2"]
    root = _edited_root(src, tmp_path / "r", name, tracing_edit=text_in_y1)
    reason = dict(read_echonet(root)[1])[name]
    assert "Y1" in reason and "Frame" not in reason


def test_rows_without_a_file_name_are_rejected_under_their_line(read, tmp_path):
    src, name = read[0], read[2][0].file_name
    root = _edited_root(src, tmp_path / "r", name, filelist_edit=lambda r: ["", *r[1:]],
                        tracing_edit=lambda r: ["", *r[1:]])
    samples, rejected = read_echonet(root)
    by_name = dict(rejected)
    assert MESSAGE["FileList row with no FileName"] in by_name["FileList.csv line 2"]
    assert MESSAGE["VolumeTracings row with no FileName"] in by_name["VolumeTracings.csv line 2"]
    # the video lost its FileList row, so its tracings are reported as not in FileList
    assert rejection_code(by_name[name]) == "not_in_filelist"
    assert len(samples) == len(read[2]) - 1


def test_csv_encoding_problems(read, tmp_path):
    src = read[0]
    root = _edited_root(src, tmp_path / "bom", read[2][0].file_name)
    (root / "FileList.csv").write_bytes(b"\xef\xbb\xbf" + (root / "FileList.csv").read_bytes())
    assert len(read_echonet(root)[0]) == len(read[2])  # a spreadsheet's byte-order mark is not an error
    bad = _edited_root(src, tmp_path / "latin1", read[2][0].file_name)
    latin1_row = b"caf\xe9,1,2,3,112,112,50,70,TRAIN\n"
    (bad / "FileList.csv").write_bytes((bad / "FileList.csv").read_bytes() + latin1_row)
    with pytest.raises(EchoNetLayoutError, match=MESSAGE["CSV that is not UTF-8"]):
        read_echonet(bad)


def test_every_bad_input_is_tested():
    tested = set(FILELIST_EDITS) | set(TRACING_EDITS) | {
        "FileList row with no FileName", "VolumeTracings row with no FileName", "CSV that is not UTF-8"}
    assert tested == set(MESSAGE)
