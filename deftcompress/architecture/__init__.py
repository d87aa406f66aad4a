"""The architecture table: one record per model family, and locating its parts in a model.

- `spec`: the record types (`ArchSpec`, `StackSpec`, `MLPSpec`, `AttentionSpec`) and the lookup by
  `model_type` (torch-free);
- `families/`: one module per family (BERT and RoBERTa, T5, Llama-style decoders);
- `locate`: finding the MLP and attention blocks of a concrete model through its record;
- `layout`: per-layer widths of structurally pruned models and skipped MLP blocks (the saved layout);
- `skip`: removing whole MLP blocks (ADA-DEFT) with the modules the family record names.
"""

from deftcompress.architecture.locate import (AttentionBlock, MLPBlock, attention_blocks, mlp_blocks, model_config,
                                              resolve, skipped_mlp_labels, spec_for)
from deftcompress.architecture.spec import (ArchSpec, AttentionSpec, MLPSpec, SkipStep, StackSpec, all_families,
                                            spec_for_model_type, kept_module_names)

__all__ = ["ArchSpec", "AttentionSpec", "MLPSpec", "SkipStep", "StackSpec", "skipped_mlp_labels", "MLPBlock", "AttentionBlock", "all_families",
           "spec_for_model_type", "spec_for", "model_config", "mlp_blocks", "attention_blocks", "resolve",
           "kept_module_names"]
