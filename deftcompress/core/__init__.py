"""The torch-free core: the vocabulary of passes and how they plug in.

- `config`: typed option dataclasses checked field by field (`option`, `parse_config`);
- `sweep`: a recipe's `sweep:` grid, expanded into one recipe (as data) per point;
- `protocol`: the `Pass` and `Constraint` base classes, the `PassState` a pass sees, and the capabilities a pass declares;
- `registry`: `@register_pass` and the lookup of passes (built-in and entry points);
- `plan`: validating a list of passes, including the capability check between them;
- `selectors`: choosing modules by class name or ``re:<regex>``;
- `model_refs`: what a recipe's `model:` names (alias, local folder, hub id).

Nothing here imports torch, transformers or peft: `deftcompress validate`, `passes` and `report`
answer without them.
"""
