"""Parameter budget of a regime, without a GPU or weights.

    python -m trainables.describe --encoder NAME --n-unfrozen K|all --head mlp|gcn
    python -m trainables.describe --encoder NAME --lora-rank R --lora-last K --head mlp|gcn

Prints one JSON object: n_blocks, total_params, trainable_params, trainable_groups (the encoder
groups that train; with LoRA, the blocks that hold adapters) and lr_groups (one learning rate
each in the optimiser). A LoRA regime (any --lora-* option; n_unfrozen is then 0) adds "lora":
its config and the adapted Linear maps' parameter count, sum of r * (in + out).
"""

from __future__ import annotations

import argparse
import json
import sys

from trainables.config import EncoderCfg, HeadCfg, LoraCfg, TrialConfig
from trainables.loop import build_model, count_params
from trainables.models.encoders import ENCODERS
from trainables.models.freezing import lr_group_names
from trainables.models.heads import GRAPHS, HEADS


def describe(encoder: str, n_unfrozen, head: str = "mlp", graph: str = "sparse", lora: LoraCfg | None = None) -> dict:
    cfg = TrialConfig(encoder=EncoderCfg(encoder, n_unfrozen=n_unfrozen, lora=lora), head=HeadCfg(head, graph=graph))
    cfg.encoder.validate()
    cfg.head.validate()
    model, groups = build_model(cfg, load_weights=False)
    trainable, total = count_params(model)
    out = {"encoder": encoder, "n_unfrozen": cfg.encoder.n_unfrozen, "head": head,
           "n_blocks": model.encoder.n_blocks, "total_params": total, "trainable_params": trainable,
           "trainable_groups": groups, "lr_groups": lr_group_names(model.encoder, groups)}
    if lora is not None:
        from dataclasses import asdict

        out["lora"] = asdict(lora) | {"adapter_params": model.encoder.lora_plan.n_params}
    return out


def lora_from_args(args) -> LoraCfg | None:
    given = {k: v for k, v in (("rank", args.lora_rank), ("last", args.lora_last), ("alpha", args.lora_alpha),
                               ("dropout", args.lora_dropout), ("targets", args.lora_targets)) if v is not None}
    if not given:
        return None
    if "targets" in given:
        given["targets"] = [t for t in given["targets"].split(",") if t]
    return LoraCfg(**given)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.describe", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, choices=list(ENCODERS))
    p.add_argument("--n-unfrozen", default=None, help="number of last blocks to train, or 'all' (0 with LoRA)")
    p.add_argument("--head", default="mlp", choices=list(HEADS))
    p.add_argument("--graph", default="sparse", choices=GRAPHS, help="GCN graph (gcn head only)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 8 when any --lora-* is given)")
    p.add_argument("--lora-last", type=int, default=None, help="adapt the last K blocks (default: all)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 8: scaling alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the input of A (default 0)")
    p.add_argument("--lora-targets", default=None, help="comma list, e.g. qkv,proj (default: each block's)")
    args = p.parse_args(argv)
    lora = lora_from_args(args)
    if args.n_unfrozen is None and lora is None:
        p.error("give --n-unfrozen K|all, or a LoRA regime (--lora-rank R --lora-last K)")
    try:
        print(json.dumps(describe(args.encoder, args.n_unfrozen if args.n_unfrozen is not None else 0,
                                  args.head, args.graph, lora)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
