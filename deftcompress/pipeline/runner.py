"""The pipeline: load the model, evaluate the baseline, run each pass, evaluate, report, save.

Every finished step is committed to the run folder (`pipeline.progress`), so a run that stops for
any reason resumes after its last finished pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from deftcompress.core.model_refs import resolve_model_ref
from deftcompress.core.protocol import Pass
from deftcompress.pipeline.recipe import Recipe
from deftcompress.errors import DeftcompressError, RecipeError
from deftcompress.data.tasks import data_root, get_task
from deftcompress.measurement.evaluation import EvalSettings, Evaluation, evaluate
from deftcompress.measurement.size import count_parameters, directory_bytes, state_dict_bytes
from deftcompress.models.formats import save_model
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.pipeline.progress import RunProgress, data_identity, recipe_hash, recipe_splits
from deftcompress.pipeline.run_files import RunFolderError, remove_own_folder
from deftcompress.pipeline.run_folder import check_output_dir, run_lock, usual_permissions
from deftcompress.pipeline.state import PipelineState
from deftcompress.reporting.model_card import write_model_card
from deftcompress.reporting.plots import plot_density
from deftcompress.pipeline.step_checkpoints import RunStepCheckpoints
from deftcompress.pipeline.deploy_folder import write_deploy_folder
from deftcompress.reporting.report import Report, StepRecord, last_pytorch_step, make_step
from deftcompress.training import distributed
from deftcompress.training.score_budget import budget_outcome


def _measure(state: PipelineState, settings: EvalSettings, desc: str) -> Evaluation:
    if settings.runtime == "onnxruntime":
        from deftcompress.runtime.onnxruntime import SessionSettings, evaluate_onnx

        return evaluate_onnx(state.onnx, state.tokenizer, state.task, state.eval_examples(), state.arch, settings,
                             SessionSettings(settings.ort_threads, settings.ort_optimization), progress=not state.quiet,
                             desc=f"{desc} (onnxruntime)")
    if settings.runtime == "sparse":
        from deftcompress.runtime.sparse_mlp import SparseCalibration, SparseMLPRuntime

        calibration = SparseCalibration(progress=None if state.quiet else print)
        with SparseMLPRuntime(state.model, state.arch, calibration, timed_calls=settings.sparse_timed_calls) as runtime:
            evaluation = evaluate(state.model, state.tokenizer, state.task, state.eval_examples(), state.arch, settings,
                                  progress=not state.quiet, desc=f"{desc} (sparse MLP)")
        evaluation.runtime_details = {"sparse_mlp": {"layers": runtime.layer_report(), "calibration": str(calibration.path),
                                                     "machine": calibration.key}}
        evaluation.sparse_runtime = runtime
        return evaluation
    return evaluate(state.model, state.tokenizer, state.task, state.eval_examples(), state.arch, settings,
                    progress=not state.quiet, desc=desc)


def _step(state: PipelineState, name: str, evaluation: Evaluation, seconds: float, details: dict,
          settings: EvalSettings) -> StepRecord:
    params, nonzero = count_parameters(state.model)
    if settings.runtime == "onnxruntime":  # the step measured the graph: its size is the graph's files
        size = sum(Path(state.onnx.folder, f).stat().st_size for f in state.onnx.files)
        details.setdefault("runtime", f"onnxruntime ({'int8' if state.onnx.quantized else 'fp32'} graph; size = .onnx files)")
    else:
        size = state_dict_bytes(state.model)
    details.update(evaluation.runtime_details)
    if settings.decode_prompts:
        details["decoding"] = _decoding(state, settings, evaluation.sparse_runtime)
    step = make_step(state.step_index, name, evaluation, params, nonzero, size, seconds, details)
    step.latency = _fixed_latency(state, settings, evaluation.sparse_runtime)
    return step


def _fixed_latency(state: PipelineState, settings: EvalSettings, sparse_runtime=None) -> dict[str, Any]:
    """The step's model timed on the same workload as every other step of the run (see measurement.speed)."""
    from deftcompress.measurement.speed import step_latency
    from deftcompress.runtime.onnxruntime import onnx_forward

    repeats = state.recipe.latency_repeats
    if not repeats:
        return {}
    model: Any = state.model
    if settings.runtime == "onnxruntime":
        if state.onnx.kind != "classifier":
            return {"note": f"not timed: {state.onnx.kind.replace('_', '-')} graphs run through generation "
                             "(evaluate's decode_speed times them)"}
        model = onnx_forward(state.onnx.folder, state.onnx.main_file(), settings.ort_threads, settings.ort_optimization)
    if sparse_runtime is not None:  # the runtime the evaluation ran in, its checks already made
        sparse_runtime.stop_timing()  # the report's per-layer timing would run dense too inside the timed calls
        with sparse_runtime:
            return step_latency(model, state.tokenizer, state.task, state.arch, state.eval_examples(),
                                settings.batch_size, repeats=repeats, max_seq_length=settings.max_seq_length,
                                max_target_length=settings.max_target_length)
    return step_latency(model, state.tokenizer, state.task, state.arch, state.eval_examples(), settings.batch_size,
                        repeats=repeats, max_seq_length=settings.max_seq_length,
                        max_target_length=settings.max_target_length)


