"""bench/search.py: the recorded table is complete, the cost rule is right, and the replay runs
every strategy through the real Tuner (a slice of the grid, 2 seeds, a few trials each)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
CURVES = BENCH / "data" / "curves.csv"


def load_bench():
    if "bench_search" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_search", BENCH / "search.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_search"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_search"]


def test_curves_csv_is_small_complete_and_has_the_expected_columns():
    b = load_bench()
    assert CURVES.stat().st_size < 300_000
    with CURVES.open(newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == b.record_curves.COLUMNS
    curves = b.Curves.load(CURVES)  # raises on a missing column, a short curve or a hole in the grid
    assert len(curves.keys) == len(b.record_curves.grid()) and curves.epochs >= 4
    assert curves.grid == b.record_curves.GRID and len(curves.cells()) == 8
    for key, curve in curves.curves.items():
        assert [m["epoch"] for m in curve] == list(range(1, curves.epochs + 1)), key
        assert all(0 < m["val_px_error"] < 112 for m in curve), key
        assert len({m["trainable_params"] for m in curve}) == 1, key
        params = curves.params[key]
        assert (curve[0]["encoder_trainable_params"] == 0) == (params["n_unfrozen"] == 0), key
        first = curve[0]
        assert first["trainable_params"] == first["encoder_trainable_params"] + first["head_params"], key
    assert curves.best_hv > 0


def test_cells_are_ordered_by_the_trainable_parameters_their_trials_report():
    """search.spaces.cell_cost (meta device) against what the recorded trials reported, and the
    benchmark's space enqueues its cells in that order."""
    b = load_bench()
    from search.spaces import SPACES, cell_cost

    curves = b.Curves.load(CURVES)
    for key, curve in curves.curves.items():
        cell = {name: curves.params[key][name] for name in b.SCIENTIFIC}
        assert cell_cost(cell, "tiny") == curve[0]["trainable_params"], key
    try:
        cells = b.register(curves).cells("tiny")
    finally:
        SPACES.pop(b.SPACE_NAME, None)
    reported = [cell_cost(c, "tiny") for c in cells]
    assert reported == sorted(reported) and len(cells) == 8
    assert [(c["n_unfrozen"], c["head"]) for c in cells[:4]] == [(0, "mlp"), (0, "gcn"), (1, "mlp"), (2, "mlp")]


def test_cost_counts_epochs_until_the_target_and_charges_a_miss_everything():
    b = load_bench()
    curves = b.Curves.load(CURVES, n_unfrozen=[0, "all"], lr_head=[1e-3], aug_strength=[0.0])
    E = curves.epochs
    finals = {k: c[-1] for k, c in curves.curves.items()}

    def done(key, epochs=E, error=False):
        return {"trial_id": key, "epochs": epochs, "error": error,
                "final": finals[key] if epochs == E else dict(curves.curves[key][epochs - 1])}

    everything = [done(k) for k in curves.keys]
    whole = b.cost_to_target(everything, curves)
    assert not whole["missed"] and whole["hv_fraction"] == 1.0
    assert whole["epochs_to_target"] <= len(curves.keys) * E
    # a trial stopped early never counts toward the front, however good its partial error
    stopped = [done(k, epochs=1) for k in curves.keys]
    miss = b.cost_to_target(stopped, curves)
    assert miss["missed"] and miss["epochs_to_target"] == miss["total_epochs"] == len(curves.keys)
    assert miss["hv_fraction"] == 0.0
    # the cost stops at the trial that reaches the target, in completion order
    first = b.cost_to_target([done(k, epochs=1) for k in curves.keys] + everything, curves)
    assert first["epochs_to_target"] == len(curves.keys) + whole["epochs_to_target"]


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from search.tuner import start_ray

    cluster = start_ray(None)
    yield cluster
    ray.shutdown()


