"""MJPEG packets: standard Huffman tables for packets that omit them, grey decode, demux."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trainables.data.mjpeg import DHT, STANDARD_DHT, decode_gray, ensure_huffman, header_markers, read_packets


def _segments(jpeg: bytes, marker: int) -> list[bytes]:
    pos, out = 2, []
    while jpeg[pos + 1] != 0xDA:
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if jpeg[pos + 1] == marker:
            out.append(jpeg[pos + 4:pos + 2 + length])
        pos += 2 + length
    return out


def _strip_dht(jpeg: bytes) -> bytes:
    pos, out = 2, bytearray(jpeg[:2])
    while jpeg[pos + 1] != 0xDA:
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if jpeg[pos + 1] != DHT:
            out += jpeg[pos:pos + 2 + length]
        pos += 2 + length
    return bytes(out + jpeg[pos:])


@pytest.fixture(scope="module")
def packets(synthetic_root):
    root, defects = synthetic_root
    avi = next(p for p in sorted((root / "Videos").glob("*.avi")) if p.stem not in defects)
    return read_packets(avi)[0]


def test_standard_tables_equal_libjpegs():
    """libjpeg writes the Annex K tables when not optimising: ours must be byte-identical."""
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    assert b"".join(_segments(jpeg, DHT)) == STANDARD_DHT[4:]


def test_packet_without_huffman_tables_decodes_identically(packets):
    # Encoders that omit the tables (e.g. AVI1 capture MJPEG) use the Annex K ones, as libjpeg does
    # by default. (FFmpeg, behind OpenCV's writer, stores optimised tables, so strip a libjpeg frame.)
    original = cv2.imencode(".jpg", decode_gray(packets[3]))[1].tobytes()
    stripped = _strip_dht(original)
    assert DHT in header_markers(original)[0] and DHT not in header_markers(stripped)[0]
    fixed = ensure_huffman(stripped)
    assert DHT in header_markers(fixed)[0]
    assert np.array_equal(decode_gray(stripped), decode_gray(original))
    assert ensure_huffman(original) is original  # complete packets pass through untouched


def test_decode_gray_is_libjpeg_luma(packets):
    img = decode_gray(packets[0])
    ref = cv2.imdecode(np.frombuffer(packets[0], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img.dtype == np.uint8 and img.shape == (112, 112) and np.array_equal(img, ref)


@pytest.mark.parametrize("bad, message", [
    (b"not a jpeg", "no SOI"),
    (b"\xff\xd8\xff\xdb\x00\x43" + bytes(10), "no SOS"),
])
def test_bad_packets_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        decode_gray(bad)


def test_read_packets_rejects_non_mjpeg(tmp_path):
    path = tmp_path / "x.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 25, (16, 16))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write FFV1")
    for _ in range(3):
        writer.write(np.zeros((16, 16, 3), np.uint8))
    writer.release()
    with pytest.raises(ValueError, match="expected mjpeg"):
        read_packets(path)
