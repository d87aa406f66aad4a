"""The layout's promises: a torch-free core, one record per family, and every pass's state saved and loaded back."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from deftcompress.core.config import parse_config
from deftcompress.core.registry import get_pass


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["validate", "passes", "report"])
def test_cli_commands_that_read_do_not_import_torch(tmp_path, command):
    from deftcompress.reporting.report import Report, StepRecord

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: minilm\ntask: glue/sst2\npasses:\n  - magnitude_prune: {sparsity: 0.3}\n"
                      "  - deft: {method: lora, merge: true, activation_scale_fold: activation}\n"
                      "  - onnx_export: {density_outputs: true}\n  - quantize: {backend: ort_int8}\n")
    run = tmp_path / "run"
    run.mkdir()
    step = StepRecord(index=0, pass_name="baseline", task_metric="accuracy", task_score=0.5, metrics={"accuracy": 0.5},
                      density={"encoder": 0.9, "decoder": None, "per_layer": [], "mode": "masked", "tau": 0.01},
                      params=10, nonzero_params=9, size_bytes=40, latency_ms_per_example=1.0, eval_examples=2,
                      eval_seconds=0.1, seconds=0.0)
    Report(name="r", model="m", task="glue/sst2", steps=[step]).write(run)
    args = {"validate": ["validate", str(recipe)], "passes": ["passes", "--json"], "report": ["report", str(run)]}[command]
    proc = _run_isolated(f"""
        import sys
        from deftcompress.cli import main
        try:
            main({args!r}, standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, exc.code
        heavy = sorted(m for m in ("torch", "transformers", "peft", "adapters", "bitsandbytes") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_architecture_records_carry_the_family_facts():
    from deftcompress.architecture import all_families, spec_for_model_type
    from deftcompress.core.selectors import kept_module_patterns

    t5, llama, roberta = (spec_for_model_type(t) for t in ("t5", "llama", "roberta"))
    assert t5.text_to_text and not llama.text_to_text and not roberta.text_to_text
    assert t5.stack("decoder").cross_attention.heads_prunable is False
    assert llama.prompt_tuning_padding_side == "left" and roberta.prefix_tuning_drops_backbone_cache
    assert set(kept_module_patterns()) == {m for spec in all_families() for m in spec.kept_modules}
    assert "classifier" in roberta.trained_heads and "score" in llama.trained_heads


def test_selectors_take_class_names_name_components_and_regexes():
    from torch import nn

    from deftcompress.core.selectors import matches, pattern_problem

    linear = nn.Linear(2, 2)
    assert matches("bert.encoder.layer.0.output.dense", linear, ["Linear"])
    assert matches("roberta.classifier.dense", linear, ["classifier"])
    assert not matches("roberta.my_classifier_head", linear, ["classifier"])
    assert matches("lm_head", linear, [r"re:lm_\w+"])
    assert not matches("bert.pooler.dense", nn.Identity(), ["Linear"])
    assert pattern_problem("re:(") and pattern_problem("a b") and not pattern_problem("Embedding")


def _plan_error(passes):
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        Recipe.build(model="minilm", passes=passes)
    return str(info.value)


def test_plan_check_reads_declared_facts():
    # the quantize pass leaves torch_int8 layers; a training pass after it is refused with the reason it left
    assert "torch_int8 layers have no trainable weights" in _plan_error([{"quantize": {}}, {"deft": {}}])
    # magnitude pruning leaves a zero mask; structured pruning cannot follow it
    assert "put structured_prune before it" in _plan_error([{"magnitude_prune": {}}, {"structured_prune": {}}])
    # ort_int8 needs a fact (an ONNX graph) that no pass has left
    assert "needs an ONNX export pass" in _plan_error([{"quantize": {"backend": "ort_int8"}}])


# ---- the state after a pass: saved in its format and loaded back exactly ----------------------

def _run(state, name, **config):
    cls = get_pass(name, "test")
    state.step_index += 1
    return cls(parse_config(cls.Config, config, "test")).run(state)


def _logits(state):
    from deftcompress.data.features import encode_inputs, pad_inputs

    rows = state.examples("validation", 4)
    batch = pad_inputs(state.tokenizer, encode_inputs(state.tokenizer, state.task, state.arch, rows, 64))
    state.model.eval()
    with torch.no_grad():
        return state.model(**batch).logits


DEFT = {"max_steps": 2, "batch_size": 8, "max_train_samples": 16, "learning_rate": 0.05}

CASES = {  # case: (family, expected format, passes)
    "plain": ("bert", "plain", []),
    "pruned": ("bert", "restructured", [("structured_prune", {"mlp_ratio": 0.5, "head_ratio": 0.5})]),
    "torch_int8": ("bert", "torch_int8", [("quantize", {"backend": "torch_int8"})]),
    "bnb_4bit": ("bert", "bitsandbytes", [("quantize", {"backend": "bnb_4bit"})]),
    "bnb_8bit": ("bert", "bitsandbytes", [("quantize", {"backend": "bnb_8bit"})]),
    "lora_with_mask": ("bert", "base_adapter", [("magnitude_prune", {"sparsity": 0.5}), ("deft", {"method": "lora", **DEFT})]),
    "qlora": ("bert", "base_adapter", [("deft", {"method": "qlora", **DEFT})]),
    "prompt_decoder": ("llama", "base_adapter", [("deft", {"method": "prompt", **DEFT})]),
    "bottleneck_adapter": ("roberta", "base_adapter", [("deft", {"method": "adapter", **DEFT})]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_after_a_pass_saves_and_loads_back(pipeline_state, tmp_path, case, one_thread):
    family, expected_format, passes = CASES[case]
    state = pipeline_state(family)
    for name, config in passes:
        _run(state, name, **config)
    expected = _logits(state)
    manifest = state.save(tmp_path / "state")
    assert manifest["format"] == expected_format
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["model_format"] == expected_format

    fresh = pipeline_state(family)  # another model and tokenizer, replaced by the saved ones
    fresh.restore(tmp_path / "state")
    from deftcompress.models.formats import format_of

    assert type(fresh.model).__name__ == type(state.model).__name__ and fresh.step_index == state.step_index
    assert format_of(fresh.model) == expected_format  # the same kind of model: wrapped stays wrapped, 4-bit stays 4-bit
    assert fresh.tokenizer.padding_side == state.tokenizer.padding_side
    torch.testing.assert_close(_logits(fresh), expected, atol=1e-5, rtol=1e-5)
    assert [c.name for c in fresh.constraints] == [c.name for c in state.constraints]
    for restored, original in zip(fresh.constraints, state.constraints):
        assert restored.describe()["masked_entries"] == original.describe()["masked_entries"]


def _package_imports() -> dict[str, set[str]]:
    """Module -> deftcompress modules it imports anywhere (function bodies too; TYPE_CHECKING blocks excluded)."""
    import ast
    from pathlib import Path

    project = Path(__file__).resolve().parents[1]
    files = {}
    for path in (project / "deftcompress").rglob("*.py"):
        parts = list(path.relative_to(project).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (project / "passes").glob("*.py"):
        files["deftcompress.passes" + ("" if path.stem == "__init__" else f".{path.stem}")] = path

    def walk(node, found, type_checking=False):
        for child in ast.iter_child_nodes(node):
            guarded = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if not guarded and isinstance(child, ast.ImportFrom) and (child.module or "").startswith("deftcompress"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            walk(child, found, guarded)
        return found

    return {name: {m for m in walk(ast.parse(path.read_text()), set()) if m in files and m != name}
            for name, path in files.items()}


def test_no_import_cycles_between_modules():
    graph = _package_imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _layers_from_docs() -> dict[str, int]:
    """Package -> layer, read from the table in docs/architecture.md (the one place the order is written)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    layers = {}
    for number, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.M):
        for package in re.findall(r"`([a-z_]+)`", packages):
            layers[package] = int(number)
    return layers


def _package_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _climbing_imports(project, layers: dict[str, int]) -> list[str]:
    """Imports (TYPE_CHECKING and function bodies included) that do not go to a strictly lower layer."""
    import ast

    sources = [(p, "passes" if p.parent.name == "passes" else _package_of(".".join(p.relative_to(project).with_suffix("").parts)))
               for p in [*(project / "deftcompress").rglob("*.py"), *(project / "passes").glob("*.py")]]
    missing = sorted({package for _, package in sources} - set(layers))
    climbing = [f"package {name} is missing from docs/architecture.md" for name in missing]
    for path, package in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] != "deftcompress" or _package_of(name) == package:
                    continue
                target = _package_of(name)
                if layers.get(target, 99) >= layers.get(package, -1):
                    climbing.append(f"{path.relative_to(project)}:{node.lineno}: {package} (layer {layers.get(package)}) "
                                    f"imports {name} (layer {layers.get(target)})")
    return climbing


def test_packages_depend_one_way():
    from pathlib import Path

    climbing = _climbing_imports(Path(__file__).resolve().parents[1], _layers_from_docs())
    assert not climbing, "imports against docs/architecture.md:\n" + "\n".join(climbing)


def test_the_layer_check_catches_climbing_and_sibling_imports(tmp_path):
    layers = _layers_from_docs()
    (tmp_path / "deftcompress" / "core").mkdir(parents=True)
    (tmp_path / "deftcompress" / "measurement").mkdir()
    (tmp_path / "passes").mkdir()
    (tmp_path / "deftcompress" / "errors.py").write_text("from deftcompress.core import config\n")
    (tmp_path / "deftcompress" / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deftcompress.pipeline.state import PipelineState\n")
    (tmp_path / "deftcompress" / "measurement" / "b.py").write_text("def f():\n    import deftcompress.quantization.bnb\n")
    (tmp_path / "passes" / "ok.py").write_text("from deftcompress.training import loop\nfrom deftcompress.core import a\n")
    found = _climbing_imports(tmp_path, layers)
    assert sorted(line.split(":")[0] for line in found) == sorted(["deftcompress/errors.py", "deftcompress/core/a.py",
                                                               "deftcompress/measurement/b.py"])


def test_no_pass_imports_another_pass_or_names_a_family():
    graph = _package_imports()
    passes = {m for m in graph if m.startswith("deftcompress.passes.")}
    for module in passes:
        assert not (graph[module] & passes), f"{module} imports another pass"
    from pathlib import Path

    from deftcompress.architecture import all_families

    names = {n for spec in all_families() for n in (spec.family, *spec.model_types)}
    import ast

    for path in (Path(__file__).resolve().parents[1] / "passes").glob("*.py"):
        literals = {node.value.lower() for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        named = literals & names
        assert not named, f"{path.name} names the family {named}; put the fact in its architecture record"
