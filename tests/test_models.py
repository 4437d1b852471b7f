"""Encoders, freezing regimes, per-group learning rates, weights loading (registry-driven); heads: test_heads.py."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import pytest
import torch

from trainables.models.encoders import ENCODERS, build_encoder
from trainables.models.freezing import freeze, group_parameters, param_groups, unfrozen_groups
from trainables.models.heads import build_head

_CACHE: dict[str, torch.nn.Module] = {}
CHEAP = ("tiny", "r3d_18", "resnet18_2d")


def encoder(name):
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_encoder(name)
    return _CACHE[name]


def clip(b=1, seed=0):
    return torch.randint(0, 256, (b, 16, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def all_k(name):
    return list(range(ENCODERS[name].n_blocks + 1)) + ["all"]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_embedding_shape(name):
    enc = encoder(name)
    freeze(enc, "all")
    enc.eval()
    with torch.no_grad():
        out = enc(clip(2 if name in CHEAP else 1))
    assert out.shape == (2 if name in CHEAP else 1, ENCODERS[name].embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(ENCODERS))
def test_groups_cover_every_parameter_once(name):
    groups = encoder(name).groups()
    assert list(groups)[0] == "stem" and list(groups)[-1] == "final"
    assert [g for g in groups if g.startswith("blocks.")] == [f"blocks.{i}" for i in range(ENCODERS[name].n_blocks)]
    ids = [id(p) for items in groups.values() for p in group_parameters(items)]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in encoder(name).parameters()}
    stage_blocks = sorted(b for r in encoder(name).stages.values() for b in r)
    assert stage_blocks == list(range(ENCODERS[name].n_blocks))  # every block in exactly one stage


@pytest.mark.parametrize("name", list(ENCODERS))
def test_trainable_count_is_the_sum_over_the_named_groups(name):
    enc = encoder(name)
    groups = enc.groups()
    previous = -1
    for k in all_k(name):
        names = freeze(enc, k)
        trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
        assert trainable == sum(p.numel() for g in names for p in group_parameters(groups[g])), k
        assert trainable >= previous  # unfreezing more never trains less
        previous = trainable
        assert set(names) <= set(unfrozen_groups(enc.n_blocks, k))
    assert freeze(enc, 0) == [] and sum(p.requires_grad for p in enc.parameters()) == 0
    assert previous == sum(p.numel() for p in enc.parameters())  # "all" trains everything


def test_bad_k_names_both_numbers():
    with pytest.raises(ValueError, match="n_unfrozen=5 is larger than the 4 blocks of encoder 'tiny'"):
        freeze(encoder("tiny"), 5)
    with pytest.raises(ValueError, match="non-negative integer or 'all'"):
        freeze(encoder("tiny"), "most")


def _step(name, k, lr=1e-2):
    torch.manual_seed(1)
    enc = build_encoder(name) if name not in CHEAP else encoder(name)
    head = build_head("mlp", enc.embed_dim)
    names = freeze(enc, k)
    enc.train()
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in enc.named_buffers()}
    opt = torch.optim.SGD(param_groups(enc, head, names, {}, lr, 0.0), lr=lr)
    loss = head(enc(clip(2))).square().mean()
    loss.backward()
    opt.step()
    return enc, names, before, buffers


@pytest.mark.parametrize("name, k", [("tiny", k) for k in all_k("tiny")] + [("r3d_18", 2), ("resnet18_2d", 3)])
def test_frozen_parameters_and_norm_statistics_stay_bit_identical(name, k):
    enc, names, before, buffers = _step(name, k)
    groups = enc.groups()
    trainable_ids = {id(p) for g in names for p in group_parameters(groups[g])}
    for n, p in enc.named_parameters():
        if id(p) in trainable_ids:
            assert p.grad is not None, n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n
    changed = [n for n, p in enc.named_parameters() if not torch.equal(p, before[n])]
    assert bool(changed) == bool(names)
    if name == "r3d_18":  # BatchNorm running stats of frozen blocks did not move in train mode
        frozen_bn = [n for n in buffers if "running_mean" in n and n.startswith(("model.stem", "model.layer1"))]
        assert frozen_bn and all(torch.equal(dict(enc.named_buffers())[n], buffers[n]) for n in frozen_bn)


@pytest.mark.parametrize("name, k", [("echoprime", 2), ("panecho", 4), ("mvit_v2_s", 1), ("vit_b_16", 1)])
def test_frozen_parameters_bit_identical_large_encoders(name, k):
    test_frozen_parameters_and_norm_statistics_stay_bit_identical(name, k)


def test_frozen_prefix_keeps_no_activations():
    enc = encoder("tiny")
    freeze(enc, 2)
    seen = {}
    hooks = [enc.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
             for i in range(4)]
    enc.train()
    enc(clip())
    for h in hooks:
        h.remove()
    assert seen == {0: False, 1: False, 2: True, 3: True}
    split = enc.forward_suffix(enc.forward_prefix(clip(), 2), 2)  # the cacheable split gives the same answer
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(clip()), enc.forward_suffix(enc.forward_prefix(clip(), 2), 2))
    assert split.shape == (1, 128)


# --- weights ------------------------------------------------------------------------------------

def echoprime_checkpoint() -> dict:
    """A synthetic checkpoint in the published EchoPrime layout: plain mvit_v2_s keys, 512 head."""
    from torchvision.models.video import mvit_v2_s

    torch.manual_seed(3)
    m = mvit_v2_s()
    m.head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(768, 512))
    return m.state_dict()


def test_echoprime_weights_load_with_sha256(tmp_path):
    state = echoprime_checkpoint()
    assert "head.1.weight" in state and "blocks.15.attn.qkv.weight" in state and "conv_proj.weight" in state
    path = tmp_path / "echo_prime_encoder.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    enc = build_encoder("echoprime", str(path), digest)
    assert torch.equal(enc.model.head[1].weight, state["head.1.weight"])
    with pytest.raises(ValueError, match="does not match the expected"):
        build_encoder("echoprime", str(path), "0" * 64)


def test_weights_key_mismatch_lists_the_keys(tmp_path):
    state = echoprime_checkpoint()
    state.pop("blocks.3.norm1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.norm1.weight'\].*unexpected keys \['extra.weight'\]"):
        build_encoder("echoprime", str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder("echoprime", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch state dict"):
        build_encoder("echoprime", str(tmp_path / "junk.pt"))


def test_panecho_weights_published_layout(tmp_path):
    """Published PanEcho: {'weights': multi-task state}, encoder under 'encoder.', positions dropped."""
    torch.manual_seed(4)
    src = build_encoder("panecho")
    weights = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    weights["encoder.time_encoder.pe"] = torch.zeros(16, 768)
    weights["heads.EF.1.weight"] = torch.zeros(1, 768)  # task heads are not part of the encoder
    for key in ("encoder.encoder.model.features.0.0.weight", "encoder.transformer.layers.3.linear2.bias"):
        assert key in weights
    torch.save({"weights": weights}, tmp_path / "panecho.pt")
    enc = build_encoder("panecho", str(tmp_path / "panecho.pt"))
    for k, v in src.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    assert not any(p is enc.time_encoder.pe for p in enc.parameters())  # never trainable


def test_weights_from_object_storage(s3_endpoint, bucket, monkeypatch):
    import s3fs

    buf = io.BytesIO()
    torch.save(echoprime_checkpoint(), buf)
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).pipe(f"{bucket}/w/ep.pt", buf.getvalue())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    enc = build_encoder("echoprime", f"{bucket}/w/ep.pt")
    assert torch.equal(enc.model.head[1].weight, echoprime_checkpoint()["head.1.weight"])


def test_torchvision_weights_offline_error_says_how_to_supply_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_encoder("r3d_18", "torchvision")
    except RuntimeError as exc:
        assert "--weights" in str(exc) and "r3d_18" in str(exc) and "download" in str(exc).lower()
    else:
        pytest.skip("torchvision weights were reachable from this machine")
    with pytest.raises(ValueError, match="no torchvision pretrained weights"):
        build_encoder("echoprime", "torchvision")


def test_unknown_encoder_lists_choices():
    with pytest.raises(ValueError, match="choose one of echoprime, mvit_v2_s"):
        build_encoder("echoprime2")


def test_describe_cli():
    out = subprocess.run([sys.executable, "-m", "trainables.describe", "--encoder", "echoprime", "--n-unfrozen", "4",
                          "--head", "gcn"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["n_blocks"] == 16 and d["trainable_groups"] == ["blocks.12", "blocks.13", "blocks.14", "blocks.15", "final"]
    assert 34_000_000 < d["total_params"] < 36_500_000 and 0 < d["trainable_params"] < d["total_params"]
    assert d["lr_groups"] == ["stage3", "stage4", "head"]
    bad = subprocess.run([sys.executable, "-m", "trainables.describe", "--encoder", "tiny", "--n-unfrozen", "9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "larger than the 4 blocks" in bad.stderr
