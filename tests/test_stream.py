"""Order, rank sharding, per-sample randomness and exact resume of the clip stream; the inspect CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from trainables.data.stream import EchoClipDataset, EpochSampler, ed_es_clip_indices, make_loader, rank_order


@pytest.fixture(scope="module")
def train(s3_shards, s3_endpoint, tmp_path_factory):
    return EchoClipDataset(s3_shards[0], "train", seed=11, s3_endpoint=s3_endpoint,
                           cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (11, 2), (11, 3), (7, 4)])
def test_ranks_are_disjoint_and_cover_the_split(n, world):
    evals = [rank_order(n, seed=1, epoch=2, rank=r, world_size=world, equal=False) for r in range(world)]
    flat = np.concatenate(evals)
    assert sorted(flat.tolist()) == list(range(n))  # disjoint and covering
    trains = [rank_order(n, seed=1, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert {len(t) for t in trains} == {n // world}  # equal lengths: DDP ranks step together
    assert len(set(np.concatenate(trains).tolist())) == world * (n // world)
    for t, e in zip(trains, evals):
        assert t.tolist() == e[: n // world].tolist()


def test_order_is_a_function_of_seed_and_epoch():
    a = rank_order(50, seed=3, epoch=1)
    assert a.tolist() == rank_order(50, seed=3, epoch=1).tolist()
    assert a.tolist() != rank_order(50, seed=3, epoch=2).tolist()
    assert a.tolist() != rank_order(50, seed=4, epoch=1).tolist()
    assert rank_order(5, seed=3, epoch=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        rank_order(5, seed=0, epoch=0, rank=2, world_size=2)


def test_clip_indices_run_from_ed_to_es():
    assert ed_es_clip_indices(10, 25).tolist() == list(range(10, 26))
    assert ed_es_clip_indices(30, 15).tolist() == list(range(30, 14, -1))
    short = ed_es_clip_indices(40, 46)  # gap < 15: frames repeat
    assert short[0] == 40 and short[-1] == 46 and len(short) == 16 and (np.diff(short) >= 0).all()
    assert short.tolist() == np.round(np.linspace(40, 46, 16)).astype(int).tolist()


def _names(loader) -> list[str]:
    return [n for batch in loader for n in batch["file_name"]]


def test_resume_at_epoch_and_step_yields_exactly_the_rest(train):
    full = make_loader(train, batch_size=2, epoch=3)
    batches = list(full)
    resumed = list(make_loader(train, batch_size=2, epoch=3, start_step=2))
    assert len(resumed) == len(batches) - 2
    for a, b in zip(batches[2:], resumed):
        assert a["file_name"] == b["file_name"]
        assert np.array_equal(a["clip"].numpy(), b["clip"].numpy())
        assert np.array_equal(a["landmarks"].numpy(), b["landmarks"].numpy())


def test_same_seed_and_epoch_same_stream_across_worker_counts(train):
    in_process = list(make_loader(train, batch_size=3, epoch=1))
    spawned = list(make_loader(train, batch_size=3, epoch=1, num_workers=2))
    assert [b["file_name"] for b in in_process] == [b["file_name"] for b in spawned]
    for a, b in zip(in_process, spawned):
        assert np.array_equal(a["clip"].numpy(), b["clip"].numpy())
    assert _names(make_loader(train, batch_size=3, epoch=2)) != _names(make_loader(train, batch_size=3, epoch=1))


def test_sample_randomness_ignores_rank_and_world_size(train):
    """A jittered clip depends on (seed, epoch, video) only, not on who loads it."""
    def jitter(ed, es, rng):
        idx = ed_es_clip_indices(ed, es)
        idx[1:-1] += rng.integers(-1, 2, 14)
        return idx

    train.clip_fn = jitter
    try:
        by_name = {}
        for world in (1, 2, 3):
            for rank in range(world):
                sampler = EpochSampler(len(train), seed=train.seed, epoch=5, rank=rank, world_size=world, equal=False)
                for key in sampler:
                    item = train[key]
                    prev = by_name.setdefault(item["file_name"], item["clip_indices"].tolist())
                    assert prev == item["clip_indices"].tolist()
        assert len(by_name) == len(train)
        other_epoch = [train[(6, i)]["clip_indices"].tolist() for i in range(len(train))]
        assert other_epoch != [by_name[train.file_names[i]] for i in range(len(train))]
    finally:
        train.clip_fn = None


def test_transform_gets_the_item_and_the_sample_rng(train):
    seen = []
    train.transform = lambda item, rng: seen.append(rng.integers(1 << 30)) or item | {"tag": 1}
    try:
        assert train[(0, 0)]["tag"] == 1 and train[(0, 0)]["tag"] == 1
        assert seen[0] == seen[1]
    finally:
        train.transform = None


def test_inspect_cli(s3_shards, s3_endpoint, tmp_path):
    uri, manifest = s3_shards
    npz, png = tmp_path / "val.npz", tmp_path / "png"
    cmd = [sys.executable, "-m", "trainables.data.inspect", uri, "--split", "train", "--s3-endpoint", s3_endpoint,
           "--cache-dir", str(tmp_path / "cache"), "--export-npz", str(npz), "--png", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SYNTHETIC" in out and f"train {manifest['splits']['train']:6d} videos" in out
    for code in ("rows_per_frame", "untraced", "frame_size", "duplicate_rows", "traced_frames"):
        assert code in out
    data = np.load(npz)
    n = manifest["splits"]["train"]
    assert data["clip"].shape == (n, 16, 112, 112) and data["landmarks"].shape == (n, 2, 40, 2)
    assert data["clip_indices"].shape == (n, 16) and data["file_name"].shape == (n,)
    ds = EchoClipDataset(uri, "train", s3_endpoint=s3_endpoint, cache_dir=tmp_path / "cache")
    order = rank_order(n, seed=0, epoch=0)
    assert data["file_name"].tolist() == [ds.file_names[i] for i in order]
    assert np.array_equal(data["clip"][0], ds[(0, int(order[0]))]["clip"])
    pngs = sorted(png.glob("*.png"))
    assert len(pngs) == min(4, n) and all(p.stat().st_size > 1000 for p in pngs)


def test_inspect_cli_bad_uri(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainables.data.inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
