"""The LoRA regime (trainables/models/lora.py), over the foundation encoders and ``tiny``.

For the big encoders the frozen prefix (blocks before the first adapted one) is run once and
shared: every comparison runs the adapted suffix only, which is all that LoRA changes."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainables.config import DataCfg, EncoderCfg, HeadCfg, LoraCfg, OptimCfg, TrialConfig
from trainables.evaluate import load_model
from trainables.models import lora
from trainables.models.encoders import ENCODERS, build_encoder
from trainables.models.freezing import freeze, lr_group_names, lr_groups_for, param_groups
from trainables.models.heads import LandmarkModel, build_head

CONFIGS = {  # panecho: the last 6 blocks = 2 ConvNeXt blocks + the 4 Transformer layers
    "tiny": LoraCfg(rank=4, last=2),
    "echoprime": LoraCfg(rank=8, last=4, dropout=0.1),
    "panecho": LoraCfg(rank=8, last=6, dropout=0.1),
}


def expected_targets(name: str, enc) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every Linear map the default targets adapt, read off the plain
    model (written out here, independently of lora.LAYOUTS)."""
    n, last = enc.n_blocks, CONFIGS[name].last
    out = {}

    def attention(path, mha):  # packed in_proj (E -> 3E) and out_proj
        out[f"{path}"] = (mha.in_proj_weight.shape[1], mha.in_proj_weight.shape[0])
        out[f"{path}.out_proj"] = (mha.out_proj.in_features, mha.out_proj.out_features)

    for i in range(n - last, n):
        if name == "tiny":
            attention(f"blocks.{i}.self_attn", enc.blocks[i].self_attn)
        elif name == "echoprime":
            attn = enc.model.blocks[i].attn
            out[f"model.blocks.{i}.attn.qkv"] = (attn.qkv.in_features, attn.qkv.out_features)
            out[f"model.blocks.{i}.attn.project.0"] = (attn.project[0].in_features, attn.project[0].out_features)
        elif i >= 18:
            attention(f"transformer.layers.{i - 18}.self_attn", enc.transformer.layers[i - 18].self_attn)
        else:  # ConvNeXt stage 4 blocks 1, 2 (blocks 16, 17): the two pointwise Linears
            blk = enc.encoder.model.features[7][i - 15].block
            for j in (3, 5):
                out[f"encoder.model.features.7.{i - 15}.block.{j}"] = (blk[j].in_features, blk[j].out_features)
    return out


