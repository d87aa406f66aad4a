"""Removing whole transformer layers (depth pruning), so the saved model is the family's stock model with fewer layers.

The layers of a stack sit in one `nn.ModuleList`; removing some means a shorter list and the family's
layer-count field (`ArchSpec.layer_count_attr`, e.g. `num_hidden_layers`) set to the new count, so
`save_pretrained` writes a config that stock `from_pretrained` builds with exactly these layers. The
layers after a removed one are renumbered (their weights move from `layer.4` to `layer.2`), and so is
everything that names a layer by its position: a layer's own `layer_idx` (decoders index their key/value
cache with it), per-layer config lists (`layer_types`), and the `deftcompress_layout` record of earlier
structured pruning or skipped MLP blocks.
"""

from __future__ import annotations

from torch import nn

from deftcompress.architecture.layout import LAYOUT_ATTR
from deftcompress.architecture.locate import _layers, model_config
from deftcompress.architecture.spec import ArchSpec
from deftcompress.errors import ArchitectureError


def layer_labels(model: nn.Module, arch: ArchSpec) -> list[str]:
    """`stack.index` of every transformer layer, encoder stack first, in layer order."""
    return [f"{stack.name}.{index}" for stack in arch.stacks for index, _, _ in _layers(model, stack)]


def layer_modules(model: nn.Module, arch: ArchSpec) -> dict[str, nn.Module]:
    """`stack.index` -> the layer module."""
    return {f"{stack.name}.{index}": module for stack in arch.stacks for index, _, module in _layers(model, stack)}


def remove_layers(model: nn.Module, arch: ArchSpec, labels: list[str]) -> dict[str, str]:
    """Remove the layers `labels` (`stack.index`) in place; returns old label -> new label of the layers kept."""
    if arch.layer_count_attr is None:
        raise ArchitectureError(f"{arch.family} layers cannot be removed: {arch.fixed_depth_because or 'no layer-count field'}")
    present = layer_labels(model, arch)
    unknown = sorted(set(labels) - set(present))
    if unknown:
        raise ArchitectureError(f"cannot remove layers {unknown}: the model has {present[0]} to {present[-1]}")
    config = model_config(model)
    renamed: dict[str, str] = {}
    for stack in arch.stacks:
        found = list(_layers(model, stack))
        if not found:
            continue
        parent_name = found[0][1].rsplit(".", 1)[0]
        container = model.get_submodule(parent_name)
        if not isinstance(container, nn.ModuleList) or len(container) != len(found):
            raise ArchitectureError(f"{parent_name}: the {stack.name} layers are not one ModuleList; check the architecture table")
        kept = [(index, module) for index, _, module in found if f"{stack.name}.{index}" not in labels]
        if not kept:
            raise ArchitectureError(f"cannot remove every {stack.name} layer ({len(found)})")
        if len(kept) == len(found):
            continue
        owner_name, _, attr = parent_name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, attr, nn.ModuleList([module for _, module in kept]))
        for new_index, (old_index, module) in enumerate(kept):
            renamed[f"{stack.name}.{old_index}"] = f"{stack.name}.{new_index}"
            for sub in module.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = new_index  # decoders address their key/value cache by it
        kept_old = {old for old, _ in kept}
        setattr(config, arch.layer_count_attr, len(kept))
        per_layer = getattr(config, "layer_types", None)
        if isinstance(per_layer, list) and len(per_layer) == len(found):
            config.layer_types = [t for i, t in enumerate(per_layer) if i in kept_old]
    _renumber_layout(config, renamed, set(labels))
    return renamed


def _renumber_layout(config, renamed: dict[str, str], removed: set[str]) -> None:
    """Keys of the layout record follow their layer to its new position; removed layers drop out."""
    layout = getattr(config, LAYOUT_ATTR, None)
    if not isinstance(layout, dict):
        return

    def new_key(key: str) -> str | None:
        label = ".".join(key.split(".")[:2])  # `stack.index`, then an optional `.cross`
        suffix = key[len(label):]
        if label in removed:
            return None
        return renamed.get(label, label) + suffix

    for part in ("mlp", "attention"):
        if isinstance(layout.get(part), dict):
            layout[part] = {new: v for k, v in layout[part].items() if (new := new_key(k)) is not None}
    if isinstance(layout.get("skipped"), list):
        layout["skipped"] = [new for k in layout["skipped"] if (new := new_key(k)) is not None]
        if not layout["skipped"]:
            del layout["skipped"]