def _decoding(state: PipelineState, settings: EvalSettings, sparse_runtime=None) -> dict[str, Any]:
    """Greedy decoding at batch 1: the dense PyTorch model and, side by side, the runtime the step measured in."""
    from deftcompress.measurement.decoding import compare_decoding, decode_prompts, greedy

    prompts = decode_prompts(state.tokenizer, state.eval_examples(), settings.decode_prompt_tokens, settings.decode_prompts)
    new_tokens = settings.decode_new_tokens
    generators = {"torch": greedy(state.model, new_tokens)}
    if sparse_runtime is not None:
        sparse_runtime.stop_timing()  # its per-layer dense-against-sparse timing would run inside the timed calls
        generators["sparse"] = greedy(state.model, new_tokens, around=lambda: sparse_runtime)
    elif settings.runtime == "onnxruntime":
        from deftcompress.runtime.onnxruntime import SessionSettings, ort_greedy

        # no spinning: idle onnxruntime threads would take the cores PyTorch needs between turns
        generators["onnxruntime"] = ort_greedy(state.onnx.folder, new_tokens, SessionSettings(
            settings.ort_threads, settings.ort_optimization, spinning=False))
    result = compare_decoding(generators, prompts, new_tokens, settings.decode_repeats, progress=not state.quiet)
    return result.to_dict()


