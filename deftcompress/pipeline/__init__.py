"""Running a recipe: the state passes share, the runner, the run folder.

- `recipe`: reading and validating a recipe (YAML or `Recipe.build`; torch-free: `validate` uses it);
- `state`: `PipelineState`, what every pass sees and changes (core's `PassState`);
- `runner`: `Pipeline` and `run_recipe` (baseline, one measured step per pass, report, save);
- `run_folder`: output folders that are recognisably ours, and the lock against concurrent runs;
- `compare_runs`: `deftcompress compare` (run, reuse or resume recipes; shared leading passes of a sweep);
- `timing`: the final models of several runs timed side by side.
"""
