"""Locating a family's parts in a concrete model: its MLP blocks and attention blocks.

`mlp_blocks(model)` and `attention_blocks(model)` read the model's record in the architecture table
(`spec.py`) and return the modules of every layer, encoder stack first, in layer order. They work
through peft and adapters wrappers (module names then carry the wrapper's prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from deftcompress.architecture.spec import ArchSpec, AttentionSpec, Paths, StackSpec, spec_for_model_type
from deftcompress.errors import ArchitectureError

if TYPE_CHECKING:
    from torch import nn


def model_config(model: nn.Module):
    """The transformers config of a plain, peft-wrapped or adapters-wrapped model."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    if config is None:
        raise ArchitectureError(f"{type(model).__name__} has no transformers config; cannot tell its family")
    return config


def spec_for(model: nn.Module) -> ArchSpec:
    return spec_for_model_type(model_config(model).model_type)


def resolve(layer: nn.Module, paths: Paths) -> tuple[str, nn.Module] | None:
    """First of `paths` present under `layer`, as (relative name, module)."""
    for path in paths:
        try:
            return path, layer.get_submodule(path)
        except AttributeError:
            continue
    return None


@dataclass
class MLPBlock:
    """One MLP of one layer, located in a concrete model."""

    stack: str
    index: int
    layer_name: str  # full module name of the transformer layer
    layer: nn.Module
    block: nn.Module
    act: nn.Module
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None = None
    names: dict[str, str] = field(default_factory=dict)  # role -> full module name

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.index}"


@dataclass
class AttentionBlock:
    stack: str
    index: int
    layer_name: str
    spec: AttentionSpec
    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    names: dict[str, str] = field(default_factory=dict)
    cross: bool = False


def _layers(model: nn.Module, stack: StackSpec) -> Iterator[tuple[int, str, nn.Module]]:
    pattern = re.compile(stack.layers)
    found = []
    for name, module in model.named_modules():
        m = pattern.fullmatch(name)
        if m:
            found.append((int(m.group(1)), name, module))
    found.sort(key=lambda t: t[0])
    return iter(found)


def _need(layer_name: str, layer: nn.Module, paths: Paths, role: str) -> tuple[str, nn.Module]:
    hit = resolve(layer, paths)
    if hit is None:
        raise ArchitectureError(f"{layer_name}: no {role} module at {' or '.join(paths)}; check the architecture table")
    return hit


SKIPPED_MARK = "deftcompress_skipped_mlp"  # class attribute of the modules that replace a skipped MLP


def _skipped(layer: nn.Module, stack: StackSpec) -> bool:
    hit = resolve(layer, stack.mlp.block)
    return hit is not None and getattr(hit[1], SKIPPED_MARK, False)


def skipped_mlp_labels(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Labels (`stack.index`) of the layers whose MLP block was skipped (removed) by ADA-DEFT."""
    spec = spec or spec_for(model)
    return [f"{stack.name}.{index}" for stack in spec.stacks for index, _, layer in _layers(model, stack)
            if _skipped(layer, stack)]


def mlp_blocks(model: nn.Module, spec: ArchSpec | None = None) -> list[MLPBlock]:
    """Every MLP block of the model, encoder stack first, in layer order (skipped blocks have none)."""
    spec = spec or spec_for(model)
    blocks = []
    for stack in spec.stacks:
        for index, layer_name, layer in _layers(model, stack):
            if _skipped(layer, stack):
                continue
            roles = {}
            for role in ("block", "act", "up", "down"):
                roles[role] = _need(layer_name, layer, getattr(stack.mlp, role), f"MLP {role}")
            gate = resolve(layer, stack.mlp.gate) if stack.mlp.gate else None
            names = {r: f"{layer_name}.{p}" for r, (p, _) in roles.items()}
            if gate:
                names["gate"] = f"{layer_name}.{gate[0]}"
            blocks.append(
                MLPBlock(
                    stack=stack.name, index=index, layer_name=layer_name, layer=layer,
                    block=roles["block"][1], act=roles["act"][1], up=roles["up"][1], down=roles["down"][1],
                    gate=gate[1] if gate else None, names=names,
                )
            )
    if not blocks and not skipped_mlp_labels(model, spec):
        raise ArchitectureError(f"found no {spec.family} layers in {type(model).__name__}; check the layer patterns in the architecture table")
    return blocks


def attention_blocks(model: nn.Module, spec: ArchSpec | None = None, include_cross: bool = True,
                     prunable_only: bool = False) -> list[AttentionBlock]:
    """Every attention block (self, then cross), encoder stack first; `prunable_only` drops those the record keeps whole."""
    spec = spec or spec_for(model)
    out = []
    for stack in spec.stacks:
        attns = [(stack.attention, False)] + ([(stack.cross_attention, True)] if include_cross and stack.cross_attention else [])
        attns = [(a, cross) for a, cross in attns if a.heads_prunable or not prunable_only]
        for index, layer_name, layer in _layers(model, stack):
            for aspec, cross in attns:
                parts = {r: _need(layer_name, layer, getattr(aspec, r), f"attention {r}") for r in ("module", "q", "k", "v", "o")}
                out.append(
                    AttentionBlock(
                        stack=stack.name, index=index, layer_name=layer_name, spec=aspec, cross=cross,
                        names={r: f"{layer_name}.{p}" for r, (p, _) in parts.items()},
                        **{r: m for r, (_, m) in parts.items()},
                    )
                )
    return out
