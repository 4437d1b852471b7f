"""Step-time benchmark: EchoPrime at its real input size (16x224x224) per freezing regime.

    python bench/step.py [--quick] [--encoder echoprime] [--batch 1] [--device cpu|cuda]

Times forward + backward + optimiser step for k in {0, 2, 4, 8, 16} unfrozen blocks and full
fine-tuning ("all", stem included), side by side in one run after a warm-up step, and prints
each as a ratio to full fine-tuning. With a GPU it also prints the peak memory per k. Then the
LoRA regime next to k = 4: rank 8 on the attention (qkv, proj) of the last 4 blocks, the encoder
frozen (``detail.lora``; its frozen prefix runs under no_grad up to the first adapted block).
Ends with one JSON line; ``ratio`` is the k = 4 figure (goal <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.config import LoraCfg  # noqa: E402
from trainables.models.encoders import build_encoder  # noqa: E402
from trainables.models.freezing import freeze, param_groups  # noqa: E402
from trainables.models.heads import LandmarkModel, build_head  # noqa: E402
from trainables.models.lora import LAYOUTS  # noqa: E402

GOAL = 0.5
LORA_RANK, LORA_LAST = 8, 4


def time_regime(model: LandmarkModel, k, clip, target, steps: int, device, lora=None) -> tuple[float, int | None]:
    groups = freeze(model.encoder, k, lora)
    model.train()
    opt = torch.optim.AdamW(param_groups(model.encoder, model.head, groups, {}, 1e-4, 0.0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = torch.nn.functional.mse_loss(model(clip).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, kernels, optimiser state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), peak


def _trainable(encoder, k) -> int:
    freeze(encoder, k)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def time_lora(model: LandmarkModel, enc, clip, target, steps: int, device) -> dict:
    """LoRA r = 8 on the last 4 blocks (run last: it puts adapters into the shared model)."""
    cfg = LoraCfg(rank=LORA_RANK, last=min(LORA_LAST, enc.n_blocks))
    seconds, peak = time_regime(model, 0, clip, target, steps, device, lora=cfg)
    print(f"lora r={cfg.rank} last {cfg.last}: {seconds / len(clip):7.3f} s/clip"
          + (f", peak {peak / 2**30:.2f} GiB" if peak else ""), file=sys.stderr)
    return {"rank": cfg.rank, "last": cfg.last, "targets": [t for t, _ in enc.lora_plan.blocks[-1][2]],
            "s_per_step": round(seconds, 4), "s_per_clip": round(seconds / len(clip), 4),
            "peak_mem_gib": round(peak / 2**30, 3) if peak else None, "trainable_params": enc.lora_plan.n_params,
            "first_adapted_block": enc.split}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="k in {0, 4, all}, one timed step each (under a minute)")
    p.add_argument("--encoder", default="echoprime")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per regime (default 2, quick 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    ks = [0, 4, "all"] if args.quick else [0, 2, 4, 8, 16, "all"]
    steps = args.steps or (1 if args.quick else 2)
    torch.manual_seed(0)
    enc = build_encoder(args.encoder)
    model = LandmarkModel(enc, build_head("mlp", enc.embed_dim)).to(device)
    clip = torch.randint(0, 256, (args.batch, 16, 112, 112), dtype=torch.uint8, device=device)
    target = torch.rand(args.batch, 2, 40, 2, device=device)
    results = {}
    for k in ks:
        if k != "all" and k > enc.n_blocks:
            continue
        seconds, peak = time_regime(model, k, clip, target, steps, device)
        results[str(k)] = {"s_per_step": round(seconds, 4), "s_per_clip": round(seconds / args.batch, 4),
                           "peak_mem_gib": round(peak / 2**30, 3) if peak else None}
        print(f"k={k!s:>3}: {seconds / args.batch:7.3f} s/clip" + (f", peak {peak / 2**30:.2f} GiB" if peak else ""),
              file=sys.stderr)
    for r, k in zip(results.values(), results):
        r["trainable_params"] = _trainable(model.encoder, k)
    lora = time_lora(model, enc, clip, target, steps, device) if args.encoder in LAYOUTS else None
    full = results["all"]["s_per_step"]
    for r in list(results.values()) + ([lora] if lora else []):
        r["ratio_to_full"] = round(r["s_per_step"] / full, 3)
    if lora and "4" in results:
        lora["ratio_to_k4"] = round(lora["s_per_step"] / results["4"]["s_per_step"], 3)
    print("ratios to full fine-tuning: " + ", ".join(f"k={k}: {r['ratio_to_full']}" for k, r in results.items())
          + (f", lora r={LORA_RANK} last {LORA_LAST}: {lora['ratio_to_full']}" if lora else ""), file=sys.stderr)
    detail = {"encoder": args.encoder, "input": "16x224x224 (resized from 16x112x112)", "batch": args.batch,
              "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "timed_steps": steps, "per_k": results, "lora": lora, "quick": args.quick}
    print(json.dumps({"bench": "step", "ratio": results["4"]["ratio_to_full"], "goal": GOAL, "detail": detail}))


if __name__ == "__main__":
    main()
