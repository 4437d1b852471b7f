"""Retrain one Pareto-front point at full length (round two of the search).

    python -m search.replay results/<name> --point N --epochs E [--address ADDR]

The point's parameters are replayed through the same space function with
``optuna.trial.FixedTrial`` (so a changed or mistyped space fails loudly), applied to the trial's
base config, and trained as a new Train run ``replay-<trial_id>-e<E>`` in the experiment folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from search.pareto import load_settings
from search.spaces import SPACES, apply, params_of
from trainables.data import storage


def replay_config(folder: Path, point: int, epochs: int) -> dict:
    import optuna

    settings = load_settings(folder)
    summary_path = Path(folder) / "pareto.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder}: no pareto.json; run python -m search.pareto {folder} first")
    front = json.loads(summary_path.read_text())["front"]
    if not 0 <= point < len(front):
        raise ValueError(f"--point {point}: the front has {len(front)} points (0..{len(front) - 1})")
    trial_id = front[point]["trial_id"]
    exp = f"{settings['storage'].rstrip('/')}/{settings['name']}"
    fs, base = storage.open_fs(exp, settings.get("s3_endpoint"))
    config = json.loads(fs.cat_file(f"{base}/trial_{trial_id}/params.json"))
    params = params_of(config)
    SPACES[settings["space"]].fn(optuna.trial.FixedTrial(params), settings["encoder"])  # same space, same params
    cfg = apply(params, config["base"], config.get("weights"))
    cfg.update(epochs=epochs, name=f"replay-{trial_id}-e{epochs}", storage=exp)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.replay", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the experiment's local folder (results/<name>)")
    p.add_argument("--point", type=int, required=True, help="index in pareto.json's front")
    p.add_argument("--epochs", type=int, required=True, help="epochs of the full-length run")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    args = p.parse_args(argv)
    try:
        from trainables.config import TrialConfig
        from trainables.driver import build_trainer, resolve

        cfg = resolve(TrialConfig.from_dict(replay_config(Path(args.folder), args.point, args.epochs)))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from trainables.driver import init_ray

    init_ray(args.address)
    print(f"replaying front point {args.point} as {cfg.name} for {cfg.epochs} epochs in {cfg.storage}", flush=True)
    result = build_trainer(cfg).fit()
    import ray

    ray.shutdown()  # Ray's worker log lines stop here, so the result is the last line of stdout
    print(json.dumps({"name": cfg.name, "metrics": result.metrics,
                      "checkpoint": result.checkpoint.path if result.checkpoint else None}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
