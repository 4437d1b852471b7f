"""Parameter budget of a regime, without a GPU or weights.

    python -m trainables.describe --encoder NAME --n-unfrozen K|all --head mlp|gcn

Prints one JSON object: n_blocks, total_params, trainable_params, trainable_groups (the encoder
groups that train) and lr_groups (one learning rate each in the optimiser).
"""

from __future__ import annotations

import argparse
import json
import sys

from trainables.config import EncoderCfg, HeadCfg, TrialConfig
from trainables.loop import build_model, count_params
from trainables.models.encoders import ENCODERS
from trainables.models.freezing import lr_group_names
from trainables.models.heads import GRAPHS, HEADS


def describe(encoder: str, n_unfrozen, head: str = "mlp", graph: str = "sparse") -> dict:
    cfg = TrialConfig(encoder=EncoderCfg(encoder, n_unfrozen=n_unfrozen), head=HeadCfg(head, graph=graph))
    cfg.encoder.validate()
    cfg.head.validate()
    model, groups = build_model(cfg, load_weights=False)
    trainable, total = count_params(model)
    return {"encoder": encoder, "n_unfrozen": cfg.encoder.n_unfrozen, "head": head,
            "n_blocks": model.encoder.n_blocks, "total_params": total, "trainable_params": trainable,
            "trainable_groups": groups, "lr_groups": lr_group_names(model.encoder, groups)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.describe", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, choices=list(ENCODERS))
    p.add_argument("--n-unfrozen", required=True, help="number of last blocks to train, or 'all'")
    p.add_argument("--head", default="mlp", choices=list(HEADS))
    p.add_argument("--graph", default="sparse", choices=GRAPHS, help="GCN graph (gcn head only)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(describe(args.encoder, args.n_unfrozen, args.head, args.graph)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
