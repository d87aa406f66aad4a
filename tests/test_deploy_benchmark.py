"""benchmarks/deploy_cpu.py on two tiny deployed graphs: the table, the ratios and the verdict lines."""

import importlib.util
import json
from pathlib import Path

from deftcompress import Recipe, run_recipe


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy_cpu.py"
    spec = importlib.util.spec_from_file_location("deploy_cpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_yardstick_times_two_graphs_side_by_side(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    runs = []
    for name, passes in (("competitor", []), ("candidate", [{"structured_prune": {"mlp_ratio": 0.5, "round_to": 8}}])):
        recipe = Recipe.build(name=name, model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                              eval_batch_size=8, latency_repeats=0,
                              passes=[*passes, {"onnx_export": {"density_outputs": False}},
                                      {"quantize": {"backend": "ort_int8"}}, {"evaluate": {"runtime": "onnxruntime"}}])
        run_recipe(recipe, output_dir=tmp_path / name, quiet=True)
        runs.append(tmp_path / name)
    out = tmp_path / "result"
    _bench().main([*map(str, runs), "--rows", "8", "--repeats", "3", "--threads", "1", "--data-dir", str(tiny_data),
                   "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())["results"]["1"]
    assert [r["name"] for r in data] == ["competitor", "candidate"]
    assert data[0]["ratio_ms_b1"] == 1.0 and data[1]["ratio_size"] < 1.0  # half the MLP neurons: a smaller graph
    assert all(r["ms_b1"] > 0 and r["iqr_b1"][0] <= r["ms_b1"] <= r["iqr_b1"][1] for r in data)
    text = out.with_suffix(".md").read_text()
    assert "size <= 1.0x at 1 thread(s): met" in text and text.count("| candidate |") == 1
