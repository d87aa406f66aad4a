"""The saved model's card (`model/README.md`, the Hugging Face convention): what it is, what it scores, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deftcompress.reporting.report import Report, write_atomic
from deftcompress.reporting.text import md_cell, md_code, md_fence, md_text, yaml_scalar


def model_card(report: Report, manifest: dict[str, Any], passes: str, recipe_yaml: str) -> str:
    """Markdown with a YAML header (library, base model, tags) that the hub and `huggingface_hub` read."""
    last, base = report.steps[-1], report.steps[0]
    density = last.density
    stacks = [f"{name} {density[name]:.4f}" for name in ("encoder", "decoder") if density.get(name) is not None]
    # what stock from_pretrained cannot build (the saver marked it so that stock loading refuses it)
    needs_us = manifest.get("stock_loading") == "refused" or manifest.get("format") in ("restructured", "torch_int8")
    load = manifest.get("load", "")
    from deftcompress.core.model_refs import hub_id_of

    # hub metadata: a base_model the hub knows (an alias's id; a local folder has none), the dataset, the metric
    hub_id = hub_id_of(str(report.model))
    dataset = {"glue": "nyu-mll/glue", "squad": "rajpurkar/squad"}.get(str(report.task).split("/")[0])
    lines = [
        "---",
        "library_name: transformers" if not needs_us else "library_name: deftcompress",
        *([f"base_model: {yaml_scalar(hub_id)}"] if hub_id else []),
        *([f"datasets: [{yaml_scalar(dataset)}]"] if dataset else []),
        f"metrics: [{yaml_scalar(last.task_metric)}]",
        "tags: [deftcompress, activation-sparsity, deft]",
        "---",
        "",
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
        f"Measured on {last.eval_examples} evaluation rows; density is the fraction of exactly nonzero MLP "
        "activations (real tokens in `masked` mode). The run's report.md has every step.",
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
    lines += ["## Recipe", "", *md_fence(recipe_yaml, "yaml"), ""]
    return "\n".join(lines)


def write_model_card(folder: Path, report: Report, manifest: dict[str, Any], passes: str, recipe_yaml: str) -> Path:
    path = Path(folder) / "README.md"
    write_atomic(path, model_card(report, manifest, passes, recipe_yaml))
    return path
