"""Running a recipe: the state passes share, the runner, the run folder.

- `state`: `PipelineState`, what every pass sees and changes;
- `runner`: `Pipeline` and `run_recipe` (baseline, one measured step per pass, report, save);
- `run_folder`: output folders that are recognisably ours, and the lock against concurrent runs.
"""
