"""GPU checks (skipped without CUDA): bf16 steps of the real encoders, and memory falling with k."""

from __future__ import annotations

import pytest
import torch

from trainables.models.encoders import build_encoder
from trainables.models.freezing import freeze, param_groups
from trainables.models.heads import LandmarkModel, build_head

pytestmark = pytest.mark.gpu


def peak_step_gib(name: str, k) -> float:
    torch.manual_seed(0)
    enc = build_encoder(name)
    model = LandmarkModel(enc, build_head("gcn", enc.embed_dim)).cuda()
    opt = torch.optim.AdamW(param_groups(enc, model.head, freeze(enc, k), {}, 1e-4, 0.0))
    clip = torch.randint(0, 256, (2, 16, 112, 112), dtype=torch.uint8, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(clip).float().square().mean()
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    return torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.parametrize("name", ["echoprime", "panecho"])
def test_selective_unfreezing_needs_less_memory_than_full(name):
    full, selective, frozen = peak_step_gib(name, "all"), peak_step_gib(name, 4), peak_step_gib(name, 0)
    assert frozen < selective < full