class Pipeline:
    """Runs a recipe. ``Pipeline(recipe).run()`` returns the `Report`; outputs land in `output_dir`.

    The run folder is written as the run goes: after every finished pass its state (the model in its
    format, the constraints, the report so far, the recipe's hash) is committed to the folder, so an
    error, Ctrl-C, SIGTERM or SIGKILL loses at most the pass that was running. Running the same recipe
    into the same folder again resumes after the last finished pass (`report.resumed_from`); a
    finished run is returned as it is; another recipe is refused unless `restart=True`.
    """

    def __init__(self, recipe: Recipe, output_dir: str | os.PathLike | None = None, quiet: bool = False,
                 log=print, restart: bool = False, warn=None, on_commit=None):
        self.recipe = recipe
        if recipe.settings.data_dir is None and data_root(None) is not None:
            # the run remembers where its data came from (recipe.resolved.yaml), e.g. for timing it in a new shell
            recipe.settings.data_dir = str(data_root(None).resolve())
        self.output_dir = recipe.output_dir(output_dir)
        self.quiet = quiet
        self.restart = restart
        self.log = (lambda *a, **k: None) if quiet else log
        self.warn = warn or (lambda text: print(text, file=sys.stderr))  # warnings show even when quiet
        self.final_state: PipelineState | None = None  # kept after run() for callers that reuse the model
        self.reused_finished_run = False
        # called after each committed step with (step index, run folder, progress record): `compare` keeps
        # a snapshot there when later runs share this run's first passes
        self.on_commit = on_commit

    @functools.cached_property
    def model_ref(self) -> str:
        """The recipe's model as a folder (alias resolved, checkpoint checked) or a hub id; resolved once."""
        return resolve_model_ref(self.recipe.model, trust_pickle=self.recipe.trust_pickle)

    def protected_inputs(self) -> dict[str, Path]:
        """Inputs the output folder must never be or contain: the checkpoint and the data folder."""
        protected = {}
        model = Path(self.model_ref).expanduser()
        if model.exists():
            protected["input checkpoint"] = model
        root = data_root(self.recipe.data_dir)
        if root is not None:
            protected["data folder"] = root
        return protected

    def run(self) -> Report:
        out = self.output_dir
        main = distributed.is_main_process()
        if main:  # refused before any model loads: a user's folder is never touched
            check_output_dir(out, self.protected_inputs())
        self.device = self._device()
        self.splits = self._read_data()  # bad data fails here, before any model loads or any file is written
        with run_lock(out) if main else nullcontext():
            data_id = data_identity(self.splits)
            progress = RunProgress.open(out, recipe_hash(self.recipe, self.model_ref, data_id), restart=self.restart,
                                        main=main, recipe_yaml=self.recipe.to_yaml(), data_id=data_id)
            if progress.finished:
                self.reused_finished_run = True
                self.log(f"{out}: this recipe already finished there; nothing to do (--restart runs it again)")
                return Report.load(out)
            try:
                return self._run(progress)
            except BaseException as exc:
                if main:
                    progress.stopped(exc)
                raise

    def _device(self) -> torch.device:
        try:
            return distributed.pick_device(self.recipe.device)
        except (RuntimeError, ValueError) as exc:
            raise RecipeError(f"{self.recipe.source}: device: {self.recipe.device!r} cannot be used here "
                              f"({str(exc).splitlines()[0][:160]})") from None

    def _read_data(self) -> dict[str, list]:
        """The evaluation split, and the training split if a pass reads it: read (and checked) once, up front."""
        return recipe_splits(self.recipe)

    def _run(self, progress: "RunProgress") -> Report:
        recipe = self.recipe
        out = self.output_dir
        main = distributed.is_main_process()
        device = self.device
        task = get_task(recipe.task)
        torch.manual_seed(recipe.seed)  # the same new head as an uninterrupted run, whenever the source is loaded
        ref = self.model_ref
        report = Report(name=recipe.name, model=recipe.model, task=task.name, environment=_environment(device),
                        status="running", recipe_hash=progress.recipe_hash)
        report.steps = [StepRecord.from_dict(s) for s in progress.steps]
        loading_notes: list[str] = []
        if progress.model_state is not None:
            self.log(f"resuming {out} after step {len(report.steps) - 1} ({report.steps[-1].pass_name})")
            model, tokenizer, arch = None, None, None
        else:
            self.log(f"loading {recipe.model} for {task.name} on {device}")
            model, tokenizer, arch = load_model_and_tokenizer(ref, task, device, notes=loading_notes,
                                                              trust_pickle=recipe.trust_pickle)
        state = PipelineState(recipe=recipe, task=task, arch=arch, model=model, tokenizer=tokenizer, device=device,
                              work_dir=out, quiet=self.quiet)
        state.preload_splits(self.splits)
        if progress.model_state is not None:
            state.restore(out / progress.model_state)
        _check_sequence_lengths(recipe, state)
        if report.steps:
            report.resumed_from = len(report.steps)
        state.step_index = len(report.steps) - 1 if report.steps else 0
        progress.clear_unfinished()

        settings = state.eval_settings()
        if not report.steps:
            details = {"eval_settings": dataclasses.asdict(settings), **({"notes": loading_notes} if loading_notes else {})}
            report.steps.append(_step(state, "baseline", _measure(state, settings, "baseline"), 0.0, details, settings))
            self._log_step(report.steps[-1])
            progress.commit(state, report, model_changed=False, last_eval_settings=settings)
            self._committed(progress, out)
        last_settings = progress.last_eval_settings(settings)
        model_changed = progress.model_changed_since_eval

        for planned in recipe.plan[len(report.steps) - 1:]:
            state.step_index = len(report.steps)
            p: Pass = planned.cls(planned.config)
            self.log(f"[{state.step_index}/{len(recipe.plan)}] {planned.name}")
            torch.manual_seed(recipe.seed + state.step_index)  # a resumed pass draws what an uninterrupted one drew
            pass_folder = f"passes/{state.step_index:02d}_{planned.name}"
            progress.begin(pass_folder)  # deleted as recorded if killed
            state.step_checkpoints = RunStepCheckpoints(progress, pass_folder)  # training resumes inside the pass
            t0 = time.perf_counter()
            details = p.run(state) or {}
            seconds = time.perf_counter() - t0
            model_changed = model_changed or planned.cls.changes_model
            step_settings = p.eval_settings(settings)
            if not model_changed and step_settings == last_settings:
                step = _reused_step(report.steps[-1], state, planned.name, seconds, details)
            else:
                step = _step(state, planned.name, _measure(state, step_settings, planned.name), seconds, details,
                             step_settings)
                last_settings, model_changed = step_settings, False
            report.steps.append(step)
            self._log_step(step)
            for warning in details.get("warnings", []):
                self.warn(f"warning: step {step.index} {planned.name}: {warning}")
            progress.commit(state, report, model_changed=planned.cls.changes_model, last_eval_settings=last_settings,
                            model_changed_since_eval=model_changed)
            self._committed(progress, out)

        if main:
            self._save(state, report, out, progress)
            progress.finish(report)
            usual_permissions(out)
        distributed.barrier()
        self.final_state = state
        return report

    def _committed(self, progress: RunProgress, out: Path) -> None:
        if progress.main:
            usual_permissions(out)
        if self.on_commit is not None and progress.main:
            self.on_commit(len(progress.steps) - 1, out, progress.data)

    def _save(self, state: PipelineState, report: Report, out: Path, progress: RunProgress) -> None:
        model_dir, partial = out / "model", out / "model.partial"
        if model_dir.exists() or model_dir.is_symlink():
            raise RunFolderError(f"{model_dir}: exists, but this run did not write it; move it out and run again")
        progress.begin("model.partial", "model")  # a kill during the save leaves them to be deleted on resume
        try:
            manifest = save_model(state.model, partial, merge_adapters=True, tokenizer=state.tokenizer)
        except Exception as exc:  # noqa: BLE001  a full disk surfaces as OSError or as a library's own error
            storage = _storage_error(exc)
            if storage is None:
                raise
            remove_own_folder(out, "model.partial")
            raise storage from None
        partial.rename(model_dir)
        final = report.steps[-1].to_dict()
        final["saved_model_bytes"] = directory_bytes(model_dir)
        final["saved_model_format"] = manifest["format"]
        if state.onnx is not None:
            final["onnx"] = {"folder": os.path.relpath(state.onnx.folder, out), "files": state.onnx.files,
                             "bytes": directory_bytes(Path(state.onnx.folder)), "quantized": state.onnx.quantized,
                             "density_outputs": state.onnx.density_outputs}
        final["model_dir"] = str(self.output_dir / "model")
        outcome = budget_outcome(report.steps, state.task)
        if outcome is not None:
            final["budget_outcome"] = outcome
        report.final = final
        if outcome is not None and not outcome["within_budget"]:
            self.warn(f"warning: {report.budget_outcome_line()}")
        passes, recipe_yaml = self.recipe.passes_label(), self.recipe.to_yaml()
        report.final["deploy"] = write_deploy_folder(out, report, state.onnx, progress.begin, passes, recipe_yaml,
                                                     model_changed=any(p.cls.changes_model for p in self.recipe.plan))
        report.status = "finished"
        report.write(out)
        write_model_card(model_dir, report, manifest, passes, recipe_yaml, step=last_pytorch_step(report.steps))
        plot_density(report, out / "density.png")

    def _log_step(self, step: StepRecord) -> None:
        d = step.density
        dens = d.get("encoder") if d.get("encoder") is not None else d.get("decoder")
        dens_text = f"{dens:.4f}" if dens is not None else "-"
        self.log(f"  step {step.index} {step.pass_name}: {step.task_metric}={step.task_score:.4f} density={dens_text} "
                 f"({step.eval_examples} ex, {step.latency_ms_per_example:.2f} ms/ex)")


