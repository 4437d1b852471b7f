"""The frozen-prefix feature cache (trainables/feature_cache.py): the same metrics with and without it,
keys that never hit another model's entries, damage, LRU eviction, concurrent fills, fixed augmented
views, and exact resume. Trials run in-process (``Trial``) on local shards with the tiny encoder."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from trainables import feature_cache as fc
from trainables.config import DataCfg, EncoderCfg, HeadCfg, LoraCfg, OptimCfg, TrialConfig
from trainables.data.shard import write_shards
from trainables.data.synthetic import write_synthetic
from trainables.loop import Trial
from trainables.models.encoders import ENCODERS, EncoderSpec, TinyVideoEncoder, build_encoder

CPU = torch.device("cpu")
METRICS = ("train_loss", "val_px_error", "val_dice_ed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("echonet-features")
    write_synthetic(root, n_videos=16, seed=3, max_frames=24)  # 12 train, 2 val, 2 test
    write_shards(root, str(root / "shards"), rows_per_file=8)
    return str(root / "shards")


def config(uri: str, cache: Path, **kw) -> TrialConfig:
    data = dict(uri=uri, cache_dir=str(cache), batch_size=4) | kw.pop("data", {})
    base = dict(encoder=EncoderCfg("tiny", n_unfrozen=2), head=HeadCfg("mlp", channels=[32, 32]),
                optim=OptimCfg(base_lr=1e-3, weight_decay=0.01), data=DataCfg(**data), epochs=2,
                tensorboard=False, seed=11)
    return TrialConfig(**(base | kw)).validate()


class Killed(Exception):
    pass


class Saver:
    """Keeps every metrics dict and checkpoint folder; with ``kill_after`` raises after that epoch."""

    def __init__(self, where: Path | None = None, kill_after: int | None = None):
        self.where, self.metrics, self.folders, self.kill_after = where, [], [], kill_after

    def __call__(self, metrics: dict, folder: Path | None) -> None:
        self.metrics.append(metrics)
        if folder is not None and self.where is not None:
            dest = self.where / f"epoch{metrics['epoch']}"
            shutil.copytree(folder, dest)
            self.folders.append(dest)
        if metrics["epoch"] == self.kill_after:
            raise Killed


def run(cfg: TrialConfig) -> list[dict]:
    saver = Saver()
    Trial(cfg, 0, 1, CPU, saver).run()
    return saver.metrics


def counts(metrics: list[dict]) -> list[tuple[int, int]]:
    return [(m["feature_cache_hits"], m["feature_cache_misses"]) for m in metrics]


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "features").glob("*/*/*.feat"))


def n_videos(cfg: TrialConfig) -> tuple[int, int]:
    trial = Trial(cfg, 0, 1, CPU, Saver())
    return len(trial.train_ds), len(trial.val_ds)


# --- exactness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 0])  # 0: the cached value is the embedding itself
def test_cached_trial_reports_the_uncached_metrics_and_a_second_trial_hits_every_entry(shards, tmp_path, k):
    enc = EncoderCfg("tiny", n_unfrozen=k)
    plain = run(config(shards, tmp_path / "cache", encoder=enc, data={"feature_cache": False}))
    assert all(m["feature_cache"] == 0 for m in plain) and counts(plain) == [(0, 0)] * 2

    cfg = config(shards, tmp_path / "cache", encoder=enc)
    n_train, n_val = n_videos(cfg)
    first = run(cfg)
    assert counts(first) == [(0, n_train + n_val), (n_train + n_val, 0)]  # filled in epoch 1, hit in 2
    assert all(m["feature_cache"] == 1 and m["feature_cache_train"] == 1 for m in first)
    for a, b in zip(plain, first):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert len(entries(tmp_path / "cache")) == n_train + n_val

    second = run(cfg)  # another trial with the same encoder, weights, k and preprocessing
    assert counts(second) == [(n_train + n_val, 0)] * 2
    assert [[m[key] for key in METRICS] for m in second] == [[m[key] for key in METRICS] for m in first]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_prefix_samples_and_prefix_batch_are_inverses_and_split_by_sample(name):
    torch.manual_seed(0)
    enc = build_encoder(name).eval()
    clip = torch.randint(0, 256, (2, 16, 112, 112), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, alone = enc.forward_prefix(clip, 0), enc.forward_prefix(clip[1:], 0)
    forms = [h]
    if name == "panecho":  # after the ConvNeXt the prefix is (time tokens (B, T, 768), B)
        forms.append((torch.randn(2, 16, 768), 2))
    for form in forms:
        samples = enc.prefix_samples(form)
        assert len(samples) == 2
        _same(enc.prefix_batch(samples), form, exact=True)
    _same(enc.prefix_samples(h)[1], enc.prefix_samples(alone)[0], exact=False)  # batch-major, per sample


def _same(a, b, exact: bool) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape
        assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-4)
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, exact)
    else:
        assert a == b


def test_a_miss_gives_the_trainer_what_a_later_hit_gives(tmp_path):
    """Stored in bf16 (as under the trainer's bf16 autocast on a GPU): the miss returns the value as
    stored, cast back to the dtype the prefix produced, so a hit and a miss train the same."""
    cache = fc.FeatureCache(tmp_path / "features", {"model": "bf16"}, dtype=torch.bfloat16)
    x, thw = torch.randn(3, 5, 7), (8, 14, 14)  # fp32 tokens, as MViT's residual stream under autocast
    keys = [_key(i) for i in range(3)]
    missed, hits, misses = cache.fetch(keys, lambda rows: [(x[r], thw) for r in rows])
    assert (hits, misses) == (0, 3)
    hit, hits, misses = cache.fetch(keys, lambda rows: pytest.fail("all cached"))
    assert (hits, misses) == (3, 0)
    for i, (a, b) in enumerate(zip(missed, hit)):
        assert a[1] == b[1] == thw and a[0].dtype == b[0].dtype == torch.float32
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], x[i].bfloat16().float())
    header = json.loads(cache.path(keys[0]).read_bytes().split(b"\n")[0])
    assert header["dtype"] == "bfloat16" and header["as"] == "float32" and header["shape"] == [5, 7]


# --- keys ------------------------------------------------------------------------------------------

class TinyCopy(TinyVideoEncoder):
    """The tiny encoder under another registry name (same architecture and initial weights)."""


def test_another_encoder_weights_file_k_or_preprocessing_never_hits(shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def epoch_one(**kw) -> tuple[int, int]:
        return counts(run(config(shards, cache, epochs=1, **kw)))[0]

    n = sum(n_videos(config(shards, cache)))
    assert epoch_one() == (0, n)
    assert epoch_one() == (n, 0)
    assert epoch_one(encoder=EncoderCfg("tiny", n_unfrozen=1)) == (0, n)  # another split
    assert epoch_one(seed=12) == (0, n)  # random init follows the seed
    # LoRA on the last 2 blocks freezes the same prefix as k = 2 (split 2): it shares the entries.
    assert epoch_one(encoder=EncoderCfg("tiny", n_unfrozen=0, lora=LoraCfg(rank=4, last=2))) == (n, 0)

    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights.append(tmp_path / f"tiny-{seed}.pt")
        torch.save(build_encoder("tiny").state_dict(), weights[-1])
    assert epoch_one(encoder=EncoderCfg("tiny", weights=str(weights[0]), n_unfrozen=2)) == (0, n)
    assert epoch_one(encoder=EncoderCfg("tiny", weights=str(weights[1]), n_unfrozen=2)) == (0, n)
    copy = tmp_path / "elsewhere" / "same-bytes.pt"
    copy.parent.mkdir()
    shutil.copy(weights[0], copy)
    assert epoch_one(encoder=EncoderCfg("tiny", weights=str(copy), n_unfrozen=2)) == (n, 0)  # the bytes count

    monkeypatch.setattr(TinyCopy, "registry_name", "tiny_copy")
    spec = EncoderSpec("tiny_copy", TinyCopy, 4, 128, "copy", TinyCopy.stages)
    monkeypatch.setitem(ENCODERS, "tiny_copy", spec)
    assert epoch_one(encoder=EncoderCfg("tiny_copy", n_unfrozen=2)) == (0, n)
    monkeypatch.setattr(TinyVideoEncoder, "preprocess_version", "tiny-112-v2")
    assert epoch_one() == (0, n)

    models = sorted((cache / "features").glob("*/model.json"))
    assert len(models) == 7  # k=2 (LoRA shares it), k=1, seed 12, two weights files, tiny_copy, preprocessing


# --- damage, eviction, concurrency ----------------------------------------------------------------

def test_a_damaged_entry_is_detected_recomputed_and_reported(shards, tmp_path):
    cfg = config(shards, tmp_path / "cache", epochs=1)
    first = run(cfg)
    files = entries(tmp_path / "cache")
    truncated, flipped = files[0], files[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-7] ^= 0x10
    flipped.write_bytes(bytes(data))
    with pytest.warns(fc.FeatureCacheWarning) as seen:
        again = run(cfg)
    problems = sorted(str(w.message) for w in seen if issubclass(w.category, fc.FeatureCacheWarning))
    assert len(problems) == 2
    assert any("truncated" in p for p in problems) and any("sha256" in p for p in problems)
    n = sum(n_videos(cfg))
    assert counts(again) == [(n - 2, 2)]
    assert [again[0][k] for k in METRICS] == [first[0][k] for k in METRICS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fc.FeatureCacheWarning)
        assert counts(run(cfg)) == [(n, 0)]  # rewritten whole


def _key(i: int) -> list:
    return ["shard", f"video{i:03d}", list(range(16)), None]


def test_least_recently_used_entries_are_evicted_under_the_cap(tmp_path):
    root = tmp_path / "features"
    probe = fc.FeatureCache(root, {"model": "probe"}, cap=1 << 30)
    probe.fetch([_key(999)], lambda rows: [torch.zeros(1000)])
    size = probe.path(_key(999)).stat().st_size
    shutil.rmtree(root)

    cache = fc.FeatureCache(root, {"model": "m"}, cap=10 * size)
    start = time.time() - 1000
    for i in range(10):
        cache.fetch([_key(i)], lambda rows, i=i: [torch.full((1000,), float(i))])
        fc.os.utime(cache.path(_key(i)), (start + i, start + i))
    values, hits, misses = cache.fetch([_key(0)], lambda rows: pytest.fail("key 0 is cached"))
    assert (hits, misses) == (1, 0) and torch.equal(values[0], torch.zeros(1000))  # a use: now the newest
    for i in range(10, 13):
        cache.fetch([_key(i)], lambda rows, i=i: [torch.full((1000,), float(i))])
    kept = {i for i in range(13) if cache.path(_key(i)).exists()}
    assert fc.cache_size(root) <= 10 * size
    assert 0 in kept and {1, 2, 3, 4}.isdisjoint(kept) and {10, 11, 12} <= kept


def _fill(root: str, keys: list, barrier, results) -> None:
    cache = fc.FeatureCache(root, {"model": "shared"}, cap=1 << 30)
    barrier.wait()
    hits = misses = 0
    for start in range(0, len(keys), 4):
        batch = keys[start:start + 4]

        def compute(rows, batch=batch):
            time.sleep(0.2)  # a slow prefix: the other process asks for the same entries meanwhile
            return [torch.full((64,), float(batch[r][1][-3:])) for r in rows]

        values, h, m = cache.fetch(batch, compute)
        assert all(float(v[0]) == float(k[1][-3:]) for v, k in zip(values, batch))
        hits, misses = hits + h, misses + m
    results.put((hits, misses))


def test_concurrent_processes_compute_each_entry_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    keys = [_key(i) for i in range(12)]
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path / "features"), order, barrier, results))
             for order in (keys, keys[::-1])]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(m for _, m in got) == len(keys)  # every entry computed once, by one of the two
    assert sum(h + m for h, m in got) == 2 * len(keys)
    assert len(list((tmp_path / "features").glob("*/*/*.feat"))) == len(keys)


def _ddp_rank(rank: int, world: int, port: int, cfg_json: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        saver = Saver()
        trial = Trial(TrialConfig.from_json(cfg_json), rank, world, CPU, saver)
        trial.wrap(torch.nn.parallel.DistributedDataParallel)  # the suffix gets prefix= through DDP's forward
        trial.run()
        results.put((rank, saver.metrics))
    finally:
        dist.destroy_process_group()


def test_under_ddp_ranks_share_the_cache_and_the_counters_are_summed(shards, tmp_path):
    import socket

    cfg = config(shards, tmp_path / "cache")
    n_train, n_val = n_videos(cfg)
    assert n_train % 2 == 0  # so the two ranks see every training video in every epoch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, cfg.to_json(), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    same = METRICS + ("feature_cache_hits", "feature_cache_misses")
    assert [[m[k] for k in same] for m in got[0]] == [[m[k] for k in same] for m in got[1]]  # all-reduced
    n = n_train + n_val
    assert counts(got[0]) == [(0, n), (n, 0)]
    assert len(entries(tmp_path / "cache")) == n


# --- fixed augmented views -------------------------------------------------------------------------

def test_views_are_fixed_per_video_and_drawn_per_epoch_from_seed_epoch_and_video(shards, tmp_path):
    cfg = config(shards, tmp_path / "cache", aug_strength=0.5, cache_views=3)
    trial = Trial(cfg, 0, 1, CPU, Saver())
    ds = trial.train_ds
    assert isinstance(ds, fc.ViewDataset) and ds.n_views == 3 and ds.seed == cfg.seed
    name = str(ds.base.file_names[0])
    drawn = [fc.choose_view(cfg.seed, e, name, 3) for e in range(30)]
    assert set(drawn) == {0, 1, 2}
    assert drawn != [fc.choose_view(cfg.seed + 1, e, name, 3) for e in range(30)]
    views = {}
    for epoch in range(30):
        item = ds[(epoch, 0)]
        assert item["view"] == drawn[epoch]
        if item["view"] in views:  # the same view of a video is the same clip whatever the epoch
            same = views[item["view"]]
            assert all((item[k] == same[k]).all() for k in ("clip", "landmarks", "clip_indices"))
        views[item["view"]] = item
    assert not (views[0]["clip"] == views[1]["clip"]).all()  # views differ from each other
    other_trial = fc.ViewDataset(ds.base, 3, seed=99)
    v = fc.choose_view(99, 0, name, 3)
    assert (other_trial[(0, 0)]["clip"] == views[v]["clip"]).all()  # views are shared by trials


def test_cache_views_train_from_the_cache_and_match_the_uncached_run(shards, tmp_path):
    kw = dict(aug_strength=0.5, cache_views=2, epochs=3)
    plain = run(config(shards, tmp_path / "cache", data={"feature_cache": False}, **kw))
    cfg = config(shards, tmp_path / "cache", **kw)
    n_train, n_val = n_videos(cfg)
    first = run(cfg)
    assert all(m["feature_cache_train"] == 1 for m in first)
    assert first[0]["feature_cache_misses"] == n_train + n_val
    assert sum(m["feature_cache_misses"] for m in first) <= 2 * n_train + n_val  # at most N views per video
    for a, b in zip(plain, first):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert counts(run(cfg)) == [(n_train + n_val, 0)] * 3


def test_augmented_datasets_pickle_for_spawned_loader_workers(shards, tmp_path):
    import pickle

    for views in (2, 0):  # spawned DataLoader workers (data.num_workers > 0) get the dataset pickled
        ds = Trial(config(shards, tmp_path / "cache", aug_strength=0.5, cache_views=views), 0, 1, CPU,
                   Saver()).train_ds
        a, b = ds[(3, 1)], pickle.loads(pickle.dumps(ds))[(3, 1)]
        assert all((a[k] == b[k]).all() for k in ("clip", "landmarks", "clip_indices"))


def test_with_augmentation_and_no_views_training_takes_the_normal_path(shards, tmp_path):
    plain = run(config(shards, tmp_path / "cache", aug_strength=0.5, data={"feature_cache": False}))
    cfg = config(shards, tmp_path / "cache", aug_strength=0.5)
    _, n_val = n_videos(cfg)
    cached = run(cfg)
    assert [(m["feature_cache"], m["feature_cache_train"]) for m in cached] == [(1, 0)] * 2
    assert counts(cached) == [(0, n_val), (n_val, 0)]  # validation only
    assert [[m[k] for k in METRICS] for m in cached] == [[m[k] for k in METRICS] for m in plain]


# --- exact resume ----------------------------------------------------------------------------------

def test_a_resumed_run_with_the_cache_equals_an_uninterrupted_one(shards, tmp_path):
    kw = dict(aug_strength=0.5, cache_views=2, epochs=3)
    whole = Saver(tmp_path / "whole")
    Trial(config(shards, tmp_path / "cache-a", **kw), 0, 1, CPU, whole).run()

    cfg = config(shards, tmp_path / "cache-b", **kw)  # its own cache, filled by the killed run
    first = Saver(tmp_path / "first", kill_after=1)
    with pytest.raises(Killed):
        Trial(cfg, 0, 1, CPU, first).run()
    torch.manual_seed(1234)
    resumed = Trial(cfg, 0, 1, CPU, Saver(tmp_path / "resumed"))
    resumed.restore(first.folders[-1])
    resumed.run()

    a = torch.load(whole.folders[-1] / "state.pt", weights_only=True)["model"]
    b = resumed.core.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in METRICS:
        assert whole.metrics[-1][k] == resumed.report.metrics[-1][k], k
    assert resumed.report.metrics[0]["feature_cache_hits"] > 0


# --- configuration ---------------------------------------------------------------------------------

def test_config_keys_validate_and_round_trip(shards, tmp_path, monkeypatch):
    cfg = config(shards, tmp_path, aug_strength=0.3, cache_views=4,
                 data={"feature_cache": False, "feature_cache_gb": 2.5})
    assert TrialConfig.from_json(cfg.to_json()) == cfg
    assert (TrialConfig().cache_views, DataCfg().feature_cache, DataCfg().feature_cache_gb) == (0, True, None)
    for bad, field in ((dict(cache_views=-1), "cache_views"), (dict(cache_views="2"), "cache_views"),
                       (dict(data={"feature_cache_gb": 0.0}), "feature_cache_gb"),
                       (dict(data={"feature_cache": "yes"}), "feature_cache")):
        with pytest.raises(ValueError, match=field):
            config(shards, tmp_path, **bad)
    monkeypatch.setenv(fc.ENV_GB, "0.5")
    assert fc.cap_bytes() == 2**29 and fc.cap_bytes(2.0) == 2**31
    monkeypatch.setenv(fc.ENV_GB, "lots")
    with pytest.raises(ValueError, match=fc.ENV_GB):
        fc.cap_bytes()


# --- on a GPU (bench/gpu.sh runs these) --------------------------------------------------------

@pytest.mark.gpu
def test_on_a_gpu_entries_are_bf16_and_a_cached_trial_matches_the_uncached_one(shards, tmp_path):
    cuda = torch.device("cuda")

    def run_gpu(cfg: TrialConfig) -> list[dict]:
        saver = Saver()
        trial = Trial(cfg, 0, 1, cuda, saver)
        trial.model.to(cuda)
        trial.run()
        return saver.metrics

    plain = run_gpu(config(shards, tmp_path / "cache", data={"feature_cache": False}))
    cfg = config(shards, tmp_path / "cache")
    first, second = run_gpu(cfg), run_gpu(cfg)
    n = sum(n_videos(cfg))
    assert counts(first) == [(0, n), (n, 0)] and counts(second) == [(n, 0)] * 2
    header = json.loads(entries(tmp_path / "cache")[0].read_bytes().split(b"\n")[0])
    assert header["dtype"] == "bfloat16"
    for a, b, c in zip(plain, first, second):
        for key in METRICS:  # the residual stream rounded to bf16 between prefix and suffix
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-3), key
            assert c[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
