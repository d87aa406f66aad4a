"""What a run writes is usable as it is: Markdown that renders as tables, ordinary file modes."""

from __future__ import annotations

import os

from markdown_it import MarkdownIt

from deftcompress import Recipe, run_recipe


def _tables(text: str) -> list[list[int]]:
    """Cells per row of every table a CommonMark + tables parser finds."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, cells = [], None
    for t in tokens:
        if t.type == "table_open":
            tables.append([])
        elif t.type == "tr_open":
            cells = 0
        elif t.type in ("th_open", "td_open"):
            cells += 1
        elif t.type == "tr_close":
            tables[-1].append(cells)
    return tables


def test_report_md_renders_as_tables_and_files_get_usual_modes(tmp_path, tiny_checkpoint, tiny_data, one_thread):
    recipe = Recipe.build(name="md", model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=4,
                          passes=[{"deft": {"max_steps": 2, "batch_size": 8, "r": 2}}, {"evaluate": {}}])
    out = tmp_path / "run"
    run_recipe(recipe, output_dir=out, quiet=True)
    text = (out / "report.md").read_text()
    tables = _tables(text)
    separators = sum(1 for line in text.splitlines() if line.startswith("|---"))
    assert len(tables) == separators >= 2  # every table in the file parses as one (the |a|>0.01 header included)
    for rows in tables:
        assert len(set(rows)) == 1, rows  # every row has the header's cells
    assert "|a|>0.01" in text.replace("\\|", "|").replace("&gt;", ">")  # as rendered (outside text is escaped)

    mask = os.umask(0)
    os.umask(mask)
    for path in [out, *out.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def test_the_saved_model_has_a_card_and_loads_through_one_public_function(tmp_path, tiny_checkpoint, tiny_data,
                                                                          one_thread):
    import deftcompress

    recipe = Recipe.build(name="card", model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=4,
                          passes=[{"structured_prune": {"mlp_ratio": 0.5, "round_to": 1}}])
    out = tmp_path / "run"
    run_recipe(recipe, output_dir=out, quiet=True)
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: deftcompress") and "structured(mlp50)" in card
    assert "| accuracy |" in card and "deftcompress.load_model(path)" in card and "name: card" in card
    model, tokenizer, arch = deftcompress.load_model(out / "model")
    assert arch.family == "bert" and model.config.deftcompress_layout["mlp"]["encoder.0"]["kept"] == 32


def test_an_adapter_that_cannot_be_merged_says_why(tmp_path, tiny_checkpoint, tiny_data, one_thread):
    import json

    recipe = Recipe.build(name="prompt", model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=4,
                          passes=[{"deft": {"method": "prompt", "num_virtual_tokens": 3, "max_steps": 2, "batch_size": 8}}])
    out = tmp_path / "run"
    run_recipe(recipe, output_dir=out, quiet=True)
    manifest = json.loads((out / "model" / "deftcompress_model.json").read_text())
    assert manifest["format"] == "base_adapter" and "virtual tokens" in manifest["not_merged_because"]
    assert "kept apart from the base model" in (out / "model" / "README.md").read_text()


def test_library_notices_a_user_cannot_act_on_are_silenced(tmp_path, tiny_checkpoint, tiny_data):
    import subprocess
    import sys

    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "quiet", "model": str(tiny_checkpoint("bert")), "task": "glue/sst2",
                                    "data_dir": str(tiny_data), "max_eval_samples": 8, "eval_batch_size": 4,
                                    "passes": [{"deft": {"max_steps": 2, "batch_size": 8, "r": 2}}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "deftcompress.cli", "apply", str(path), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for notice in ("You're using a", "Some weights of", "newly initialized", "kernels-community", "none are activated"):
        assert notice not in done.stderr, notice
    assert "step 1 deft" in done.stderr  # our own progress lines are still there


def test_a_latency_ratio_inside_the_spread_of_its_repeats_is_marked():
    from deftcompress.reporting.report import LATENCY_LEGEND, Report, StepRecord

    def step(index, ms, iqr):
        return StepRecord(index=index, pass_name="p", task_metric="accuracy", task_score=0.8, metrics={}, density={},
                          params=1, nonzero_params=1, size_bytes=1, latency_ms_per_example=1.0, eval_examples=8,
                          eval_seconds=1.0, seconds=0.0, latency={"ms_batch_1": ms, "iqr_batch_1": iqr})

    report = Report(name="r", model="m", task="glue/sst2",
                    steps=[step(0, 10.0, [9.8, 10.2]), step(1, 9.7, [9.0, 10.5]), step(2, 5.0, [4.9, 5.1])])
    cells = [row[-2] for row in report.table_rows()]
    assert cells == ["1.00x", "0.97x~", "0.50x"]  # 3% faster inside a 15% spread: noise; 2x: not
    assert LATENCY_LEGEND in report.text_table()


def test_a_pass_speed_table_marks_ratios_inside_the_spread():
    from deftcompress.reporting.report import Report, StepRecord

    models = {"before": {"ms_batch_1": 10.0, "iqr_batch_1": [9.0, 11.0], "latency_ratio_batch_1": 1.0,
                         "weight_bytes": 1, "peak_bytes": 1, "peak_ratio": 1.0},
              "after": {"ms_batch_1": 9.5, "iqr_batch_1": [9.4, 9.6], "latency_ratio_batch_1": 0.95,
                        "weight_bytes": 1, "peak_bytes": 1, "peak_ratio": 1.0}}
    step = StepRecord(index=1, pass_name="ada_deft", task_metric="accuracy", task_score=0.8, metrics={}, density={},
                      params=1, nonzero_params=1, size_bytes=1, latency_ms_per_example=1.0, eval_examples=8,
                      eval_seconds=1.0, seconds=0.0,
                      details={"speed": {"workload": {"batch_sizes": [1]}, "models": models}})
    rows = Report(name="r", model="m", task="glue/sst2", steps=[step]).speed_rows(step)
    assert rows[1][2] == "1.00x" and rows[2][2] == "0.95x~"  # 5% inside the reference's 20% spread
