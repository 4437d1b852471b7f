"""What a regime changes and what it must not: per-rank random streams, exact resume on any device,
gradient accumulation, weight decay (timm's convention), and no regime-dependent dropout on the
embedding. The trainer is run in-process (``Trial``) on local shards: no Ray needed here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainables.config import DataCfg, EncoderCfg, HeadCfg, OptimCfg, TrialConfig
from trainables.data.shard import write_shards
from trainables.data.synthetic import write_synthetic
from trainables.loop import Trial, accum_group_size
from trainables.models.encoders import ENCODERS, build_encoder
from trainables.models.freezing import decays, freeze, group_parameters, lr_group_names, param_groups
from trainables.models.heads import build_head

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("echonet-regimes")
    write_synthetic(root, n_videos=30, seed=5, max_frames=24)
    out = root / "shards"
    write_shards(root, str(out), rows_per_file=16)
    return str(out)


def config(uri: str, cache: Path, **kw) -> TrialConfig:
    base = dict(encoder=EncoderCfg("tiny", n_unfrozen=2), head=HeadCfg("mlp", channels=[32, 32]),
                optim=OptimCfg(base_lr=1e-3, weight_decay=0.01),
                data=DataCfg(uri=uri, cache_dir=str(cache), batch_size=4), aug_strength=0.5, epochs=3,
                tensorboard=False, seed=11)
    return TrialConfig(**(base | kw)).validate()


class Killed(Exception):
    pass


class Saver:
    """A ``report`` callback that keeps every checkpoint folder and metrics dict; with ``kill_after``
    it raises once that epoch's checkpoint is kept, as a worker killed right after a report."""

    def __init__(self, where: Path, kill_after: int | None = None):
        self.where, self.metrics, self.folders, self.kill_after = where, [], [], kill_after

    def __call__(self, metrics: dict, folder: Path | None) -> None:
        self.metrics.append(metrics)
        if folder is not None:
            dest = self.where / f"epoch{metrics['epoch']}"
            shutil.copytree(folder, dest)
            self.folders.append(dest)
        if metrics["epoch"] == self.kill_after:
            raise Killed


def state(trial: Trial) -> dict:
    return {k: v.clone() for k, v in trial.core.state_dict().items()}


# --- exact resume ----------------------------------------------------------------------------

def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(local_shards, tmp_path):
    cfg = config(local_shards, tmp_path / "cache")
    whole = Trial(cfg, 0, 1, CPU, Saver(tmp_path / "whole"))
    whole.run()

    first = Saver(tmp_path / "first", kill_after=1)
    part = Trial(cfg, 0, 1, CPU, first)
    with pytest.raises(Killed):
        part.run()
    torch.manual_seed(1234)  # a fresh process would not share the interrupted run's RNG position
    resumed = Trial(cfg, 0, 1, CPU, Saver(tmp_path / "resumed"))
    resumed.restore(first.folders[-1])
    assert resumed.epoch == 1 and resumed.step == part.step
    resumed.run()

    a, b = state(whole), state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("train_loss", "val_px_error", "val_dice_ed"):
        assert whole.report.metrics[-1][k] == resumed.report.metrics[-1][k], k


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_restore_works_whatever_the_device(local_shards, tmp_path):
    """The old restore moved the RNG state with map_location=device and set_rng_state raised."""
    cfg = config(local_shards, tmp_path / "cache", epochs=1)
    saver = Saver(tmp_path / "ck")
    Trial(cfg, 0, 1, CPU, saver).run()
    expected = torch.load(saver.folders[-1] / "state.pt", weights_only=True)["rng"]["torch"]

    trial = Trial(cfg, 0, 1, torch.device("meta"), Saver(tmp_path / "other"))
    trial.model.to("meta")  # parameters on a non-CPU device, as on a GPU worker
    trial.restore(saver.folders[-1])
    assert trial.epoch == 1 and torch.equal(torch.get_rng_state(), expected)


def test_ranks_share_initial_weights_but_not_random_streams(local_shards, tmp_path):
    cfg = config(local_shards, tmp_path / "cache", head=HeadCfg("mlp", channels=[32, 32], dropout=0.5))
    draws, weights = [], []
    for rank in (0, 1):
        trial = Trial(cfg, rank, 2, CPU, Saver(tmp_path / f"r{rank}"))
        weights.append(state(trial))
        trial.core.train()
        emb = torch.ones(4, trial.core.encoder.embed_dim)
        draws.append(trial.core.head(emb))  # the head's dropout mask comes from this rank's stream
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(draws[0], draws[1])


