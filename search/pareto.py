"""Pareto front of landmark error vs trainable parameters, and the paper's table of regimes.

    python -m search.pareto results/<name> [--evaluate-test] [--ref-error PX] [--ref-params N]

Writes into the experiment's local folder:

* ``pareto.csv`` — every trial: its study state (COMPLETE / PRUNED / FAIL, from the Optuna study
  the search told the truth to), ``on_front``, ``infeasible`` (a non-finite metric or an error, with
  the reason; a trial that ``--scheduler asha-pareto`` stopped as dominated, or that ``asha`` paused
  as dominated and resumed after the others, says by which trial, at which epoch), config, last metrics, encoder-trainable and head parameters, GPU-hours, checkpoint;
* ``pareto.json`` — the front and its hypervolume, both over the same axes: x = trainable
  parameters (encoder + head), y = ``val_px_error`` (px at 112), both minimised;
* ``pareto.png`` — every trial coloured by k and marked by head, stopped trials hollow, failed ones
  crossed, the front highlighted; each front point's bar shows how much of its trainable count is
  the head (head width is a nuisance parameter: a point whose advantage is its head shows it);
* ``regimes.csv`` / ``regimes.md`` — one row per scientific cell (encoder, k, head, augmentation
  on/off): the best completed trial's validation errors (px, %, ED, ES), Dice, EF MAE, its
  encoder-trainable and head parameters, and the cell's GPU-hours, trials run, stopped and failed.

The front is built **only from COMPLETE trials** (ran all ``max_t`` epochs with finite metrics):
stopped trials carry early-rung errors and would look Pareto-optimal on partial data (RAY.md §2).

Hypervolume is the area dominated by the front up to the reference point (``--ref-error`` 20 px,
~18 % of the 112-px frame, worse than predicting the mean shape; ``--ref-params`` 1.1 x the largest
model's parameter count, just beyond full fine-tuning so that it still adds area), measured in
(px, trainable parameters / reference parameters). Fixed numbers keep sweeps of one encoder
comparable; larger is better.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from search import journal
from search.spaces import params_of

DEFAULT_REF_ERROR, DEFAULT_REF_PARAMS_FACTOR = 20.0, 1.1
METRICS = ("val_px_error", "val_px_error_ed", "val_px_error_es", "val_pct_error", "val_dice_ed", "val_dice_es",
           "val_dice_ed_pooled", "val_dice_es_pooled", "val_ef_mae_label", "val_ef_mae_contour", "train_loss")
COLUMNS = ("trial_id", "study_trial", "state", "on_front", "completed", "infeasible", "reason", "val_px_error",
           "trainable_params", "encoder_trainable_params", "head_params", "total_params", "encoder", "regime",
           "n_unfrozen", "lora_last", "lora_rank", "head", "aug", "epochs", *METRICS[1:], "gpu_hours", "time_total_s",
           "checkpoint_path", "params")
CELL = ("encoder", "regime", "n_unfrozen", "lora_last", "head", "aug")


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
    pts = np.asarray([p for p in np.asarray(points, float).reshape(-1, 2) if p[0] < ref[0] and p[1] < ref[1]])
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


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- reading an experiment ------------------------------------------------------------------------

def load_settings(folder: Path) -> dict:
    path = Path(folder) / journal.SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {journal.SETTINGS_FILE}; give the folder `python -m search.run` "
                                f"printed (results/<name>)")
    return json.loads(path.read_text())


def study_states(folder: Path, settings: dict) -> dict[str, dict]:
    """Tune trial id -> {state, number, reason} from the Optuna study (empty if there is none)."""
    import optuna

    from search.study import FAIL_REASON, TUNE_TRIAL_ID, study_url

    if not (Path(folder) / journal.STUDY_FILE).is_file():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=settings["study_name"], storage=study_url(folder))
    except KeyError:
        return {}
    return {t.user_attrs[TUNE_TRIAL_ID]: {"state": t.state.name, "study_trial": t.number,
                                          "reason": t.user_attrs.get(FAIL_REASON, "")}
            for t in study.trials if TUNE_TRIAL_ID in t.user_attrs}


def _result_files(settings: dict, s3_endpoint: str | None = None):
    from trainables.data import storage

    exp = f"{settings['storage'].rstrip('/')}/{settings['name']}"
    fs, base = storage.open_fs(exp, s3_endpoint or settings.get("s3_endpoint"))
    for path in sorted(fs.glob(f"{base}/trial_*/result.json")):
        yield path, fs


def epochs_of(lines: list[dict]) -> dict[int, dict]:
    """Reported results by epoch (a result replayed after a resume replaces nothing it duplicates)."""
    out = {}
    for r in lines:
        if "epoch" in r:
            out.setdefault(int(r["epoch"]), r)
    return out


def load_trials(folder: Path, s3_endpoint: str | None = None) -> list[dict]:
    """One row per Tune trial: last reported metrics, parameters, and the study's verdict."""
    settings = load_settings(folder)
    states = study_states(folder, settings)
    gpus = settings.get("workers_per_trial", 1) * settings.get("gpus_per_worker", 0)
    dominated = pareto_stops(folder)
    deferred = pareto_stops(folder, "deferred")
    rows = []
    for path, fs in _result_files(settings, s3_endpoint):
        lines = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
        by_epoch = epochs_of(lines)
        if not by_epoch:
            continue
        last = by_epoch[max(by_epoch)]
        rows.append(trial_row(last, by_epoch, states, settings, gpus, dominated, deferred))
    return rows


