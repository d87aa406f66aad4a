"""The run report and its pictures.

- `report`: `Report` and `StepRecord`, report.json / report.md (torch-free);
- `plots`: per-layer density of every step (matplotlib).
"""
