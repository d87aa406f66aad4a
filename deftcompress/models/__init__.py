"""Checkpoints in and out: loading a model for a task, and saving any state a pass leaves.

- `loading`: `load_model_and_tokenizer` (safetensors only, no remote code), restructured checkpoints;
- `formats`: the save/load dispatcher, one named format per kind of model (plain, pruned layout,
  torch int8, bitsandbytes, base + adapter), the format name recorded on disk.
"""