def pareto_stops(folder: Path, key: str = "dominated") -> dict:
    """Tune trial id -> {epoch, by} for trials the scheduler stopped as dominated (scheduler.json), or
    with ``key="deferred"`` paused as dominated to finish last."""
    path = Path(folder) / journal.SCHEDULER_FILE
    try:
        data = json.loads(path.read_text()).get(key, {}) if path.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return {}  # a damaged file costs the explanation, not the export
    return {tid: d for tid, d in data.items() if isinstance(d, dict) and {"epoch", "by"} <= set(d)} \
        if isinstance(data, dict) else {}


def trial_row(last: dict, by_epoch: dict, states: dict, settings: dict, gpus: int,
              dominated: dict | None = None, deferred: dict | None = None) -> dict:
    config = last.get("config", {})
    params, base = params_of(config), config.get("base", {})
    verdict = states.get(last.get("trial_id"), {})
    diverged = not finite(last.get("val_px_error")) or bool(last.get("non_finite"))
    state = verdict.get("state") or ("FAIL" if diverged else "COMPLETE" if max(by_epoch) >= settings["max_epochs"]
                                     else "PRUNED")
    reason = verdict.get("reason", "") or str(last.get("non_finite") or "")
    if state == "COMPLETE" and max(by_epoch) < settings["max_epochs"]:  # the study knows more than the files
        state, reason = "INCOMPLETE", f"the study says COMPLETE but result.json holds {max(by_epoch)} epochs"
    bad = state == "FAIL" or diverged
    stop = (dominated or {}).get(last.get("trial_id"))
    if not bad and state == "PRUNED" and stop:
        reason = (f"dominated at epoch {stop['epoch']} by trial {stop['by']} (fewer trainable parameters, an error "
                  f"as low at that epoch)")
    pause = (deferred or {}).get(last.get("trial_id"))
    if pause and not reason:
        reason = (f"paused at epoch {pause['epoch']} as dominated by trial {pause['by']} (fewer trainable "
                  f"parameters, an error as low at that epoch); resumed after the other trials"
                  f"{'; then stopped early by ASHA within its cell' if state == 'PRUNED' else ''}")
    time_total = sum(r.get("time_this_iter_s", 0) for r in by_epoch.values() if not r.get("replayed"))
    trainable = last.get("trainable_params", 0)
    head_params = last.get("head_params")
    aug = params.get("aug_strength", config.get("base", {}).get("aug_strength", 0.0))
    lora = base.get("encoder", {}).get("lora") or {}
    regime = params.get("regime") or ("lora" if lora or "lora_last" in params else "unfreeze")
    return {
        "trial_id": last.get("trial_id"), "study_trial": verdict.get("study_trial"), "state": state,
        "completed": state == "COMPLETE" and not bad, "infeasible": bad,
        "reason": reason if bad or (state == "PRUNED" and stop) or pause else "", "epochs": max(by_epoch),
        "val_px_error": last.get("val_px_error", math.nan), "trainable_params": trainable,
        "encoder_trainable_params": last.get("encoder_trainable_params",
                                             trainable - head_params if head_params is not None else None),
        "head_params": head_params, "total_params": last.get("total_params", 0),
        "regime": regime,
        "n_unfrozen": 0 if regime == "lora" else params.get("n_unfrozen", base.get("encoder", {}).get("n_unfrozen")),
        "lora_last": params.get("lora_last", lora.get("last")) if regime == "lora" else None,
        "lora_rank": params.get("lora_rank", lora.get("rank")) if regime == "lora" else None,
        "head": params.get("head", base.get("head", {}).get("type")),
        "encoder": params.get("encoder", base.get("encoder", {}).get("name")),
        "aug": "on" if finite(aug) and aug > 0 else "off",
        **{k: last.get(k) for k in METRICS[1:]},
        "time_total_s": time_total, "gpu_hours": time_total * gpus / 3600,
        "checkpoint_path": with_scheme(last.get("checkpoint_path"), settings["storage"]), "params": params,
    }


