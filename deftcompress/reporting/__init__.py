"""The run report and its pictures.

- `report`: `Report` and `StepRecord`, report.json / report.md (torch-free);
- `compare_tables`: rows of finished runs, Pareto fronts, compare.{json,md,csv,png} (torch-free);
- `plots`: per-layer density of every step, encoder and decoder panels (matplotlib).
"""
