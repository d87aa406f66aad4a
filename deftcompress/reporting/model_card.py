"""The saved model's card (`model/README.md`, the Hugging Face convention): what it is, what it scores, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deftcompress.reporting.report import Report, write_atomic
from deftcompress.reporting.text import md_cell, md_code, md_fence, md_text, yaml_scalar


def _front_matter(report: Report, library: str, metric: str, tags: str) -> list[str]:
    """The card's YAML header: a base_model the hub knows (an alias's id; a local folder has none), dataset, metric."""
    from deftcompress.core.model_refs import hub_id_of

    hub_id = hub_id_of(str(report.model))
    dataset = {"glue": "nyu-mll/glue", "squad": "rajpurkar/squad"}.get(str(report.task).split("/")[0])
    return ["---", f"library_name: {library}", *([f"base_model: {yaml_scalar(hub_id)}"] if hub_id else []),
            *([f"datasets: [{yaml_scalar(dataset)}]"] if dataset else []), f"metrics: [{yaml_scalar(metric)}]",
            f"tags: [{tags}]", "---", ""]


def model_card(report: Report, manifest: dict[str, Any], passes: str, recipe_yaml: str, step=None) -> str:
    """Markdown with a YAML header (library, base model, tags) that the hub and `huggingface_hub` read.

    `step` is the step whose measurement describes this folder (default: the last step); a run that ends in an
    exported graph describes `model/` by its last PyTorch measurement, and the graph in `deploy/`'s own card."""
    last, base = step or report.steps[-1], report.steps[0]
    density = last.density
    stacks = [f"{name} {density[name]:.4f}" for name in ("encoder", "decoder") if density.get(name) is not None]
    # what stock from_pretrained cannot build (the saver marked it so that stock loading refuses it)
    needs_us = manifest.get("stock_loading") == "refused" or manifest.get("format") in ("restructured", "torch_int8")
    load = manifest.get("load", "")
    lines = [
        *_front_matter(report, "deftcompress" if needs_us else "transformers", last.task_metric,
                       "deftcompress, activation-sparsity, deft"),
        f"# {md_text(report.name)}",
        "",
        f"{md_code(report.model)} compressed by deftcompress with the recipe below ({md_text(passes)}), for "
        f"{md_code(report.task)}.",
        "",
        "| | base (step 0) | this model |",
        "|---|---|---|",
        f"| {md_cell(last.task_metric)} | {base.task_score:.4f} | {last.task_score:.4f} |",
        f"| MLP activation density ({md_cell(density.get('mode'))}) | "
        f"{' / '.join(f'{n} {base.density[n]:.4f}' for n in ('encoder', 'decoder') if base.density.get(n) is not None) or '-'} | "
        f"{' / '.join(stacks) or '-'} |",
        f"| parameters (nonzero) | {base.params / 1e6:.2f}M ({base.nonzero_params / 1e6:.2f}M) | "
        f"{last.params / 1e6:.2f}M ({last.nonzero_params / 1e6:.2f}M) |",
        f"| size in memory | {base.size_bytes / 1e6:.1f} MB | {last.size_bytes / 1e6:.1f} MB |",
        "",
        f"Measured in PyTorch after step {last.index} ({md_text(last.pass_name)}) on {last.eval_examples} evaluation "
        "rows; density is the fraction of exactly nonzero MLP activations (real tokens in `masked` mode). The run's "
        "report.md has every step.",
        "",
        "## How to load",
        "",
        f"Format {md_code(manifest.get('format'))}: {md_text(load)}",
        "",
    ]
    if manifest.get("not_merged_because"):
        lines += [f"The adapter is kept apart from the base model: {md_text(manifest['not_merged_because'])}.", ""]
    lines += report.plain_peft_lines()
    if needs_us:
        lines += ["This folder needs deftcompress to load (`pip install deftcompress`, then "
                  "`deftcompress.load_model(path)`): stock `from_pretrained` cannot build it and refuses it with an "
                  "error that names deftcompress.", ""]
    why = ((report.final or {}).get("deploy") or {}).get("why")
    if why:
        lines += [f"**Not a model to ship**: {md_text(why)}.", ""]
    lines += ["## Recipe", "", *md_fence(recipe_yaml, "yaml"), ""]
    return "\n".join(lines)