def with_scheme(path: str | None, storage: str) -> str | None:
    """Train reports checkpoint paths inside its filesystem (``bucket/key`` on S3): make them URIs."""
    if not path or "://" in path or "://" not in storage:
        return path
    return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"


def front(trials: list[dict]) -> list[dict]:
    """Mark ``on_front`` on every trial; returns the front (COMPLETE trials only) by trainable parameters."""
    done = [t for t in trials if t["completed"]]
    for t in trials:
        t["on_front"] = False
    if done:
        mask = pareto_mask(np.array([[t["val_px_error"], t["trainable_params"]] for t in done]))
        for t, on in zip(done, mask):
            t["on_front"] = bool(on)
    return sorted((t for t in trials if t["on_front"]), key=lambda t: t["trainable_params"])


def cell_columns(scientific: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The columns that name a cell: encoder, regime, depth, head, augmentation on/off, and any
    other scientific parameter of the space (e.g. the peft space's LoRA rank)."""
    extra = tuple(s for s in scientific if s not in ("encoder", "regime", "n_unfrozen", "lora_last", "head",
                                                       "aug_strength"))
    return CELL[:4] + extra + CELL[4:]


def regimes(trials: list[dict], scientific: tuple[str, ...] = ()) -> list[dict]:
    """One row per scientific cell: its best COMPLETE trial and what the cell cost."""
    columns = cell_columns(scientific)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for t in trials:
        cells[tuple(str(t.get(c)) for c in columns)].append(t)
    rows = []
    for key, members in sorted(cells.items()):
        done = [t for t in members if t["completed"]]
        best = min(done, key=lambda t: t["val_px_error"]) if done else None
        row = dict(zip(columns, key)) | {
            "trials": len(members), "completed": len(done), "stopped": sum(t["state"] == "PRUNED" for t in members),
            "failed": sum(t["infeasible"] for t in members),
            "gpu_hours": sum(t["gpu_hours"] for t in members), "hours": sum(t["time_total_s"] for t in members) / 3600,
            "best_trial": best["trial_id"] if best else "",
        }
        for k in ("val_px_error", *METRICS[1:-1], "encoder_trainable_params", "head_params", "trainable_params",
                  "lora_rank"):
            row[k] = best.get(k) if best else None
        for k in (k for k in (best or {}) if k.startswith("test_")):
            row[k] = best[k]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["val_px_error"] is None, r["val_px_error"] or 0))


def summary_table(trials: list[dict], n: int = 10) -> str:
    rows = sorted(trials, key=lambda t: (not t["completed"], t["infeasible"],
                                         t["val_px_error"] if finite(t["val_px_error"]) else math.inf))[:n]
    head = f"{'trial':>10} {'k':>5} {'head':>4} {'epochs':>6} {'val px err':>10} {'trainable':>12}  state"
    lines = [head, "-" * len(head)]
    for t in rows:  # k: unfrozen blocks, or L<n> for LoRA on the last n blocks
        err = f"{t['val_px_error']:>10.3f}" if finite(t["val_px_error"]) else f"{'n/a':>10}"
        state = {"COMPLETE": "done", "PRUNED": "stopped early", "FAIL": "FAILED"}.get(t["state"], t["state"].lower())
        k = f"L{t['lora_last']}" if t.get("regime") == "lora" else str(t["n_unfrozen"])  # LoRA on the last L
        lines.append(f"{t['trial_id']!s:>10} {k:>5} {t['head']!s:>4} {t['epochs']:>6} {err} "
                     f"{t['trainable_params']:>12,}  {state}{' *front' if t.get('on_front') else ''}"
                     f"{(': ' + t['reason'][:70]) if t['infeasible'] and t['reason'] else ''}")
    return "\n".join(lines)


# --- export ----------------------------------------------------------------------------------------

