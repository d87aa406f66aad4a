"""Tasks and their data: GLUE and SQuAD specs, loading (local files or the hub), metrics, features.

- `tasks`: `TaskSpec`, the task table and example loading (torch-free);
- `own_data`: tasks given by data (CSV / TSV / JSON / JSON Lines / Parquet or a hub dataset, a column mapping);
- `hub`: failing fast, in one line, when data must come from an unreachable hub;
- `metrics`: accuracy, F1, Matthews, Pearson, SQuAD EM/F1 (torch-free);
- `text_to_text`: how a task is phrased for text-to-text models (T5) and read back;
- `features`: the one tokenise / pad path shared by training and evaluation.
"""