def clip(seed=0):
    return torch.randint(0, 256, (1, 16, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_checkpoint(folder: Path, name: str, model: LandmarkModel, data_uri: str = "unused") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrialConfig(encoder=EncoderCfg(name, n_unfrozen=0, lora=CONFIGS[name]), head=HeadCfg("mlp"),
                      data=DataCfg(uri=data_uri), tensorboard=False)
    (folder / "config.json").write_text(cfg.validate().to_json())
    torch.save({"model": model.state_dict(), "next_epoch": 1}, folder / "state.pt")
    return folder


class Case:
    """One encoder: frozen reference, LoRA at init, one training step (B != 0), a checkpoint."""

    def __init__(self, name: str, tmp: Path):
        cfg = CONFIGS[name]
        torch.manual_seed(0)
        enc = build_encoder(name)
        self.name, self.cfg, self.x = name, cfg, clip()
        self.split = enc.n_blocks - cfg.last
        self.targets = expected_targets(name, enc)
        self.plain_keys = set(enc.state_dict())
        freeze(enc, 0)
        enc.eval()
        with torch.no_grad():
            self.h = enc.forward_prefix(self.x, self.split)  # frozen in every regime here
            self.frozen = enc.forward_suffix(self.h, self.split)
            self.frozen_full = enc(self.x) if name == "tiny" else None
        self.groups = freeze(enc, 0, cfg)
        self.enc = enc
        self.init = self.suffix(enc)
        self.init_full = self.forward(enc) if name == "tiny" else None
        self.head = build_head("mlp", enc.embed_dim, **HeadCfg("mlp").options())
        self.step()
        self.trained = self.suffix(enc)
        self.folder = write_checkpoint(tmp / name, name, LandmarkModel(enc, self.head))

    def suffix(self, enc) -> torch.Tensor:
        enc.eval()
        with torch.no_grad():
            return enc.forward_suffix(self.h, self.split)

    def forward(self, enc) -> torch.Tensor:
        enc.eval()
        with torch.no_grad():
            return enc(self.x)

    def step(self) -> None:
        """One AdamW step: the adapters' B leave zero. Records which parameters got gradients."""
        enc, head = self.enc, self.head
        enc.train()
        opt = torch.optim.AdamW(param_groups(enc, head, self.groups, {"lora": 1e-2}, 1e-3, 0.01))
        self.opt_groups = [(g["name"], g["lr"]) for g in opt.param_groups]
        target = torch.rand(1, 2, 40, 2, generator=torch.Generator().manual_seed(1))
        loss = torch.nn.functional.mse_loss(head(enc.forward_suffix(self.h, self.split)), target)
        loss.backward()
        self.with_grad = {id(p) for p in list(enc.parameters()) + list(head.parameters()) if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)


_CASES: dict[str, Case] = {}


@pytest.fixture(params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    if request.param not in _CASES:
        _CASES[request.param] = Case(request.param, tmp_path_factory.mktemp("lora"))
    return _CASES[request.param]


def test_lora_encoders_are_registered():
    assert set(CONFIGS) <= set(lora.LAYOUTS) <= set(ENCODERS)


# --- B = 0: the adapted model starts as the frozen one ------------------------------------------

def test_output_at_initialisation_equals_the_frozen_models(case):
    assert (case.init - case.frozen).abs().max() <= 1e-6
    if case.init_full is not None:  # the whole forward (frozen prefix under no_grad, split at the adapters)
        assert (case.init_full - case.frozen_full).abs().max() <= 1e-6
    assert case.enc.split == case.split  # the frozen prefix (and a feature cache) ends at the first adapter


# --- what trains ------------------------------------------------------------------------------------

def test_only_adapter_and_head_parameters_get_gradients(case):
    adapters = {id(p) for p in lora.adapter_parameters(case.enc)}
    head = {id(p) for p in case.head.parameters()}
    assert adapters and case.with_grad == adapters | head
    for n, p in case.enc.named_parameters():
        assert p.requires_grad == (id(p) in adapters), n
        assert (id(p) in adapters) == (n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")), n
    assert case.opt_groups == [("lora", 1e-2), ("head", 1e-3), ("head", 1e-3)]  # head: decayed + not
    assert case.groups == [f"blocks.{i}" for i in range(case.split, case.enc.n_blocks)]
    assert lr_group_names(case.enc, case.groups) == ["lora", "head"] == lr_groups_for(case.name, 0, case.cfg)


def test_trainable_count_is_rank_times_in_plus_out(case):
    r = case.cfg.rank
    expected = sum(r * (i + o) for i, o in case.targets.values())
    assert sum(p.numel() for p in case.enc.parameters() if p.requires_grad) == expected
    assert lora.count_params(case.name, r, case.cfg.last) == expected  # pure: no model
    adapted = {n for n, m in case.enc.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.Parameter)}
    assert adapted == set(case.targets)
    for path, (i, o) in case.targets.items():
        m = case.enc.get_submodule(path)
        assert m.lora_A.shape == (r, i) and m.lora_B.shape == (o, r)


def test_describe_prints_the_exact_total():
    proc = subprocess.run([sys.executable, "-m", "trainables.describe", "--encoder", "tiny", "--lora-rank", "4",
                           "--lora-last", "2", "--head", "mlp"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    torch.manual_seed(0)
    plain = build_encoder("tiny")
    head = build_head("mlp", plain.embed_dim)
    adapters = sum(4 * (b.self_attn.embed_dim + 3 * b.self_attn.embed_dim) +
                   4 * (b.self_attn.out_proj.in_features + b.self_attn.out_proj.out_features) for b in plain.blocks[2:])
    assert adapters == 3072
    n_head = sum(p.numel() for p in head.parameters())
    assert out["trainable_params"] == adapters + n_head
    assert out["total_params"] == sum(p.numel() for p in plain.parameters()) + n_head + adapters
    assert out["lr_groups"] == ["lora", "head"] and out["n_unfrozen"] == 0
    assert out["trainable_groups"] == ["blocks.2", "blocks.3"] and out["lora"]["adapter_params"] == adapters


# --- checkpoints and merging (after a step: B != 0) --------------------------------------------------

def test_adapters_change_the_eval_output_after_a_step(case):
    # In eval mode without gradients too: PyTorch's fused Transformer-layer path must not skip them.
    assert (case.trained - case.frozen).abs().max() > 1e-4
    assert any(p.abs().max() > 0 for n, p in case.enc.named_parameters() if n.endswith("lora_B"))


def test_checkpoint_restores_the_adapters_exactly(case):
    keys = set(case.enc.state_dict())
    assert case.plain_keys <= keys  # base keys unchanged: published or frozen checkpoints still load
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in keys - case.plain_keys)
    torch.manual_seed(123)  # other initial adapters than the trained ones
    model, cfg, _, merged = load_model(case.folder)  # a freshly built LoRA model + load_state_dict
    assert merged == 0 and cfg.encoder.lora == case.cfg
    assert torch.equal(case.suffix(model.encoder), case.trained)


def test_merged_predictions_equal_the_unmerged_ones(case):
    model, _, _, merged = load_model(case.folder, merge_lora=True)  # the --merge-lora path
    assert merged == len({p.rsplit(".out_proj", 1)[0] for p in case.targets})
    assert not lora.has_adapters(model) and set(model.encoder.state_dict()) == case.plain_keys
    torch.testing.assert_close(case.suffix(model.encoder), case.trained, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from trainables.data.shard import write_shards
    from trainables.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("echonet-lora")
    write_synthetic(root, n_videos=8, seed=3, max_frames=20)
    write_shards(root, str(root / "shards"), rows_per_file=16)
    return str(root / "shards")


def test_a_resumed_lora_trial_equals_an_uninterrupted_one(shards, tmp_path):
    """Trial.save/restore: adapters, the "lora" optimiser group and the LoRA dropout stream."""
    from trainables.loop import Trial

    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=0, lora=LoraCfg(4, 2, dropout=0.2)),
                      head=HeadCfg("mlp", channels=[16]), data=DataCfg(uri=shards, batch_size=2), epochs=2,
                      optim=OptimCfg(base_lr=1e-3, lr={"lora": 5e-3}, weight_decay=0.01), tensorboard=False,
                      storage=str(tmp_path / "runs"), name="lora").validate()
    saved = []

    def report(metrics, folder):
        if folder is not None and metrics["epoch"] == 1:
            saved.append(tmp_path / "epoch1")
            shutil.copytree(folder, saved[-1])

    whole = Trial(cfg, 0, 1, torch.device("cpu"), report)
    assert [g["name"] for g in whole.optimizer.param_groups] == ["lora", "head", "head"]
    assert whole.optimizer.param_groups[0]["lr"] == 5e-3 and whole.trainable == 2 * 4 * (256 + 128) + sum(
        p.numel() for p in whole.model.head.parameters())
    whole.run()
    torch.manual_seed(99)
    resumed = Trial(cfg, 0, 1, torch.device("cpu"), lambda m, f: None)
    resumed.restore(saved[0])
    resumed.run()
    a, b = whole.core.state_dict(), resumed.core.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B"))


def test_evaluate_cli_merges_and_exports(shards, tmp_path):
    from trainables.evaluate import main

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    freeze(enc, 0, CONFIGS["tiny"])
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    model = LandmarkModel(enc, build_head("mlp", enc.embed_dim))
    folder = write_checkpoint(tmp_path / "ck", "tiny", model, shards)
    results = {}
    for merge in (False, True):
        out = tmp_path / f"m{merge}.json"
        args = ["--checkpoint", str(folder), "--split", "train", "--out", str(out)]
        assert main(args + (["--merge-lora", "--export", str(tmp_path / "merged.pt")] if merge else [])) == 0
        results[merge] = json.loads(out.read_text())
    assert results[False]["merged_lora"] == 0 and results[True]["merged_lora"] == 2
    assert results[True]["lora"]["rank"] == 4
    for k, v in results[False].items():
        if k.startswith("train_") and isinstance(v, float):
            assert v == pytest.approx(results[True][k], rel=1e-4, abs=1e-5), k
    plain = LandmarkModel(build_encoder("tiny"), build_head("mlp", 128)).eval()
    plain.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))  # strict: plain keys
    with torch.no_grad():
        torch.testing.assert_close(plain(clip(5)), model.eval()(clip(5)), rtol=1e-5, atol=1e-5)


# --- dropout, modes, bad configs ---------------------------------------------------------------------

def test_lora_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    enc = build_encoder("tiny")
    freeze(enc, 0, LoraCfg(rank=4, last=2, dropout=0.5))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    enc.train()
    drops = [m for n, m in enc.named_modules() if n.endswith("lora_dropout")]
    assert len(drops) == 4 and all(m.training for m in drops)  # qkv + proj in blocks 2, 3
    assert not enc.blocks[3].dropout1.training and not enc.blocks[0].training  # frozen parts stay in eval
    x = clip()
    with torch.no_grad():
        a, b = enc(x), enc(x)
    assert not torch.equal(a, b)
    enc.eval()
    with torch.no_grad():
        c, d = enc(x), enc(x)
    assert torch.equal(c, d) and not torch.equal(a, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast, the trainer's GPU setting
        enc.train()
        enc(x).float().sum().backward()
    assert {n.rsplit(".", 1)[-1] for n, p in enc.named_parameters() if p.grad is not None} == {"lora_A", "lora_B"}


@pytest.mark.parametrize("lora_cfg, message", [
    ({"rank": 0}, "encoder.lora.rank must be a positive integer, not 0"),
    ({"last": 5}, "encoder.lora.last=5: 'tiny' has 4 blocks; use 1..4"),
    ({"targets": ["qkv", "q_proj"]}, "unknown 'q_proj'; valid targets of 'tiny': qkv, proj, mlp1, mlp2"),
    ({"dropout": 1.0}, "encoder.lora.dropout=1.0 must be in [0, 1)"),
    ({"rnak": 4}, "unknown keys ['rnak'] in 'encoder.lora'; valid: ['rank', 'last', 'alpha', 'dropout', 'targets']"),
])
def test_bad_lora_configs_are_one_line_errors_listing_valid_values(lora_cfg, message):
    with pytest.raises(ValueError) as exc:
        TrialConfig.from_dict({"encoder": {"name": "tiny", "n_unfrozen": 0, "lora": lora_cfg},
                               "data": {"uri": "x"}}).validate()
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_lora_needs_a_frozen_encoder_and_a_supported_one():
    with pytest.raises(ValueError, match="set encoder.n_unfrozen to 0, not 'all'"):
        TrialConfig(encoder=EncoderCfg("tiny", lora=LoraCfg()), data=DataCfg(uri="x")).validate()
    with pytest.raises(ValueError, match="'r3d_18' has no LoRA targets.*LoRA supports echoprime, mvit_v2_s, panecho"):
        lora.plan("r3d_18")
    with pytest.raises(ValueError, match=r"select nothing in block 16 of 'panecho' \(a ConvNeXt block; its targets: "
                                         r"mlp1, mlp2\)"):
        lora.plan("panecho", last=6, targets=["qkv", "proj"])


def test_config_round_trip_and_freeze_is_idempotent():
    cfg = TrialConfig(encoder=EncoderCfg("tiny", n_unfrozen=0, lora=LoraCfg(4, 2, targets=["qkv", "mlp2"])),
                      data=DataCfg(uri="x")).validate()
    again = TrialConfig.from_json(cfg.to_json()).validate()
    assert again == cfg and isinstance(again.encoder.lora, LoraCfg)
    assert TrialConfig.from_json(TrialConfig(data=DataCfg(uri="x")).to_json()).encoder.lora is None
    enc = build_encoder("tiny")
    first = freeze(enc, 0, cfg.encoder.lora)
    n = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert freeze(enc, 0, again.encoder.lora) == first and n == 2 * 4 * ((64 + 192) + (128 + 64))
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        freeze(enc, 2)
    with pytest.raises(ValueError, match="already has other LoRA adapters"):
        freeze(enc, 0, LoraCfg(8, 2))
    merged = copy.deepcopy(enc)
    assert lora.merge_and_unload(merged) == 4 and freeze(merged, 2) == ["blocks.2", "blocks.3", "final"]


def test_default_targets_and_counts_at_rank_8_on_the_last_4_blocks():
    assert lora.default_targets("panecho") == {"ConvNeXt block": ("mlp1", "mlp2"), "Transformer layer": ("qkv", "proj")}
    assert {name: lora.count_params(name, 8, 4) for name in CONFIGS} == {
        "tiny": 4 * 8 * ((64 + 192) + (64 + 64)), "echoprime": 107520, "panecho": 4 * 8 * ((768 + 2304) + (768 + 768))}


@pytest.mark.parametrize("name", sorted(lora.LAYOUTS))
def test_layouts_match_the_built_encoders(name):
    """Every target of every block, on every encoder LoRA supports: the pure counts are the model's."""
    enc = build_encoder(name)
    cfg = LoraCfg(rank=2, targets=lora.valid_targets(name))
    freeze(enc, 0, cfg)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == lora.count_params(name, 2, None, cfg.targets)
    assert enc.split == 0 and lr_groups_for(name, 0, cfg) == ["lora", "head"]