def export(folder: Path, ref_error: float = DEFAULT_REF_ERROR, ref_params: float | None = None,
           evaluate_test: bool = False, s3_endpoint: str | None = None) -> dict:
    from search.spaces import SPACES

    folder = Path(folder)
    settings = load_settings(folder)
    s3_endpoint = s3_endpoint or settings.get("s3_endpoint")
    scientific = SPACES[settings["space"]].scientific if settings.get("space") in SPACES else ()
    trials = load_trials(folder, s3_endpoint)
    if not trials:
        raise ValueError(f"{folder}: no trial has reported yet")
    points = front(trials)
    cells = regimes(trials, scientific)
    if evaluate_test:
        add_test_metrics(points, settings, s3_endpoint)
        best = {c["best_trial"] for c in cells if c["best_trial"]} - {t["trial_id"] for t in points}
        add_test_metrics([t for t in trials if t["trial_id"] in best], settings, s3_endpoint)
        cells = regimes(trials, scientific)
    ref_params = ref_params or DEFAULT_REF_PARAMS_FACTOR * max(t["total_params"] or 0 for t in trials) or 1.0
    hv = hypervolume_2d([[t["trainable_params"] / ref_params, t["val_px_error"]] for t in points], (1.0, ref_error))
    write_csv(folder / "pareto.csv", sorted(trials, key=lambda t: (not t["on_front"], t["trainable_params"])),
              COLUMNS)
    write_csv(folder / "regimes.csv", cells, list(cells[0]) if cells else list(cell_columns(scientific)))
    (folder / "regimes.md").write_text(regimes_markdown(cells, settings))
    summary = {"experiment": settings["name"], "max_epochs": settings["max_epochs"], "n_trials": len(trials),
               "n_completed": sum(t["completed"] for t in trials),
               "n_stopped": sum(t["state"] == "PRUNED" for t in trials),
               "n_failed": sum(t["infeasible"] for t in trials),
               "axes": {"x": "trainable_params (encoder + head)", "y": "val_px_error (px at 112)",
                        "both": "minimised"},
               "objectives": {"val_px_error": "min", "trainable_params": "min"},
               "front_from": "COMPLETE trials only (ran all max_t epochs with finite metrics)",
               "reference_point": {"val_px_error": ref_error, "trainable_params": ref_params},
               "hypervolume": hv, "hypervolume_units": "px x (trainable_params / reference trainable_params)",
               "front": points}
    (folder / "pareto.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(folder / "pareto.png", trials, settings["name"])
    return summary | {"trials": trials, "regimes": cells}


def write_csv(path: Path, rows: list[dict], columns) -> None:
    extra = sorted({k for r in rows for k in r} - set(columns))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns) + extra)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **({"params": json.dumps(r["params"], sort_keys=True)} if "params" in r else {})})


def regimes_markdown(cells: list[dict], settings: dict) -> str:
    def fmt(v, spec=".2f"):
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    test = any(k.startswith("test_") for c in cells for k in c)
    head = ["encoder", "regime", "head", "aug", "val px (ED / ES)", "val %", "Dice ED / ES", "EF MAE label / contour",
            "encoder trainable", "head params", "trials (stopped, failed)", "GPU-h"] + (["test px"] if test else [])
    lines = [f"# Regimes of {settings['name']}", "",
             f"Best completed trial per scientific cell ({settings['max_epochs']} epochs); validation split. "
             f"'—': no trial of the cell ran all epochs (stopped early by ASHA within its cell, or with "
             f"--scheduler asha-pareto as dominated by a cheaper trial at the same epoch: pareto.csv's reason "
             f"column says which).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        regime = (f"LoRA last {c['lora_last']}" + (f" (r={c['lora_rank']})" if c.get("lora_rank") not in (None, "None")
                                                    else "")
                  if c["regime"] == "lora" else f"unfreeze k={c['n_unfrozen']}")
        cols = [c["encoder"], regime, c["head"], c["aug"],
                f"{fmt(c['val_px_error'])} ({fmt(c['val_px_error_ed'])} / {fmt(c['val_px_error_es'])})",
                fmt(c["val_pct_error"]), f"{fmt(c['val_dice_ed'], '.3f')} / {fmt(c['val_dice_es'], '.3f')}",
                f"{fmt(c['val_ef_mae_label'], '.1f')} / {fmt(c['val_ef_mae_contour'], '.1f')}",
                fmt(c["encoder_trainable_params"], ","), fmt(c["head_params"], ","),
                f"{c['trials']} ({c['stopped']}, {c['failed']})", fmt(c["gpu_hours"], ".3f")]
        if test:
            cols.append(fmt(c.get("test_px_error")))
        lines.append("| " + " | ".join(str(x) for x in cols) + " |")
    return "\n".join(lines) + "\n"


