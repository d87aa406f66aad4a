"""No finished pass is lost: a run killed (SIGKILL, SIGTERM) or failing mid-pass resumes to the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

# A CLI process with one extra pass that kills its own process the first time it runs at step KILL_AT.
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from deftcompress.core.protocol import Pass
    from deftcompress.core.registry import register_pass
    from deftcompress.cli import main

    @register_pass
    class Killer(Pass):
        name = "test_killer"
        changes_model = False

        def run(self, state):
            flag = os.environ.get("KILL_FLAG")
            if flag and str(state.step_index) == os.environ.get("KILL_AT") and not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
                time.sleep(60)
            return {}

    kill_step = os.environ.get("KILL_TRAIN_STEP")  # or: kill it inside training, after this optimizer step
    if kill_step and not os.path.exists(os.environ["KILL_FLAG"]):
        import deftcompress.training.loop as loop
        original, count = loop._optimizer_step, []

        def step_then_maybe_die(run):
            original(run)
            count.append(1)
            if len(count) == int(kill_step):
                open(os.environ["KILL_FLAG"], "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)

        loop._optimizer_step = step_then_maybe_die

    main(sys.argv[1:])
""")

MEASURED = ("pass", "task_score", "metrics", "density", "params", "nonzero_params", "size_bytes", "eval_examples")


def _recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "resume", "model": str(model), "task": "glue/sst2", "data_dir": str(data), "seed": 7,
        "max_eval_samples": 8, "eval_batch_size": 8,
        "passes": [{"magnitude_prune": {"sparsity": 0.3}}, "test_killer",
                   {"deft": {"method": "lora", "max_steps": 3, "batch_size": 8, "max_train_samples": 24,
                             "learning_rate": 0.02, "lora_dropout": 0.1}},
                   "test_killer", {"evaluate": {"density_mode": "paper"}}],
    }))
    return path


def _apply(tmp_path: Path, recipe: Path, out: Path, **env) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # A shell's background job runs with SIGINT ignored, and children inherit that: give the child the default
    # action back, as a terminal gives a foreground command, so Ctrl-C reaches it however pytest was launched.
    return subprocess.run([sys.executable, str(driver), "apply", str(recipe), "-o", str(out), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))