def _check_sequence_lengths(recipe: Recipe, state: PipelineState) -> None:
    """A length past the model's learned positions fails deep inside the first long batch; say so up front."""
    from deftcompress.architecture import model_config

    limit = state.arch.max_input_tokens(model_config(state.model))
    if limit is None:
        return
    asked = [(recipe.source + ": max_seq_length", recipe.max_seq_length)]
    asked += [(p.where + ".max_seq_length", getattr(p.config, "max_seq_length", None)) for p in recipe.plan]
    for where, value in asked:
        if isinstance(value, int) and value > limit:
            raise RecipeError(f"{where}: {value} is past the {limit} positions of this {state.arch.family} model; "
                              f"use at most {limit}")


def _storage_error(exc: BaseException) -> DeftcompressError | None:
    """A one-line error for a save that the machine could not complete (disk full, quota, read-only), else None."""
    import errno

    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        why = exc.strerror or text
    elif "No space left" in text or "os error 28" in text or "Disk quota" in text:
        why = "no space left on the device"
    else:
        return None
    return DeftcompressError(f"saving the final model failed: {why}; the run's finished passes are kept: free some "
                             "space and run the same command again to resume")


def _reused_step(previous: StepRecord, state: PipelineState, name: str, seconds: float, details: dict) -> StepRecord:
    """The previous step's measurement for a pass that left the model as it was (same evaluation settings)."""
    details["evaluation"] = "reused the previous step's measurement (model unchanged)"
    record = StepRecord.from_dict(previous.to_dict())
    record.index, record.pass_name, record.seconds, record.details = state.step_index, name, seconds, details
    return record


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "world_size": distributed.world_size()}


def run_recipe(recipe: Recipe | str | os.PathLike, output_dir: str | os.PathLike | None = None, quiet: bool = False,
               restart: bool = False) -> Report:
    """Python API: run a recipe (object or YAML path) and return its report (resuming an unfinished run)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_file(recipe)
    return Pipeline(recipe, output_dir=output_dir, quiet=quiet, restart=restart).run()