def write_model_card(folder: Path, report: Report, manifest: dict[str, Any], passes: str, recipe_yaml: str,
                     step=None) -> Path:
    path = Path(folder) / "README.md"
    write_atomic(path, model_card(report, manifest, passes, recipe_yaml, step))
    return path


def deploy_card(report: Report, step, info: dict[str, Any], passes: str, recipe_yaml: str) -> str:
    """The card of `deploy/`: the exported graph it holds, as measured in onnxruntime, and how to run it."""
    graph = info["graph"]
    kind = "int8 (onnxruntime dynamic quantization, per channel)" if info.get("quantized") else "float32"
    outputs = ("`logits` and the per-layer density outputs `mlp_nonzero`, `mlp_positions`, `mlp_density` (asked "
               "for with `density_outputs: true`)" if info.get("density_outputs") else "the model's own outputs only")
    lines = [
        *_front_matter(report, "onnxruntime", step.task_metric, "deftcompress, activation-sparsity, deft, onnx"),
        f"# {md_text(report.name)}: the graph to deploy",
        "",
        f"{md_code(report.model)} compressed by deftcompress ({md_text(passes)}) for {md_code(report.task)}, exported "
        f"to ONNX, {kind}. This folder holds everything needed to run it: {md_code(graph)}, its tokenizer and "
        "config.json. The float PyTorch model of the same run is in `../model/`; it is not what was measured here.",
        "",
        "| | this graph |",
        "|---|---|",
        f"| {md_cell(step.task_metric)} | {step.task_score:.4f} (onnxruntime, {step.eval_examples} evaluation rows, "
        f"step {step.index} {md_cell(step.pass_name)}) |",
        f"| size (the .onnx files) | {info['graph_bytes'] / 1e6:.1f} MB |",
        f"| outputs | {outputs} |",
        "",
        "## How to run it (no deftcompress needed)",
        "",
        *{"text_to_text": _seq2seq_lines, "causal_lm": _causal_lm_lines}.get(info.get("kind"), lambda: _classifier_lines(graph))(),
        "## Recipe",
        "",
        *md_fence(recipe_yaml, "yaml"),
        "",
    ]
    return "\n".join(lines)


def _classifier_lines(graph: str) -> list[str]:
    return ["With onnxruntime and the tokenizer:", "", "```python", "import onnxruntime as ort",
            "from transformers import AutoTokenizer", "", 'tokenizer = AutoTokenizer.from_pretrained("deploy")',
            f'session = ort.InferenceSession("deploy/{graph}")', "names = {i.name for i in session.get_inputs()}",
            'batch = tokenizer(["a sentence to classify"], return_tensors="np")',
            'logits = session.run(["logits"], {k: v for k, v in batch.items() if k in names})[0]', "```", "",
            'Or with optimum: `ORTModelForSequenceClassification.from_pretrained("deploy")`.', ""]


def _seq2seq_lines() -> list[str]:
    return ["With optimum (encoder and decoder graphs):", "", "```python",
            "from optimum.onnxruntime import ORTModelForSeq2SeqLM", "from transformers import AutoTokenizer", "",
            'tokenizer = AutoTokenizer.from_pretrained("deploy")', 'model = ORTModelForSeq2SeqLM.from_pretrained("deploy")',
            'answer = model.generate(**tokenizer(["sst2 sentence: a sentence"], return_tensors="pt"))', "```", ""]


def _causal_lm_lines() -> list[str]:
    return ["With optimum (one graph with past key values):", "", "```python",
            "from optimum.onnxruntime import ORTModelForCausalLM", "from transformers import AutoTokenizer", "",
            'tokenizer = AutoTokenizer.from_pretrained("deploy")', 'model = ORTModelForCausalLM.from_pretrained("deploy")',
            'text = model.generate(**tokenizer(["The river"], return_tensors="pt"), max_new_tokens=32)', "```", ""]


def write_deploy_card(folder: Path, report: Report, step, info: dict[str, Any], passes: str, recipe_yaml: str) -> Path:
    path = Path(folder) / "README.md"
    write_atomic(path, deploy_card(report, step, info, passes, recipe_yaml))
    return path