def test_every_strategy_replays_through_the_real_tuner(ray_instance, tmp_path):
    """4 cells (k in {0, all} x head), 2 configs each; 1 trial per cell; 1 seed (bench/search.py runs 21)."""
    b = load_bench()
    from search import journal
    from search.spaces import SPACES

    curves = b.Curves.load(CURVES, n_unfrozen=[0, "all"], lr_head=[1e-3], aug_strength=[0.0, 0.5])
    E = curves.epochs
    assert len(curves.keys) == 8 and len(curves.cells()) == 4
    before = dict(journal._STATE)
    results = b.replay(curves, seeds=[0], per_cell=1, workdir=tmp_path)
    for seed_runs in zip(*results.values()):
        echotune, sampled, cells, pareto, asha_tpe, random_search, grid = seed_runs
        for r in seed_runs:
            assert r["errors"] == 0 and r["epochs_to_target"] <= r["total_epochs"]
        assert echotune["trials"] == sampled["trials"] == cells["trials"] == pareto["trials"] == \
            asha_tpe["trials"] == random_search["trials"] == 4
        # each cell's first trial at the centre: the one learning rate, the first augmentation strength
        assert sorted(key for key, _ in echotune["runs"]) == sorted(f"{c}-lr0.001-aug0" for c in
                                                                    ("k0-mlp", "k0-gcn", "kall-mlp", "kall-gcn"))
        # each cell once; a cell's first trial is never stopped by its own ASHA ...
        assert cells["completed"] == 4 and cells["total_epochs"] == 4 * E and cells["deferred"] == 0
        # ... and by default, a dominated one is paused and resumed after the others: it loses no epoch
        assert echotune["completed"] == 4 and echotune["total_epochs"] == 4 * E and echotune["deferred"] >= 1
        assert echotune["ended_deferred"] == sorted(echotune["ended_deferred"])  # every deferred one ended last
        # ... only by a cheaper cell's trial, from the second rung on (the cheapest cell never)
        assert 1 <= pareto["completed"] < 4 and all(epochs >= 2 for _, epochs in pareto["runs"])
        assert random_search["completed"] == 4 and random_search["total_epochs"] == 4 * E
        assert 4 <= asha_tpe["total_epochs"] <= 4 * E
        assert grid["trials"] == 8 and grid["total_epochs"] == 8 * E and not grid["missed"]
        assert grid["hv_fraction"] == 1.0
    summary = b.summarise(results, curves)
    assert summary["grid"]["median_ratio_to_grid"] == 1.0
    assert set(summary) == set(b.STRATEGIES)
    # the process-wide search state is left as it was found
    assert b.SPACE_NAME not in SPACES and journal._STATE == before


def test_spread_order_is_the_order_before_cheapest_first():
    b = load_bench()
    assert b.spread([0, 1, 2, 4, 8, 16, "all"]) == [0, "all", 4, 1, 8, 2, 16]
    assert b.spread([0]) == [0] and b.spread([0, 1]) == [0, 1]
    cells = [{"n_unfrozen": k, "head": h} for k in (0, 1, 2, "all") for h in ("mlp", "gcn")]
    try:
        b.CELL_ORDER[0] = "spread"
        points = b.ordered_points(cells, 2)
    finally:
        b.CELL_ORDER[0] = "rounds"
    assert [p["n_unfrozen"] for p in points[:8:2]] == [0, "all", 1, 2] and points[8:] == points[:8]


@pytest.mark.parametrize("bad", ["lr_head=0.0005", "depth=1", "lr_head=fast", "aug_strength="])
def test_a_bad_subset_names_the_recorded_grid(bad, capsys):
    b = load_bench()
    with pytest.raises(SystemExit) as exit_:
        b.main(["--subset", bad, "--seeds", "1", "--overhead-trials", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and repr(bad) in err and "lr_head=0.0003,0.001,0.003" in err


def test_a_subset_given_twice_or_absent_from_a_table_is_refused(tmp_path, capsys):
    b = load_bench()
    with pytest.raises(SystemExit):
        b.main(["--subset", "lr_head=0.001", "--subset", "lr_head=0.003", "--overhead-trials", "0"])
    assert "lr_head given twice" in capsys.readouterr().err
    table = tmp_path / "curves.csv"  # a table recorded without lr_head 0.003
    table.write_text("".join(line for line in CURVES.read_text().splitlines(keepends=True) if "lr0.003" not in line))
    with pytest.raises(SystemExit):
        b.main(["--curves", str(table), "--subset", "lr_head=0.003", "--overhead-trials", "0"])
    assert "no configuration with lr_head in [0.003]" in capsys.readouterr().err