def _measured(out: Path) -> list[dict]:
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    return [{k: step[k] for k in MEASURED} for step in report["steps"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    recipe = _recipe(tmp, tiny_checkpoint("bert"), tiny_data)
    runs = []
    for name in ("a", "b"):
        proc = _apply(tmp, recipe, tmp / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(_measured(tmp / name))
    return runs


def test_same_recipe_and_seed_give_identical_numbers(uninterrupted):
    first, second = uninterrupted
    assert first == second
    assert [s["pass"] for s in first] == ["baseline", "magnitude_prune", "test_killer", "deft", "test_killer", "evaluate"]


@pytest.mark.parametrize("kill_at", [2, 4])  # before DEFT (state: pruned model + mask) and after it (LoRA adapter + mask)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_numbers(tiny_checkpoint, tiny_data, tmp_path, uninterrupted, kill_at):
    recipe = _recipe(tmp_path, tiny_checkpoint("bert"), tiny_data)
    out = tmp_path / "out"
    env = {"KILL_FLAG": str(tmp_path / "killed"), "KILL_AT": str(kill_at)}
    killed = _apply(tmp_path, recipe, out, **env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["steps"]) == kill_at  # baseline .. the step before the killed one
    resumed = _apply(tmp_path, recipe, out, **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {kill_at}" in resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == kill_at
    assert _measured(out) == uninterrupted[0]
    assert not (out / "state").exists() and sorted(p.name for p in out.parent.iterdir()) == ["driver.py", "killed", "out", "r.yaml"]


@pytest.mark.parametrize("signal_name, code, said", [("SIGTERM", 143, "SIGTERM"), ("SIGINT", 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_stop_with_one_line_keep_finished_passes_and_resume(tiny_checkpoint, tiny_data, tmp_path,
                                                                             uninterrupted, signal_name, code, said):
    recipe = _recipe(tmp_path, tiny_checkpoint("bert"), tiny_data)
    out = tmp_path / "out"
    env = {"KILL_FLAG": str(tmp_path / "killed"), "KILL_AT": "4", "KILL_SIGNAL": signal_name}
    stopped = _apply(tmp_path, recipe, out, **env)
    assert stopped.returncode == code
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({said})") and "resume" in last and "Traceback" not in stopped.stderr
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    assert _apply(tmp_path, recipe, out, **env).returncode == 0
    assert _measured(out) == uninterrupted[0]


def test_an_error_in_a_pass_keeps_the_earlier_passes(tiny_checkpoint, tiny_data, tmp_path, fails_once):
    """The pass after a finished one fails: the finished one is not redone when the run resumes."""
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.pipeline.runner import run_recipe

    recipe = Recipe.build(name="r", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"magnitude_prune": {"sparsity": 0.2}}, "test_fails_once"])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(recipe, output_dir=out, quiet=True)
    failed = json.loads((out / "report.json").read_text())
    assert failed["status"] == "failed" and "boom" in failed["error"]
    assert [s["pass"] for s in failed["steps"]] == ["baseline", "magnitude_prune"]
    from deftcompress.reporting.report import Report

    assert Report.load(out).text_table().startswith("status: failed (RuntimeError: boom)")  # what `report` prints
    report = run_recipe(recipe, output_dir=out, quiet=True)
    assert report.resumed_from == 2 and report.status == "finished" and fails_once == [2, 2]
    assert report.steps[1].details["sparsity_achieved"] == pytest.approx(0.2, abs=1e-4)


def test_another_recipe_is_refused_unless_restart(tiny_checkpoint, tiny_data, tmp_path):
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.pipeline.run_folder import RunFolderError
    from deftcompress.pipeline.runner import run_recipe

    build = lambda sparsity: Recipe.build(name="r", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),  # noqa: E731
                                          max_eval_samples=8, passes=[{"magnitude_prune": {"sparsity": sparsity}}])
    out = tmp_path / "out"
    run_recipe(build(0.2), output_dir=out, quiet=True)
    before = (out / "report.json").read_text()
    with pytest.raises(RunFolderError, match="another recipe.*--restart"):
        run_recipe(build(0.4), output_dir=out, quiet=True)
    assert (out / "report.json").read_text() == before
    report = run_recipe(build(0.4), output_dir=out, quiet=True, restart=True)
    assert report.steps[1].details["sparsity_achieved"] == pytest.approx(0.4, abs=1e-4)


def test_a_run_killed_inside_training_resumes_from_its_step_checkpoint_to_the_same_bytes(tiny_checkpoint, tiny_data,
                                                                                        tmp_path):
    """ADA-DEFT with dropout, a density target and a gate decision at step 4: killed after step 5 (checkpoint at 4)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "steps", "model": str(tiny_checkpoint("bert")), "task": "glue/sst2", "data_dir": str(tiny_data),
        "seed": 7, "max_eval_samples": 8, "eval_batch_size": 8,
        "passes": [{"ada_deft": {"method": "lora", "max_steps": 6, "batch_size": 8, "max_train_samples": 32,
                                 "learning_rate": 0.02, "lora_dropout": 0.1, "skip_blocks": 1, "save_steps": 2,
                                 "merge": True}}]}))
    whole = _apply(tmp_path, recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "out"
    env = {"KILL_FLAG": str(tmp_path / "killed"), "KILL_TRAIN_STEP": "5"}
    killed = _apply(tmp_path, recipe, out, **env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step_checkpoint"] == {"pass": "passes/01_ada_deft", "step": 4, "folder": "state/training_step_000004"}
    assert any(f.startswith("state/training_step_000004/") for f in progress["files"])  # recorded with its sha256
    resumed = _apply(tmp_path, recipe, out, **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert "resumed inside the pass from its step checkpoint after step 4" in report["steps"][1]["details"]["notes"]
    assert _measured(out) == _measured(tmp_path / "whole")
    assert (out / "model" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
    assert not (out / "state").exists()  # the checkpoint went with the pass it belonged to


def test_a_changed_step_checkpoint_is_refused_not_loaded(tiny_checkpoint, tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "steps", "model": str(tiny_checkpoint("bert")), "task": "glue/sst2", "data_dir": str(tiny_data),
        "seed": 7, "max_eval_samples": 8,
        "passes": [{"deft": {"method": "lora", "max_steps": 4, "batch_size": 8, "max_train_samples": 32,
                             "save_steps": 2, "merge": True}}]}))
    out = tmp_path / "out"
    env = {"KILL_FLAG": str(tmp_path / "killed"), "KILL_TRAIN_STEP": "3"}
    assert _apply(tmp_path, recipe, out, **env).returncode == -9
    meta = out / "state" / "training_step_000002" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 2', '"step": 3'))
    again = _apply(tmp_path, recipe, out, **env)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "state/training_step_000002/meta.json" in again.stderr and "--restart" in again.stderr
