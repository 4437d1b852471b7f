"""Augmentation keeps frames and landmarks in step; metrics against hand-computed cases; DDP all-reduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.augment import Augment, augment, jittered_clip_indices
from trainables.metrics import LandmarkMetrics, dice, ef_from_landmarks, point_error_px, volume_from_points


def dotted_item(rng, frame, point):
    lm = rng.uniform(0.3, 0.7, (2, 40, 2)).astype(np.float32)
    x, y = np.round(lm[frame, point] * 112).astype(int)
    lm[frame, point] = [x / 112, y / 112]
    clip = np.zeros((16, 112, 112), np.uint8)
    clip[:, y - 1:y + 2, x - 1:x + 2] = 255
    return {"clip": clip, "landmarks": lm}


@pytest.mark.parametrize("seed", range(20))
def test_painted_dot_stays_under_its_transformed_landmark(seed):
    rng = np.random.default_rng(seed)
    frame, point = int(rng.integers(2)), int(rng.integers(40))
    item = dotted_item(rng, frame, point)
    out = augment(item, np.random.default_rng(100 + seed), 1.0)
    flipped = np.allclose(out["landmarks"][1 - frame, 0] * 112, _apply(item, seed, 1 - frame, 39))
    k = 39 - point if flipped else point  # a flip reverses the list so index 0 keeps its meaning
    for f in (0, 7, 15):  # the same transform on every frame
        ys, xs = np.nonzero(out["clip"][f] > 100)
        assert np.hypot(xs.mean() - out["landmarks"][frame, k, 0] * 112,
                        ys.mean() - out["landmarks"][frame, k, 1] * 112) < 1.0


def _apply(item, seed, frame, point):
    from trainables.augment import affine

    matrix, _ = affine(np.random.default_rng(100 + seed), 1.0)
    p = item["landmarks"][frame, point] * 112
    return matrix[:, :2] @ p + matrix[:, 2]


def test_flip_keeps_point_semantics():
    from trainables.augment import transform_landmarks

    lm = np.zeros((2, 40, 2), np.float32)
    lm[:, :20, 0], lm[:, 20:, 0] = 0.3, 0.7  # points 0-19 on the left wall, 20-39 on the right
    flip = np.array([[-1.0, 0, 111], [0, 1, 0]])
    out = transform_landmarks(lm, flip, flip=True)
    assert np.allclose(out[:, :20, 0], (111 - 0.7 * 112) / 112) and np.allclose(out[:, 20:, 0], (111 - 0.3 * 112) / 112)


def test_strength_zero_is_identity_and_randomness_is_reproducible():
    rng = np.random.default_rng(0)
    item = {"clip": rng.integers(0, 255, (16, 112, 112), dtype=np.uint8),
            "landmarks": rng.uniform(0, 1, (2, 40, 2)).astype(np.float32)}
    assert augment(item, np.random.default_rng(1), 0.0) is item
    a = Augment(0.7)(item, np.random.default_rng(5))
    b = Augment(0.7)(item, np.random.default_rng(5))
    assert np.array_equal(a["clip"], b["clip"]) and np.array_equal(a["landmarks"], b["landmarks"])
    assert not np.array_equal(a["clip"], item["clip"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment(item, rng, 1.5)


@pytest.mark.parametrize("ed, es", [(10, 40), (50, 20), (30, 36)])
def test_temporal_jitter_moves_only_interior_frames(ed, es):
    fn = jittered_clip_indices(1.0)
    assert jittered_clip_indices(0.0)(ed, es, np.random.default_rng(0)).tolist() == \
        np.round(np.linspace(ed, es, 16)).astype(int).tolist()
    moved = False
    for seed in range(10):
        idx = fn(ed, es, np.random.default_rng(seed))
        assert idx[0] == ed and idx[-1] == es and len(idx) == 16
        assert min(ed, es) <= idx.min() and idx.max() <= max(ed, es)
        step = np.diff(idx)
        assert (step >= 0).all() if es > ed else (step <= 0).all()
        moved |= idx.tolist() != np.round(np.linspace(ed, es, 16)).astype(int).tolist()
    assert moved


# --- metrics ----------------------------------------------------------------------------------

def square(x0, y0, side):
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


def test_dice_of_known_polygons_is_exact():
    assert dice(square(10, 10, 20), square(10, 10, 20)) == 1.0
    assert dice(square(10, 10, 20), square(20, 10, 20)) == pytest.approx(0.5)  # 2 * 200 / 800, exactly
    assert dice(square(10, 10, 20), square(10.5, 10, 20)) == pytest.approx(2 * 19.5 * 20 / 800)  # sub-pixel
    assert dice(square(10, 10, 10), square(50, 50, 10)) == 0.0
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float)  # a self-crossing prediction: two lobes
    assert dice(bowtie, square(0, 0, 10)) == pytest.approx(2 * 50 / (50 + 100))
    assert dice(np.full((4, 2), np.nan), square(0, 0, 10)) == 0.0


def test_dice_mean_per_video_and_pooled_over_the_split():
    """Pooled (EchoNet-Dynamic's 2·ΣI / Σ(|A|+|B|)) weights large ventricles more than the per-video mean."""
    big, small = cylinder(40, 80) / 112, cylinder(10, 20) / 112
    target = np.stack([np.stack([big, big]), np.stack([small, small])])  # 2 videos, ED = ES
    pred = target.copy()
    pred[1, :, :, 0] += 5 / 112  # the small one shifted half its width: Dice 0.5
    m = LandmarkMetrics()
    m.update(pred, target, np.array([0.0, 0.0]))
    r = m.compute()
    assert r["val_dice_ed"] == pytest.approx((1.0 + 0.5) / 2)
    h = 19 / 20  # the outer chords sit at disc centres: the polygon is 19/20 of the tube's length
    inter, areas = 40 * 80 * h + 5 * 20 * h, (2 * 40 * 80 + 2 * 10 * 20) * h
    assert r["val_dice_ed_pooled"] == pytest.approx(2 * inter / areas) and r["val_dice_es_pooled"] > 0.95


def cylinder(diameter, length, x=56.0, top=20.0):
    """40 points of a tube: chord i at the centre of disc i, from the base (i=0) to the apex."""
    ys = top + length - (np.arange(20) + 0.5) * length / 20
    left = np.stack([np.full(20, x - diameter / 2), ys], 1)
    right = np.stack([np.full(20, x + diameter / 2), ys], 1)
    return np.concatenate([left, right[::-1]])


def test_ef_by_discs_on_a_known_shape():
    assert volume_from_points(cylinder(20, 60)) == pytest.approx(np.pi * 10 ** 2 * 60)
    lm = np.stack([cylinder(20, 60), cylinder(10, 60)])  # ES volume a quarter of ED
    assert ef_from_landmarks(lm) == pytest.approx(75.0)


def test_point_error_in_px_and_percent():
    target = np.stack([cylinder(20, 60), cylinder(10, 60)])[None] / 112
    pred = target.copy()
    pred[0, 0, :, 0] += 3 / 112  # ED shifted 3 px right, ES exact
    assert point_error_px(pred, target)[0].tolist() == pytest.approx([3.0, 0.0])
    m = LandmarkMetrics()
    m.update(torch.tensor(pred), torch.tensor(target), torch.tensor([75.0]))
    r = m.compute()
    approx = lambda v: pytest.approx(v, rel=1e-5, abs=1e-4)  # noqa: E731 (float32 on the way)
    assert r["val_px_error_ed"] == approx(3) and r["val_px_error_es"] == approx(0)
    assert r["val_px_error"] == approx(1.5) and r["val_pct_error"] == approx(100 * 1.5 / 112)
    assert r["val_dice_es"] == approx(1.0) and r["val_dice_ed"] < 1
    assert r["val_ef_mae_label"] == approx(0.0) and r["val_ef_mae_contour"] == approx(0.0)


def test_ef_error_against_the_label_and_against_the_contours():
    """A perfect landmark prediction has zero contour-EF error, whatever the FileList EF says."""
    target = np.stack([cylinder(20, 60), cylinder(10, 60)])[None] / 112  # contour EF 75 %
    m = LandmarkMetrics()
    m.update(target.copy(), target, np.array([60.0]))  # the label disagrees with the tracing by 15 points
    r = m.compute()
    assert r["val_ef_mae_contour"] == pytest.approx(0.0, abs=1e-6)
    assert r["val_ef_mae_label"] == pytest.approx(15.0, abs=1e-4)
    shrunk = target.copy()
    shrunk[0, 1] = (cylinder(20 * 0.5 ** 0.5, 60) / 112)  # predicted ES volume half of ED: EF 50 %
    m = LandmarkMetrics()
    m.update(shrunk, target, np.array([60.0]))
    r = m.compute()
    assert r["val_ef_mae_contour"] == pytest.approx(25.0, abs=1e-3)
    assert r["val_ef_mae_label"] == pytest.approx(10.0, abs=1e-3)


def _rank(rank, world, port, pred, target, ef, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = LandmarkMetrics()
    m.update(pred[rank::world], target[rank::world], ef[rank::world])
    out[rank] = m.compute()
    torch.distributed.destroy_process_group()


def test_metrics_all_reduce_across_ranks():
    """Two gloo ranks, each with part of the split, report the metrics of the whole split."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    g = torch.Generator().manual_seed(0)
    target = torch.rand(7, 2, 40, 2, generator=g) * 0.4 + 0.3
    pred = target + torch.randn(7, 2, 40, 2, generator=g) * 0.02
    ef = torch.rand(7, generator=g) * 60 + 20
    whole = LandmarkMetrics()
    whole.update(pred, target, ef)
    expected = whole.compute()
    ctx = mp.get_context("spawn")
    out = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, pred, target, ef, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    for r in range(2):
        assert out[r]["val_n"] == 7
        for k, v in expected.items():
            assert out[r][k] == pytest.approx(v), k
