"""Run one trial on Ray Train.

    python -m trainables.train --config cfg.json [--name NAME] [--storage PATH_OR_URI] [--address ADDR]

Without ``--address`` a local Ray instance is started. Running the same command again with the
same name and storage resumes from the last checkpoint (the Train run finds it by itself).
Prints each epoch's metrics and, at the end, the checkpoint path of the last epoch.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainables.config import TrialConfig
from trainables.driver import build_trainer, resolve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="trial config JSON (see trainables/config.py)")
    p.add_argument("--name", default=None, help="Train run name (default: the config's, else train-local)")
    p.add_argument("--storage", default=None, help="where runs live (default: the config's, else results/train)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    args = p.parse_args(argv)
    try:
        cfg = TrialConfig.load(args.config)
        if args.storage:
            cfg.storage = args.storage
        cfg = resolve(cfg, args.name)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    from trainables.driver import init_ray

    init_ray(args.address)
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu and gpus < cfg.workers and not args.address:  # Train would wait for them for ever
        print(f"error: the trial config asks for use_gpu with {cfg.workers} worker(s), but this machine's Ray "
              f"instance has {gpus:g} GPU(s); set \"use_gpu\": false or run on a machine with GPUs", file=sys.stderr)
        return 2
    print(f"trial {cfg.name}: encoder {cfg.encoder.name} n_unfrozen={cfg.encoder.n_unfrozen} head {cfg.head.type}, "
          f"{cfg.workers} worker(s), {cfg.epochs} epochs; runs in {cfg.storage}/{cfg.name}", flush=True)
    try:
        result = build_trainer(cfg).fit()
    except Exception as exc:
        print(f"error: trial {cfg.name} failed: {exc}", file=sys.stderr)
        return 1
    ray.shutdown()  # Ray's worker log lines stop here, so the result is the last line of stdout
    print(json.dumps({"name": cfg.name, "metrics": result.metrics,
                      "checkpoint": result.checkpoint.path if result.checkpoint else None}, default=str))
    if (result.metrics or {}).get("non_finite"):
        print(f"error: trial {cfg.name} stopped: {result.metrics['non_finite']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