# --- gradient accumulation ---------------------------------------------------------------------

def test_accumulation_group_sizes():
    assert [accum_group_size(i, 6, 4) for i in range(6)] == [4, 4, 4, 4, 2, 2]
    assert [accum_group_size(i, 8, 4) for i in range(8)] == [4] * 8
    assert [accum_group_size(i, 3, 1) for i in range(3)] == [1, 1, 1]


def test_short_last_accumulation_group_steps_on_its_mean_gradient(local_shards, tmp_path):
    """grad_accum 4 over a number of batches that is not a multiple of 4: the last optimiser step uses
    the mean gradient of the last, shorter group (before, it was divided by 4 as a full group)."""
    cfg = config(local_shards, tmp_path / "cache", aug_strength=0.0, epochs=1,
                 optim=OptimCfg(name="sgd", base_lr=1e-3, schedule="constant", grad_accum=4),
                 data=DataCfg(uri=local_shards, cache_dir=str(tmp_path / "cache"), batch_size=2))
    trial = Trial(cfg, 0, 1, CPU, Saver(tmp_path / "s"))
    seen = []
    real_step = trial.optimizer.step

    def step(*a, **kw):
        params = [p for g in trial.optimizer.param_groups for p in g["params"]]
        seen.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return real_step(*a, **kw)

    trial.optimizer.step = step
    from trainables.data.stream import make_loader

    batches = list(make_loader(trial.train_ds, batch_size=2, epoch=0))
    short = len(batches) % 4
    assert short > 1, f"the fixture should give a short last group of at least 2 batches, not {len(batches)}"
    trial.train_epoch()
    assert len(seen) == len(batches) // 4 + 1
    params_at_last, grads = seen[-1]
    params = [p for g in trial.optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, value in zip(params, params_at_last):
            p.copy_(value)
    trial.optimizer.zero_grad(set_to_none=True)
    for batch in batches[-short:]:
        loss = torch.nn.functional.mse_loss(trial.model(batch["clip"]).float(), batch["landmarks"]) / short
        loss.backward()
    for p, g in zip(params, grads):
        if p.grad is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


# --- weight decay (timm's convention) ------------------------------------------------------------

NORMS = (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.GroupNorm)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_no_weight_decay_on_norms_biases_positions_and_tokens(name):
    torch.manual_seed(0)
    enc = build_encoder(name)
    head = build_head("mlp", enc.embed_dim)
    groups = param_groups(enc, head, freeze(enc, "all"), {}, 1e-4, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in enc.parameters()) + sum(1 for _ in head.parameters())
    named = dict(enc.named_parameters())
    for mod_name, module in enc.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if isinstance(module, NORMS) or pname == "bias":
                assert decay_of[id(p)] == 0.0, full
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)) and pname == "weight":
                assert decay_of[id(p)] == 0.05, full
    for full, p in named.items():
        if any(k in full for k in ("pos_embed", "pos_encoding", "class_token", "rel_pos")):
            assert decay_of[id(p)] == 0.0 and not decays(full, p), full


def test_optimiser_has_one_lr_per_unfrozen_stage_and_the_head():
    enc = build_encoder("echoprime")
    head = build_head("mlp", enc.embed_dim)
    names = freeze(enc, 4)  # blocks 12-15: stage3 (12, 13) and stage4 (14, 15) + final
    assert lr_group_names(enc, names) == ["stage3", "stage4", "head"]
    lrs = {"stage3": 1e-5, "stage4": 3e-5, "head": 1e-3}
    groups = param_groups(enc, head, names, lrs, base_lr=7e-4, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["no_decay"]) for g in groups] == [
        ("stage3", 1e-5, False), ("stage3", 1e-5, True), ("stage4", 3e-5, False), ("stage4", 3e-5, True),
        ("head", 1e-3, False), ("head", 1e-3, True)]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in enc.parameters() if p.requires_grad} | {id(p) for p in head.parameters()}
    stem_and_all = param_groups(enc, head, freeze(enc, "all"), {}, base_lr=7e-4, weight_decay=0)
    assert list(dict.fromkeys(g["name"] for g in stem_and_all)) == ["stem", "stage1", "stage2", "stage3", "stage4",
                                                                    "head"]
    assert all(g["lr"] == 7e-4 for g in stem_and_all)


