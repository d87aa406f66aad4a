"""The pipeline: load the model, evaluate the baseline, run each pass, evaluate, report, save.

Outputs are written to a temporary folder beside the destination and renamed into place at the
end, so a failed run never leaves a half-written report (an older run in the same folder survives).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from deftcompress.core.model_refs import resolve_model_ref
from deftcompress.core.protocol import Pass
from deftcompress.core.recipe import Recipe
from deftcompress.data.tasks import data_root, get_task
from deftcompress.measurement.evaluation import EvalSettings, Evaluation, evaluate
from deftcompress.measurement.size import count_parameters, directory_bytes, state_dict_bytes
from deftcompress.models.formats import save_model
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.pipeline.run_folder import check_output_dir, run_lock, write_marker
from deftcompress.pipeline.state import PipelineState
from deftcompress.reporting.plots import plot_density
from deftcompress.reporting.report import Report, StepRecord, make_step
from deftcompress.training import distributed


def _measure(state: PipelineState, settings: EvalSettings, desc: str) -> Evaluation:
    return evaluate(state.model, state.tokenizer, state.task, state.eval_examples(), state.arch, settings,
                    progress=not state.quiet, desc=desc)


def _step(state: PipelineState, name: str, evaluation: Evaluation, seconds: float, details: dict) -> StepRecord:
    params, nonzero = count_parameters(state.model)
    return make_step(state.step_index, name, evaluation, params, nonzero, state_dict_bytes(state.model), seconds, details)


class Pipeline:
    """Runs a recipe. ``Pipeline(recipe).run()`` returns the `Report`; outputs land in `output_dir`."""

    def __init__(self, recipe: Recipe, output_dir: str | os.PathLike | None = None, quiet: bool = False,
                 log=print):
        self.recipe = recipe
        self.output_dir = recipe.output_dir(output_dir)
        self.quiet = quiet
        self.log = (lambda *a, **k: None) if quiet else log
        self.final_state: PipelineState | None = None  # kept after run() for callers that reuse the model

    def protected_inputs(self) -> dict[str, Path]:
        """Inputs the output folder must never be or contain: the checkpoint and the data folder."""
        protected = {}
        model = Path(resolve_model_ref(self.recipe.model)).expanduser()
        if model.exists():
            protected["input checkpoint"] = model
        root = data_root(self.recipe.data_dir)
        if root is not None:
            protected["data folder"] = root
        return protected

    def run(self) -> Report:
        main = distributed.is_main_process()
        if main:  # refused before any model loads: a user's folder is never touched
            check_output_dir(self.output_dir, self.protected_inputs())
        with run_lock(self.output_dir) if main else nullcontext():
            work = Path(tempfile.mkdtemp(prefix=f".{self.output_dir.name}.tmp-", dir=self.output_dir.parent))
            write_marker(work)
            try:
                report = self._run(work)
                if main:
                    check_output_dir(self.output_dir, {})  # still ours after the run (nothing added meanwhile)
                    _replace_dir(work, self.output_dir)
                else:
                    shutil.rmtree(work, ignore_errors=True)
                distributed.barrier()
                return report
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise

    def _run(self, work: Path) -> Report:
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        device = distributed.pick_device(recipe.device)
        task = get_task(recipe.task)
        ref = resolve_model_ref(recipe.model)
        self.log(f"loading {recipe.model} for {task.name} on {device}")
        model, tokenizer, arch = load_model_and_tokenizer(ref, task, device)
        state = PipelineState(recipe=recipe, task=task, arch=arch, model=model, tokenizer=tokenizer, device=device,
                              work_dir=work, quiet=self.quiet)
        report = Report(name=recipe.name, model=recipe.model, task=task.name, environment=_environment(device))

        settings = state.eval_settings()
        last = _measure(state, settings, "baseline")
        report.steps.append(_step(state, "baseline", last, 0.0, {"eval_settings": dataclasses.asdict(settings)}))
        self._log_step(report.steps[-1])
        last_settings, model_changed = settings, False

        for planned in recipe.plan:
            state.step_index += 1
            p: Pass = planned.cls(planned.config)
            self.log(f"[{state.step_index}/{len(recipe.plan)}] {planned.name}")
            t0 = time.perf_counter()
            details = p.run(state) or {}
            seconds = time.perf_counter() - t0
            model_changed = model_changed or planned.cls.changes_model
            step_settings = p.eval_settings(settings)
            if not model_changed and step_settings == last_settings:
                details["evaluation"] = "reused the previous step's measurement (model unchanged)"
            else:
                last = _measure(state, step_settings, planned.name)
                last_settings, model_changed = step_settings, False
            report.steps.append(_step(state, planned.name, last, seconds, details))
            self._log_step(report.steps[-1])

        if distributed.is_main_process():
            self._save(state, report, work)
        self.final_state = state
        return report

    def _save(self, state: PipelineState, report: Report, work: Path) -> None:
        model_dir = work / "model"
        manifest = save_model(state.model, model_dir, merge_adapters=True, tokenizer=state.tokenizer)
        final = report.steps[-1].to_dict()
        final["saved_model_bytes"] = directory_bytes(model_dir)
        final["saved_model_format"] = manifest["format"]
        final["model_dir"] = str(self.output_dir / "model")
        report.final = final
        (work / "recipe.resolved.yaml").write_text(state.recipe.to_yaml())
        report.write(work)
        plot_density(report, work / "density.png")

    def _log_step(self, step: StepRecord) -> None:
        d = step.density
        dens = d.get("encoder") if d.get("encoder") is not None else d.get("decoder")
        dens_text = f"{dens:.4f}" if dens is not None else "-"
        self.log(f"  step {step.index} {step.pass_name}: {step.task_metric}={step.task_score:.4f} density={dens_text} "
                 f"({step.eval_examples} ex, {step.latency_ms_per_example:.2f} ms/ex)")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` (checked to be a run folder of ours) is only removed once the new one is in place."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "world_size": distributed.world_size()}


def run_recipe(recipe: Recipe | str | os.PathLike, output_dir: str | os.PathLike | None = None, quiet: bool = False) -> Report:
    """Python API: run a recipe (object or YAML path) and return its report."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_file(recipe)
    return Pipeline(recipe, output_dir=output_dir, quiet=quiet).run()
