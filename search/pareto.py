"""Pareto front of landmark error vs trainable parameters, from a finished (or running) experiment.

    python -m search.pareto results/<name> [--evaluate-test] [--ref-error PX] [--ref-fraction F]

Writes pareto.csv, pareto.json and pareto.png into the experiment's local folder. The front is the
non-dominated set of (val_px_error, trainable_params), both minimised, built **only from trials
that ran all max_t epochs**: ASHA-stopped trials carry early-rung errors and would look
Pareto-optimal on partial data (RAY.md §2); they are drawn as partial, never on the front.

Hypervolume is computed in (val_px_error in px, trainable_params / total_params) against the
reference point (--ref-error 20 px, --ref-fraction 1.1): 20 px is ~18 % of the 112-px frame, worse
than predicting the mean shape on EchoNet-like data, and 1.1 lies just beyond full fine-tuning (1.0)
so that a fully fine-tuned front point still adds area. Fixed numbers keep sweeps comparable;
larger is better.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from search.spaces import params_of

SEARCH_CONFIG = "search_config.json"
DEFAULT_REF_ERROR, DEFAULT_REF_FRACTION = 20.0, 1.1
COLUMNS = ("trial_id", "on_front", "completed", "val_px_error", "trainable_params", "total_params", "n_unfrozen",
           "head", "encoder", "epochs", "val_px_error_ed", "val_px_error_es", "val_pct_error", "val_dice_ed",
           "val_dice_es", "val_ef_mae", "train_loss", "gpu_hours", "time_total_s", "checkpoint_path", "params")


# --- pure functions ----------------------------------------------------------------------------

def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of an (n, m) array, every column minimised (duplicates all kept)."""
    points = np.asarray(points, dtype=float)
    mask = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume_2d(points: np.ndarray, ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both minimised) and bounded by ``ref``."""
    pts = np.asarray([p for p in np.asarray(points, float) if p[0] < ref[0] and p[1] < ref[1]])
    if len(pts) == 0:
        return 0.0
    pts = pts[pareto_mask(pts)]
    pts = pts[np.argsort(pts[:, 0])]
    area, prev_y = 0.0, ref[1]
    for x, y in pts:
        if y < prev_y:
            area += (ref[0] - x) * (prev_y - y)
            prev_y = y
    return float(area)


# --- reading an experiment ------------------------------------------------------------------------

def load_settings(folder: Path) -> dict:
    path = Path(folder) / SEARCH_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SEARCH_CONFIG}; give the folder `python -m search.run` printed")
    return json.loads(path.read_text())


def _result_files(settings: dict):
    from trainables.data import storage

    exp = f"{settings['storage'].rstrip('/')}/{settings['name']}"
    fs, base = storage.open_fs(exp)
    for path in sorted(fs.glob(f"{base}/*/result.json")):
        if not path.rsplit("/", 2)[-2].startswith("train-"):
            yield path, fs


def load_trials(folder: Path) -> list[dict]:
    """One row per Tune trial: its last reported metrics, parameters and whether it ran max_t."""
    settings = load_settings(folder)
    max_t, rows = settings["max_epochs"], []
    for path, fs in _result_files(settings):
        lines = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
        lines = [r for r in lines if "val_px_error" in r]
        if not lines:
            continue
        last = max(lines, key=lambda r: r.get("epoch", 0))
        config = last.get("config", {})
        params = params_of(config)
        base = config.get("base", {})
        gpus = settings.get("workers_per_trial", 1) * settings.get("gpus_per_worker", 0)
        time_total = sum(r.get("time_this_iter_s", 0) for r in lines)
        rows.append({
            "trial_id": last.get("trial_id"), "completed": last.get("epoch", 0) >= max_t,
            "epochs": last.get("epoch", 0), "val_px_error": last["val_px_error"],
            "trainable_params": last["trainable_params"], "total_params": last["total_params"],
            "n_unfrozen": params.get("n_unfrozen", base.get("encoder", {}).get("n_unfrozen")),
            "head": params.get("head", base.get("head", {}).get("type")),
            "encoder": params.get("encoder", base.get("encoder", {}).get("name")),
            **{k: last.get(k) for k in ("val_px_error_ed", "val_px_error_es", "val_pct_error", "val_dice_ed",
                                        "val_dice_es", "val_ef_mae", "train_loss")},
            "time_total_s": time_total, "gpu_hours": time_total * gpus / 3600,
            "checkpoint_path": last.get("checkpoint_path"), "params": params,
        })
    return rows


def front(trials: list[dict]) -> list[dict]:
    """Mark ``on_front`` on every trial; returns the front sorted by trainable parameters."""
    done = [t for t in trials if t["completed"]]
    for t in trials:
        t["on_front"] = False
    if done:
        mask = pareto_mask(np.array([[t["val_px_error"], t["trainable_params"]] for t in done]))
        for t, on in zip(done, mask):
            t["on_front"] = bool(on)
    return sorted((t for t in trials if t["on_front"]), key=lambda t: t["trainable_params"])


def summary_table(trials: list[dict], n: int = 8) -> str:
    rows = sorted(trials, key=lambda t: (not t["completed"], t["val_px_error"]))[:n]
    head = f"{'trial':>10} {'k':>4} {'head':>4} {'epochs':>6} {'val px err':>10} {'trainable':>12}  state"
    lines = [head, "-" * len(head)]
    for t in rows:
        lines.append(f"{t['trial_id']:>10} {t['n_unfrozen']!s:>4} {t['head']!s:>4} {t['epochs']:>6} "
                     f"{t['val_px_error']:>10.3f} {t['trainable_params']:>12,}  "
                     f"{'done' if t['completed'] else 'stopped early'}{' *front' if t.get('on_front') else ''}")
    return "\n".join(lines)


# --- export ----------------------------------------------------------------------------------------

def export(folder: Path, ref_error: float = DEFAULT_REF_ERROR, ref_fraction: float = DEFAULT_REF_FRACTION,
           evaluate_test: bool = False) -> dict:
    folder = Path(folder)
    settings = load_settings(folder)
    trials = load_trials(folder)
    if not trials:
        raise ValueError(f"{folder}: no trial has reported yet")
    points = front(trials)
    if evaluate_test:
        add_test_metrics(points, settings)
    hv = hypervolume_2d([[t["val_px_error"], t["trainable_params"] / t["total_params"]] for t in points],
                        (ref_error, ref_fraction))
    write_csv(folder / "pareto.csv", trials)
    summary = {"experiment": settings["name"], "max_epochs": settings["max_epochs"], "n_trials": len(trials),
               "n_completed": sum(t["completed"] for t in trials),
               "objectives": {"val_px_error": "min", "trainable_params": "min"},
               "reference_point": {"val_px_error": ref_error, "trainable_fraction": ref_fraction},
               "hypervolume": hv, "front": points}
    (folder / "pareto.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(folder / "pareto.png", trials, settings["name"])
    return summary | {"trials": trials}


def write_csv(path: Path, trials: list[dict]) -> None:
    extra = sorted({k for t in trials for k in t} - set(COLUMNS))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + extra)
        w.writeheader()
        for t in sorted(trials, key=lambda t: (not t["on_front"], t["trainable_params"])):
            w.writerow({**t, "params": json.dumps(t["params"], sort_keys=True)})


def add_test_metrics(points: list[dict], settings: dict) -> None:
    from trainables.evaluate import evaluate, fetch_checkpoint
    import tempfile

    for t in points:
        if not t.get("checkpoint_path"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(t["checkpoint_path"])
            folder = path if path.is_dir() else fetch_checkpoint(t["checkpoint_path"], Path(tmp))
            t.update({k: v for k, v in evaluate(folder, "test").items() if k.startswith("test_")})


def plot(path: Path, trials: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({str(t["n_unfrozen"]) for t in trials}, key=lambda k: (k == "all", int(k) if k.isdigit() else 0))
    colours = {k: plt.cm.viridis(i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}
    markers = {"mlp": "o", "gcn": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        c = colours[str(t["n_unfrozen"])]
        ax.scatter(t["trainable_params"], t["val_px_error"], marker=markers.get(t["head"], "s"), s=60,
                   facecolors=c if t["completed"] else "none", edgecolors=c, linewidths=1.5, zorder=3)
    pts = sorted((t for t in trials if t["on_front"]), key=lambda t: t["trainable_params"])
    if pts:
        ax.step([t["trainable_params"] for t in pts], [t["val_px_error"] for t in pts], where="post",
                color="crimson", lw=2, zorder=2, label="Pareto front (completed trials)")
        ax.scatter([t["trainable_params"] for t in pts], [t["val_px_error"] for t in pts], s=160,
                   facecolors="none", edgecolors="crimson", linewidths=2, zorder=4)
    for k, c in colours.items():
        ax.scatter([], [], color=c, label=f"k = {k}")
    for h, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=h)
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="stopped early (partial)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation landmark error (px at 112)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.pareto", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the experiment's local folder (results/<name>)")
    p.add_argument("--evaluate-test", action="store_true", help="evaluate the front's checkpoints on the test split")
    p.add_argument("--ref-error", type=float, default=DEFAULT_REF_ERROR, help="hypervolume reference error, px")
    p.add_argument("--ref-fraction", type=float, default=DEFAULT_REF_FRACTION,
                   help="hypervolume reference trainable fraction of all parameters")
    args = p.parse_args(argv)
    try:
        s = export(Path(args.folder), args.ref_error, args.ref_fraction, args.evaluate_test)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{s['n_trials']} trials, {s['n_completed']} completed; front of {len(s['front'])}, "
          f"hypervolume {s['hypervolume']:.3f}")
    for i, t in enumerate(s["front"]):
        test = f", test {t['test_px_error']:.3f} px" if "test_px_error" in t else ""
        print(f"  [{i}] k={t['n_unfrozen']} head={t['head']} trainable={t['trainable_params']:,} "
              f"val {t['val_px_error']:.3f} px{test}  ({t['trial_id']})")
    print(f"wrote {Path(args.folder) / 'pareto.csv'}, pareto.json, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