# --- regimes differ only in what trains ----------------------------------------------------------

def _dropouts(modules) -> list[str]:
    return [type(m).__name__ for item in modules if isinstance(item, torch.nn.Module) for m in item.modules()
            if isinstance(m, torch.nn.Dropout) and m.p > 0]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_the_embedding_has_no_regime_dependent_dropout(name):
    """No encoder's final group drops anything: whatever k, the embedding of a given trunk output is
    deterministic in train mode (dropout on the embedding is the head's own option)."""
    torch.manual_seed(0)
    enc = build_encoder(name)
    assert _dropouts(enc.groups()["final"]) == [], name
    clip = torch.randint(0, 256, (1, 16, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    freeze(enc, 0)
    enc.eval()
    with torch.no_grad():
        h = enc.forward_prefix(clip, enc.n_blocks)
        reference = enc.finish(h)
        for k in (1, "all"):
            freeze(enc, k)
            enc.train()
            torch.manual_seed(7)
            first = enc.finish(h)
            torch.manual_seed(8)
            assert torch.equal(first, enc.finish(h)) and torch.allclose(first, reference, atol=1e-6), (name, k)


# --- checkpoints a kill left behind ----------------------------------------------------------------

def _checkpoint(run: Path, name: str, epoch: int, registered: list, partial: bool = False) -> None:
    from trainables.checkpoints import mark_complete

    folder = run / name
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"x" * 100)
    (folder / "history.json").write_text("[]")
    mark_complete(folder, epoch)
    if partial:  # the upload was cut: a file is shorter than the marker says
        (folder / "state.pt").write_bytes(b"x" * 50)
    if name.endswith("reg"):
        registered.append(name)


def test_the_newest_complete_checkpoint_is_resumed_and_orphans_are_removed(tmp_path):
    import json as _json

    from trainables.checkpoints import SNAPSHOT_FILE, tidy

    run, registered = tmp_path / "train-x", []
    _checkpoint(run, "checkpoint_1-reg", 2, registered)
    _checkpoint(run, "checkpoint_2-orphan-old", 1, registered)
    _checkpoint(run, "checkpoint_3-new", 3, registered)  # uploaded, then the kill: never registered
    _checkpoint(run, "checkpoint_4-partial", 4, registered, partial=True)
    (run / SNAPSHOT_FILE).write_text(_json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n}
                                                                          for n in registered]}))
    found = tidy(str(run))
    assert found.path.endswith("checkpoint_3-new") and found.next_epoch == 3 and not found.registered
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_1-reg", "checkpoint_3-new"]
    assert tidy(str(tmp_path / "nothing")) is None


# --- mixed precision -----------------------------------------------------------------------------

def test_under_bf16_autocast_only_the_encoder_runs_in_bf16():
    from trainables.models.heads import LandmarkModel

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    model = LandmarkModel(enc, build_head("gcn", enc.embed_dim)).eval()
    seen = {}
    model.encoder.proj.register_forward_hook(lambda m, a, out: seen.__setitem__("embedding", out.dtype))
    first = next(m for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda m, a, out: seen.__setitem__("head", (a[0].dtype, out.dtype)))
    clip = torch.randint(0, 256, (2, 16, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clip)
        embedding = model.encoder(clip)
    assert seen["embedding"] == torch.bfloat16 and seen["head"] == (torch.float32, torch.float32)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, model.head(embedding.float()))  # exactly the fp32 head on the bf16 embedding


def test_stochastic_depth_is_off_by_default_and_an_option():
    """With drop_path 0 an unfrozen block computes in train mode what it computes frozen (eval), as
    a LoRA-adapted one does; the option turns torchvision's linear-in-depth rule back on."""
    from torchvision.ops import StochasticDepth

    from trainables.loop import build_model

    cfg = TrialConfig(encoder=EncoderCfg("echoprime", n_unfrozen=2), data=DataCfg(uri="x")).validate()
    model, _ = build_model(cfg, load_weights=False)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, StochasticDepth))
    cfg.encoder.drop_path = 0.2
    model, _ = build_model(cfg, load_weights=False)
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 16 and rates[0] == 0 and rates[-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="drop_path=1.5 must be in"):
        TrialConfig(encoder=EncoderCfg("tiny", drop_path=1.5), data=DataCfg(uri="x")).validate()