def add_test_metrics(points: list[dict], settings: dict, s3_endpoint: str | None = None) -> None:
    import tempfile

    from trainables.evaluate import evaluate, fetch_checkpoint

    for t in points:
        if not t.get("checkpoint_path"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(t["checkpoint_path"])
            folder = path if path.is_dir() else fetch_checkpoint(t["checkpoint_path"], Path(tmp), s3_endpoint)
            scores = evaluate(folder, "test", s3_endpoint=s3_endpoint)
            t.update({k: v for k, v in scores.items() if k.startswith("test_")})


def plot(path: Path, trials: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in trials if finite(t["val_px_error"]) and (t["trainable_params"] or 0) > 0]
    depth = {id(t): str(t["lora_last"] if t.get("regime") == "lora" else t["n_unfrozen"]) for t in trials}
    ks = sorted(set(depth.values()), key=lambda k: (k == "all", int(k) if k.isdigit() else 0))
    colours = {k: plt.cm.viridis(i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}
    markers = {"mlp": "o", "gcn": "^"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t in shown:
        c = colours[depth[id(t)]]
        ax.scatter(t["trainable_params"], t["val_px_error"], marker=markers.get(t["head"], "s"), s=60,
                   facecolors=c if t["completed"] else "none", edgecolors=c, linewidths=1.5, zorder=3)
        if t.get("regime") == "lora":  # the same colour means "last L blocks adapted" for LoRA
            ax.scatter(t["trainable_params"], t["val_px_error"], marker="x", s=30, color="black", zorder=5)
    pts = sorted((t for t in shown if t["on_front"]), key=lambda t: t["trainable_params"])
    if pts:
        ax.step([t["trainable_params"] for t in pts], [t["val_px_error"] for t in pts], where="post",
                color="crimson", lw=2, zorder=2, label="Pareto front (completed trials)")
        ax.scatter([t["trainable_params"] for t in pts], [t["val_px_error"] for t in pts], s=160,
                   facecolors="none", edgecolors="crimson", linewidths=2, zorder=4)
        for t in pts:  # the head's share of the trainable count: from encoder-only to encoder + head
            enc = t.get("encoder_trainable_params")
            if enc is not None and t["head_params"]:
                ax.plot([max(enc, 1), t["trainable_params"]], [t["val_px_error"]] * 2, color="darkorange", lw=3,
                        alpha=0.7, zorder=1, solid_capstyle="butt")
        ax.plot([], [], color="darkorange", lw=3, alpha=0.7, label="head's share of a front point")
    failed = [t for t in trials if t["infeasible"]]
    if failed:
        ax.text(0.01, 0.01, f"{len(failed)} failed trial(s) (non-finite or errored) not shown",
                transform=ax.transAxes, fontsize=7, color="firebrick")
    for k, c in colours.items():
        ax.scatter([], [], color=c, label=f"k = {k} (LoRA: last {k})" if any(
            t.get("regime") == "lora" for t in trials) else f"k = {k}")
    if any(t.get("regime") == "lora" for t in trials):
        ax.scatter([], [], marker="x", color="black", label="LoRA")
    for h, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=h)
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="stopped early (partial)")
    if shown:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (encoder + head)")
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
    p.add_argument("--evaluate-test", action="store_true",
                   help="evaluate the front's and each cell's best checkpoint on the test split")
    p.add_argument("--ref-error", type=float, default=DEFAULT_REF_ERROR, help="hypervolume reference error, px")
    p.add_argument("--ref-params", type=float, default=None,
                   help="hypervolume reference trainable parameters (default 1.1 x the largest model)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint of the experiment's storage (default: the search's, or AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    from trainables.data.storage import StorageError

    try:
        s = export(Path(args.folder), args.ref_error, args.ref_params, args.evaluate_test, args.s3_endpoint)
    except (FileNotFoundError, ValueError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{s['n_trials']} trials: {s['n_completed']} completed, {s['n_stopped']} stopped, {s['n_failed']} failed; "
          f"front of {len(s['front'])}, hypervolume {s['hypervolume']:.3g}")
    for i, t in enumerate(s["front"]):
        test = f", test {t['test_px_error']:.3f} px" if "test_px_error" in t else ""
        regime = f"LoRA last {t['lora_last']} r={t['lora_rank']}" if t.get("regime") == "lora" else f"k={t['n_unfrozen']}"
        print(f"  [{i}] {regime} head={t['head']} trainable={t['trainable_params']:,} "
              f"(head {t['head_params'] or 0:,}) val {t['val_px_error']:.3f} px{test}  ({t['trial_id']})")
    print(f"wrote {Path(args.folder) / 'pareto.csv'}, pareto.json, pareto.png, regimes.csv, regimes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
