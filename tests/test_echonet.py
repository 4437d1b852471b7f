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
