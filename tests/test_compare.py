"""`deftcompress compare`: sweeps, reuse of finished runs, shared leading passes, the table, the files, the picture."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deftcompress.cli import main
from deftcompress.pipeline.recipe import Recipe, RecipeSettings
from deftcompress.core.sweep import expand_sweep
from deftcompress.errors import RecipeError
from deftcompress.reporting.compare_tables import CompareRow, pareto_front


# ---- the Pareto front -------------------------------------------------------------------------

def test_pareto_front_on_hand_made_points():
    # (score, cost): higher score and lower cost win
    points = [(0.80, 1.0), (0.79, 0.4), (0.78, 0.5), (0.81, 1.2), (0.70, 0.3), (0.79, 0.4), (None, 0.1)]
    front = pareto_front(points)
    # (0.78, 0.5) is dominated by (0.79, 0.4); the two equal points do not dominate each other
    assert front == [0, 1, 3, 4, 5]


# ---- sweeps -------------------------------------------------------------------------------------

SETTINGS = {f.name for f in dataclasses.fields(RecipeSettings)}
BASE = {"name": "grid", "model": "minilm", "task": "glue/sst2",
        "passes": [{"magnitude_prune": {"sparsity": 0.3}}, {"deft": {"max_steps": 2}}]}


def test_a_sweep_expands_to_the_product_named_after_its_values():
    data = {**BASE, "sweep": {"deft.density_target": [0.3, 0.4, 0.5], "magnitude_prune.sparsity": [0.3, 0.5],
                              "seed": [1]}}
    points = expand_sweep(data, "grid.yaml", SETTINGS)
    assert [p.name for p in points] == [f"grid-density_target{t}-sparsity{s}-seed1" for t in (0.3, 0.4, 0.5)
                                        for s in (0.3, 0.5)]
    third = points[2].data
    assert third["passes"] == [{"magnitude_prune": {"sparsity": 0.3}}, {"deft": {"max_steps": 2, "density_target": 0.4}}]
    assert third["seed"] == 1 and "sweep" not in third and BASE["passes"][1] == {"deft": {"max_steps": 2}}


@pytest.mark.parametrize("sweep, message", [
    ({"deft.density_targt": [0.3]}, "sweep.deft.density_targt: deft has no field 'density_targt'"),
    ({"deft.density_target": []}, "sweep.deft.density_target: expected a non-empty list"),
    ({"quantize.backend": ["torch_int8"]}, "no 'quantize' pass in this recipe"),
    ({"passes[5].sparsity": [0.1]}, "the recipe has no passes[5]"),
    ({"nonsense": [1]}, "'nonsense' is neither a recipe field nor <pass>.<field>"),
    ({"deft.density_target": [0.3, 0.3]}, "repeated values"),
    ({"deft.density_target": 0.3}, "expected a non-empty list"),
    ([1, 2], "expected a mapping of fields to lists of values"),
])
def test_a_bad_grid_is_a_one_line_error(sweep, message):
    with pytest.raises(RecipeError) as info:
        expand_sweep({**BASE, "sweep": sweep}, "grid.yaml", SETTINGS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_checks_every_point_and_apply_refuses_a_sweep(tmp_path, tiny_data):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**BASE, "data_dir": str(tiny_data),
                                    "sweep": {"deft.density_target": [0.3, 1.5]}}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "density_target=1.5" in result.output and "density_target must be in [0, 1)" in result.output
    path.write_text(yaml.safe_dump({**BASE, "data_dir": str(tiny_data), "sweep": {"deft.density_target": [0.3, 0.5]}}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "a sweep of 2 runs: grid-density_target0.3, grid-density_target0.5" in result.output
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "run it with `deftcompress compare" in result.output
    assert not (tmp_path / "out").exists()


# ---- the table from finished runs (no training) ---------------------------------------------------

def _fake_run(folder: Path, name: str, score: float, density: float, size: int, ms: float, passes: list,
              rows: int = 8, details: dict | None = None, final: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / ".deftcompress-run").write_text("{}\n")
    step = {"pass": "deft", "task_metric": "accuracy", "task_score": score, "metrics": {"accuracy": score},
            "density": {"encoder": density, "decoder": None, "per_layer": [], "mode": "masked", "tau": 0.01},
            "params": 1000, "nonzero_params": 900, "size_bytes": size, "latency_ms_per_example": ms, "eval_examples": rows,
            "eval_seconds": 1.0, "seconds": 2.0, "index": 1, "details": details or {},
            "latency": {"ms_batch_1": ms, "ms_batch_64": 10 * ms}}
    report = {"name": name, "model": "minilm", "task": "glue/sst2", "status": "finished", "recipe_hash": name * 4,
              "steps": [{**step, "pass": "baseline", "index": 0}, step], "final": {"saved_model_bytes": size, **(final or {})}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "progress.json").write_text(json.dumps({"format": 1, "recipe_hash": name * 4, "status": "finished",
                                                      "steps": report["steps"], "model_state": None}))
    (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump({"name": name, "passes": passes}))
    return folder


def test_table_and_files_from_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    a = _fake_run(runs / "peft", "peft", 0.81, 0.999, 90_000_000, 12.0, [{"deft": {"density_weight": 0.0}}])
    b = _fake_run(runs / "deft", "deft", 0.80, 0.36, 90_000_000, 12.5, [{"deft": {}}])
    c = _fake_run(runs / "pruned", "pruned", 0.78, 0.40, 90_000_000, 12.2,
                  [{"magnitude_prune": {"sparsity": 0.3}}, {"deft": {}}, {"quantize": {"backend": "torch_int8"}}])
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(a), str(b), str(c), "-o", str(out), "--no-timing"])
    assert result.exit_code == 0, result.output
    assert "peft(lora)" in result.output and "prune30 > deft(lora) > int8" in result.output
    assert "not comparable across runs" in result.output
    assert {p.name for p in out.iterdir()} >= {"compare.json", "compare.md", "compare.csv", "compare.png"}
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["peft", "deft", "pruned"]
    # density front: peft (best score) and deft (lowest density); pruned is dominated by deft
    assert [r["pareto_density"] for r in table] == ["1", "1", "0"]
    assert table[1]["latency_ratio_b1"] == ""  # timed in separate processes: no ratio, no latency front
    assert [r["pareto_latency"] for r in table] == ["0", "0", "0"]
    data = json.loads((out / "compare.json").read_text())
    assert data["pareto"]["density"] == ["peft", "deft"] and data["timing"] is None
    md = (out / "compare.md").read_text()
    assert "| 3 | pruned |" in md and "![score against density" in md
    # JSON for scripts
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "-o", str(out), "--no-timing", "--json"])
    assert json.loads(result.output)["rows"][0]["name"] == "peft"


def test_a_run_with_an_accuracy_budget_shows_it_and_its_search(tmp_path):
    budget = {"max_score_drop": 1.0, "metric": "accuracy", "held_out_rows": 80, "parameter": "density_target",
              "candidates": [0.2, 0.38, 0.7], "reference": {"kind": "trained here", "held_out_score": 0.9},
              "tried": [{"label": "density_target 0.38", "value": 0.38, "held_out_score": 0.895, "held_out_density": 0.4,
                         "drop_points": 0.5, "within_budget": True, "seconds": 1.0},
                        {"label": "density_target 0.2", "value": 0.2, "held_out_score": 0.85, "held_out_density": 0.21,
                         "drop_points": 5.0, "within_budget": False, "seconds": 1.0}],
              "chosen": "density_target 0.38", "within_budget": True,
              "on_evaluation_rows": {"rows": 8, "reference_score": 0.81, "chosen_score": 0.805, "drop_points": 0.5}}
    outcome = {"budget_step": 1, "final_step": 1, "max_score_drop": 1.0, "rows": 8, "reference_score": 0.81,
               "final_score": 0.80, "drop_points": 1.2, "within_budget": False}  # e.g. after a later int8 step
    runs = tmp_path / "runs"
    a = _fake_run(runs / "peft", "peft", 0.81, 0.999, 90_000_000, 12.0, [{"deft": {"density_weight": 0.0}}])
    b = _fake_run(runs / "deft", "deft", 0.80, 0.4, 90_000_000, 12.5, [{"deft": {"max_score_drop": 1.0}}],
                  details={"budget": budget, "within_budget": True}, final={"budget_outcome": outcome})
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "-o", str(out), "--no-timing"])
    assert result.exit_code == 0, result.output
    assert "within 1 pt (eval +1.20)" in result.output and "budget: the run's max_score_drop" in result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["rows"][0]["budget"] is None and data["rows"][1]["budget"]["step"] == 1
    assert (out / "compare_budget.png").is_file() and "compare_budget.png" in (out / "compare.md").read_text()


def test_compare_refuses_an_output_folder_it_did_not_make(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a", "a", 0.8, 0.5, 10, 1.0, [{"deft": {}}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["compare", str(a), "-o", str(mine), "--no-timing"])
    assert result.exit_code != 0 and "not made by deftcompress compare" in result.output
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "compare.json").exists()
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "nope"), "--no-timing"])
    assert result.exit_code != 0 and "no such recipe file or run folder" in result.output


# ---- real tiny runs: reuse, shared passes, timing ---------------------------------------------------

def _grid(tmp_path, tiny_checkpoint, tiny_data, sweep=True) -> Path:
    recipe = {"name": "g", "model": str(tiny_checkpoint("bert")), "task": "glue/sst2", "data_dir": str(tiny_data),
              "max_eval_samples": 8, "eval_batch_size": 4,
              "passes": [{"magnitude_prune": {"sparsity": 0.3}},
                         {"deft": {"max_steps": 2, "batch_size": 8, "max_train_samples": 16, "r": 2, "merge": True}}]}
    if sweep:
        recipe["sweep"] = {"deft.density_target": [0.3, 0.5]}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_sweep_runs_its_shared_passes_once_and_a_second_compare_reuses_everything(tmp_path, tiny_checkpoint,
                                                                                 tiny_data, monkeypatch, one_thread):
    from deftcompress.models.formats import load_model

    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, tiny_checkpoint, tiny_data)
    result = CliRunner().invoke(main, ["compare", str(path), "--repeats", "1", "--rows", "4", "-q", "--rank-loaded"])
    assert result.exit_code == 0, result.output
    first, second = tmp_path / "runs" / "g-density_target0.3", tmp_path / "runs" / "g-density_target0.5"
    progress = json.loads((second / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["shared_from"] == {"run": "g-density_target0.3", "steps": 2}
    report_a, report_b = (json.loads((f / "report.json").read_text()) for f in (first, second))
    assert report_b["resumed_from"] == 2 and report_a["steps"][1] == report_b["steps"][1]  # the pruning ran once
    rows = json.loads((tmp_path / "runs" / "compare-g" / "compare.json").read_text())["rows"]
    assert [r["reused"] for r in rows] == ["ran", "shared 1 pass with g-density_target0.3"]
    assert [r["sweep"] for r in rows] == [{"deft.density_target": 0.3}, {"deft.density_target": 0.5}]
    assert all(r["timing"] == "compare" and r["latency_ms"]["b1"] > 0 for r in rows)

    # the shared run equals the same recipe run on its own
    alone = Recipe.all_from_file(path)[1]
    from deftcompress import run_recipe

    run_recipe(alone, output_dir=tmp_path / "alone", quiet=True)
    import torch

    shared_model, _, _ = load_model(second / "model")
    alone_model, _, _ = load_model(tmp_path / "alone" / "model")
    for (name, x), (_, y) in zip(shared_model.state_dict().items(), alone_model.state_dict().items()):
        assert torch.equal(x, y), name

    # again: every run reused, the timing reused, nothing imported from torch
    before = {f: (f / "report.json").stat().st_mtime_ns for f in (first, second)}
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from deftcompress.cli import main
        result = CliRunner().invoke(main, ["compare", {str(path)!r}, "--repeats", "1", "--rows", "4"])
        assert result.exit_code == 0, result.output
        assert "reusing the finished run" in result.output and "timing: reused" in result.output, result.output
        heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    assert before == {f: (f / "report.json").stat().st_mtime_ns for f in (first, second)}


def test_a_finished_run_of_the_same_recipe_is_reused_not_rerun(tmp_path, tiny_checkpoint, tiny_data, monkeypatch,
                                                               one_thread):
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, tiny_checkpoint, tiny_data, sweep=False)
    assert CliRunner().invoke(main, ["apply", str(path), "-o", "runs/elsewhere", "-q"]).exit_code == 0
    stamp = (tmp_path / "runs" / "elsewhere" / "report.json").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["compare", str(path), "--no-timing"])
    assert result.exit_code == 0 and "reusing the finished run in runs/elsewhere" in result.output
    assert (tmp_path / "runs" / "elsewhere" / "report.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "runs" / "g").exists()


def test_a_folder_holding_another_recipes_run_is_kept_and_the_run_goes_beside_it(tmp_path, tiny_checkpoint, tiny_data,
                                                                                monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, tiny_checkpoint, tiny_data, sweep=False)
    assert CliRunner().invoke(main, ["apply", str(path), "-q"]).exit_code == 0
    older = json.loads((tmp_path / "runs" / "g" / "progress.json").read_text())
    recipe = yaml.safe_load(path.read_text())
    recipe["passes"][0]["magnitude_prune"]["sparsity"] = 0.4  # the recipe changed since that run
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["compare", str(path), "--no-timing"])
    assert result.exit_code == 0, result.output
    assert "holds a run of another recipe (kept)" in result.output
    assert json.loads((tmp_path / "runs" / "g" / "progress.json").read_text()) == older
    (beside,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("g-")]
    assert json.loads((beside / "report.json").read_text())["status"] == "finished"
    assert "prune40" in result.output


def test_apply_reports_latency_on_a_fixed_workload(tmp_path, tiny_checkpoint, tiny_data, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, tiny_checkpoint, tiny_data, sweep=False)
    assert CliRunner().invoke(main, ["apply", str(path), "-q"]).exit_code == 0
    report = json.loads((tmp_path / "runs" / "g" / "report.json").read_text())
    for step in report["steps"]:
        assert step["latency"]["ms_batch_1"] > 0 and step["latency"]["ms_batch_4"] > 0
        assert step["latency"]["rows"] == {"1": 8, "4": 4} and step["latency"]["repeats"] == 3
    md = (tmp_path / "runs" / "g" / "report.md").read_text()
    assert "| ms b1 | ms b4 | latency b1/b4 |" in md and "use `deftcompress compare`" in md


def test_runs_scored_on_other_row_counts_are_flagged_and_left_off_the_fronts(tmp_path):
    runs = tmp_path / "runs"
    a = _fake_run(runs / "peft", "peft", 0.81, 0.999, 90_000_000, 12.0, [{"deft": {"density_weight": 0.0}}], rows=872)
    b = _fake_run(runs / "deft", "deft", 0.80, 0.36, 90_000_000, 12.5, [{"deft": {}}], rows=872)
    c = _fake_run(runs / "few", "few", 0.95, 0.10, 10_000_000, 12.2, [{"deft": {}}], rows=64)  # would dominate both
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(a), str(b), str(c), "-o", str(out), "--no-timing"])
    assert result.exit_code == 0, result.output
    assert "0.9500!" in result.output and "another number of rows than run 1 (872)" in result.output
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["rows"] for r in table] == ["872", "872", "64"]
    assert [r["pareto_density"] for r in table] == ["1", "1", "0"]  # the 64-row score ranks nothing
    assert [r["ship"] for r in table] == ["model/"] * 3  # runs without final.deploy ship model/


def test_compare_row_costs():
    row = CompareRow(name="x", folder=".", passes="p", task_metric="accuracy", score=0.8, density_encoder=None,
                     density_decoder=0.3, params=10, nonzero_params=9, size_bytes=2_000_000, runtime="torch",
                     latency_ratio={"b1": 0.5}, timing="compare")
    assert (row.cost("density"), row.cost("latency"), row.cost("size")) == (0.3, 0.5, 2.0)
    row.timing = "report"  # a run's own figure, timed in another process: not a cost to rank by
    assert row.cost("latency") is None


def test_others_load_sees_another_process_and_a_loaded_timing_is_not_ranked():
    import subprocess
    import sys
    import time

    from deftcompress.measurement.speed import OthersLoad
    from deftcompress.reporting.compare_tables import CompareRow, fronts, table, uncertain

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        with OthersLoad() as load:
            time.sleep(1.5)  # this process idles: whatever is busy is someone else
    finally:
        busy.wait()
    assert load.share is not None and load.share > 0.2

    def row(name, ms, spread, timing):
        r = CompareRow(name=name, folder=name, passes="-", task_metric="accuracy", score=0.8, density_encoder=0.3,
                       density_decoder=None, params=1, nonzero_params=1, size_bytes=1, runtime="torch", timing=timing,
                       latency_ms={"b1": ms}, latency_spread={"b1": spread})
        r.latency_ratio = {"b1": ms / 10.0} if timing == "compare" else {}
        return r

    close = [row("a", 10.0, [9.0, 11.0], "compare"), row("b", 9.5, [8.0, 11.0], "compare")]
    assert uncertain(close[1], "b1") and "0.95x~" in table(close)[2]  # a 5% gain inside a 30% spread
    loaded = [row("a", 10.0, [9.9, 10.1], "loaded"), row("b", 5.0, [4.9, 5.1], "loaded")]
    assert fronts(loaded)["latency"] == [] and "-" in table(loaded)[2][-4]


def test_timed_rows_carry_the_peak_memory_of_their_artifact_alone(tmp_path, tiny_checkpoint, tiny_data, one_thread):
    from deftcompress import run_recipe

    common = dict(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8)
    run_recipe(Recipe.build(name="torch_run", passes=[{"relufy": {}}], **common), output_dir=tmp_path / "a", quiet=True)
    run_recipe(Recipe.build(name="graph_run", passes=[{"onnx_export": {}}, {"quantize": {"backend": "ort_int8"}}],
                            **common), output_dir=tmp_path / "b", quiet=True)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out),
                                       "--repeats", "1", "--rows", "4", "-q", "--rank-loaded"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"] and [r["ship"] for r in rows] == ["model/", "deploy/"]
    assert all(isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0 for r in rows)
    assert "peak memory" in (out / "compare.md").read_text()
    again = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out),
                                      "--repeats", "1", "--rows", "4", "--rank-loaded"])
    assert again.exit_code == 0 and "timing: reused" in again.output
    assert json.loads((out / "compare.json").read_text())["rows"] == rows  # the reused timing keeps the memory
