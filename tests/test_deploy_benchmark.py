"""benchmarks/deploy_cpu.py (the deployment yardstick) on tiny deployed artifacts: what it finds in each run folder,
what it measures in one process (accuracy, latency per thread count, size, RSS), the ratios and the verdicts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from deftcompress import Recipe, run_recipe


def _bench():
    if "deploy_cpu_bench" not in sys.modules:  # registered first: its dataclasses look their module up
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy_cpu.py"
        spec = importlib.util.spec_from_file_location("deploy_cpu_bench", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["deploy_cpu_bench"] = module
        spec.loader.exec_module(module)
    return sys.modules["deploy_cpu_bench"]


ONNX_INT8 = [{"onnx_export": {"density_outputs": False}}, {"quantize": {"backend": "ort_int8"}},
             {"evaluate": {"runtime": "onnxruntime"}}]


@pytest.fixture(scope="module")
def tiny_runs(tiny_checkpoint, tiny_data, tmp_path_factory, one_thread):
    """A competitor (export + int8), a candidate with half the MLP neurons removed (a smaller graph) and a run
    whose last step is PyTorch (its model/ is what it deploys)."""
    root = tmp_path_factory.mktemp("deploy_runs")
    runs = {}
    for name, passes in (("competitor", ONNX_INT8),
                         ("candidate", [{"structured_prune": {"mlp_ratio": 0.5, "round_to": 8}}, *ONNX_INT8]),
                         ("pytorch", [{"evaluate": {}}])):
        recipe = Recipe.build(name=name, model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=12,
                              eval_batch_size=8, latency_repeats=0, passes=passes)
        run_recipe(recipe, output_dir=root / name, quiet=True)
        runs[name] = root / name
    return runs


def test_finds_what_each_run_deploys(tiny_runs):
    bench = _bench()
    graph = bench.find_artifact(tiny_runs["competitor"])
    assert graph.runtime == "onnxruntime" and graph.folder.endswith("onnx_int8") and graph.files == ["model.onnx"]
    assert graph.size_bytes == (Path(graph.folder) / "model.onnx").stat().st_size  # tokenizer and config.json left out
    torch_run = bench.find_artifact(tiny_runs["pytorch"])
    assert torch_run.runtime == "torch" and torch_run.folder.endswith("model")
    assert any(f.endswith(".safetensors") for f in torch_run.files)
    assert not {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "README.md"} & set(torch_run.files)


def test_the_yardstick_times_artifacts_side_by_side(tiny_runs, tiny_data, tmp_path):
    out = tmp_path / "result"
    runs = [tiny_runs["competitor"], tiny_runs["candidate"], tiny_runs["pytorch"]]
    result = _bench().main([*map(str, runs), "--rows", "8", "--repeats", "3", "--threads", "1", "2",
                            "--data-dir", str(tiny_data), "--out", str(out), "--quiet"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].endswith(f"--out {out} --quiet") and saved["eval_rows"] == 12 and saved["timed_rows"] == 8
    arts = {a["name"]: a for a in saved["artifacts"]}
    assert list(arts) == ["competitor", "candidate", "pytorch"]
    for a in arts.values():  # scored here on every eval row, as each run scored itself
        assert a["accuracy"] == pytest.approx(a["reported_score"], abs=1e-9)
    assert arts["candidate"]["size_ratio"] < 1.0  # half the MLP neurons: a smaller graph
    for threads in ("1", "2"):
        table = saved["tables"][threads]
        assert [r["name"] for r in table] == list(arts)
        for row in table:
            for b in ("b1", "b32"):
                m = row[b]
                assert len(m["ms_per_row_each_repeat"]) == 3 and m["ms_iqr"][0] <= m["ms_per_row"] <= m["ms_iqr"][1]
            assert row["peak_rss_added_bytes"] >= 0
        assert table[0]["b1"]["ratio"] == 1.0 and table[0]["b32"]["ratio"] == 1.0
    verdicts = [v for v in saved["verdicts"] if v["run"] == "candidate"]
    assert len(verdicts) == 4 and sum(v["target"].startswith("size") and v["met"] for v in verdicts) == 1
    text = out.with_suffix(".md").read_text()
    assert text.splitlines()[2].startswith("Command: `") and "## 1 thread" in text and "## 2 threads" in text
    assert "candidate: size <= 1.0x the competitor's: met (" in text
    assert text.count("| candidate |") == 2 and result["artifacts"][0]["name"] == "competitor"


def test_refuses_what_it_cannot_compare(tiny_runs, tmp_path):
    bench = _bench()
    with pytest.raises(bench.BenchmarkError, match="no report.json"):
        bench.find_artifact(tmp_path)
    with pytest.raises(bench.BenchmarkError, match="at least two"):
        bench.benchmark([tiny_runs["competitor"]], threads=[1], repeats=1, progress=None)
