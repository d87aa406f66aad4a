"""Per-layer widths of structurally pruned models: shrinking layers, checking them, and the saved layout.

Structured pruning leaves layers of different widths (MLP neurons, attention heads) that a stock
transformers config cannot describe. The layout is therefore stored as an extra attribute of the
model's config, so every `save_pretrained` writes it into `config.json` whatever pass saves the
model::

    "deftcompress_layout": {
      "format": 1,
      "mlp": {"encoder.0": {"kept": 1072, "of": 1536}, ...},
      "attention": {"encoder.0": {"heads": [0, 2, 3, ...], "kv_heads": [0, 2, 3, ...], "of": 12}, ...},
      "skipped": ["encoder.3"]
    }

Keys are architecture-table block labels (`stack.layer`); `heads` / `kv_heads` are the kept query /
key-value heads in the original numbering; `skipped` (optional) lists MLP blocks removed whole by ADA-DEFT
(`deftcompress.architecture.skip`), which have no `mlp` entry. Loading (`deftcompress.models.loading.load_model_and_tokenizer`)
builds the model from the stock config, shrinks it with `apply_layout` and then loads the
safetensors weights. Stock `from_pretrained` refuses such a folder (shape mismatch), by design.

Only whole heads are removed, never head dimensions, so head size and any cached attention
`scaling` stay valid; `check_structure` verifies that every attribute the attention reads (head
count, all-head size, kv groups, T5's `pruned_heads`) agrees with the weight shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deftcompress.architecture import (ArchSpec, AttentionBlock, MLPBlock, attention_blocks, mlp_blocks, model_config,
                                       skipped_mlp_labels)
from deftcompress.errors import ArchitectureError

LAYOUT_ATTR = "deftcompress_layout"
LAYOUT_FORMAT = 1


def block_key(block: MLPBlock | AttentionBlock) -> str:
    return f"{block.stack}.{block.index}" + (".cross" if getattr(block, "cross", False) else "")


@dataclass(frozen=True)
class HeadGeometry:
    head_dim: int
    q_heads: int
    kv_heads: int

    @property
    def group(self) -> int:  # query heads per key/value head (1 without grouped-query attention)
        return self.q_heads // self.kv_heads


def head_geometry(block: AttentionBlock) -> HeadGeometry:
    head_dim = int(getattr(block.module, block.spec.head_dim_attr))
    return HeadGeometry(head_dim, block.q.out_features // head_dim, block.k.out_features // head_dim)


# ---- slicing ---------------------------------------------------------------------------------

def slice_linear_(linear: nn.Linear, keep: list[int] | torch.Tensor, dim: int) -> None:
    """Keep only rows (dim 0: outputs) or columns (dim 1: inputs) `keep` of `linear`, in place."""
    index = torch.as_tensor(keep, dtype=torch.long, device=linear.weight.device)
    weight = linear.weight
    linear.weight = nn.Parameter(weight.data.index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def shrink_mlp(block: MLPBlock, keep: list[int]) -> None:
    """Keep MLP neurons `keep`: rows of the up (and gate) projection, columns of the down projection."""
    slice_linear_(block.up, keep, 0)
    if block.gate is not None:
        slice_linear_(block.gate, keep, 0)
    slice_linear_(block.down, keep, 1)


def shrink_attention(block: AttentionBlock, keep_kv: list[int], original_heads: list[int], original_count: int) -> list[int]:
    """Keep key/value heads `keep_kv` (current numbering) and their query heads; returns the kept original query heads.

    `original_heads[i]` is the original number of current query head i. Attributes the module reads
    are updated from the new shapes; head size (and so `scaling`) does not change.
    """
    geo = head_geometry(block)
    keep_kv = sorted(keep_kv)
    keep_q = [g * geo.group + j for g in keep_kv for j in range(geo.group)]
    rows_q = [h * geo.head_dim + d for h in keep_q for d in range(geo.head_dim)]
    rows_kv = [h * geo.head_dim + d for h in keep_kv for d in range(geo.head_dim)]
    slice_linear_(block.q, rows_q, 0)
    slice_linear_(block.k, rows_kv, 0)
    slice_linear_(block.v, rows_kv, 0)
    slice_linear_(block.o, rows_q, 1)
    kept_original = [original_heads[h] for h in keep_q]
    spec, module = block.spec, block.module
    if spec.num_heads_attr:
        setattr(module, spec.num_heads_attr, len(keep_q))
    if spec.all_head_size_attr:
        setattr(module, spec.all_head_size_attr, len(keep_q) * geo.head_dim)
    if spec.pruned_heads_attr:
        setattr(module, spec.pruned_heads_attr, set(range(original_count)) - set(kept_original))
    return kept_original


# ---- checks ----------------------------------------------------------------------------------

def check_structure(model: nn.Module, arch: ArchSpec | None = None) -> None:
    """Raise ArchitectureError if any MLP or attention attribute disagrees with the weight shapes."""
    problems = []
    for block in mlp_blocks(model, arch):
        width = block.up.out_features
        if block.down.in_features != width or block.down.weight.shape[1] != width or block.up.weight.shape[0] != width:
            problems.append(f"{block.names['up']}: {width} neurons but {block.names['down']} takes {block.down.weight.shape[1]}")
        if block.gate is not None and block.gate.weight.shape[0] != width:
            problems.append(f"{block.names['gate']}: {block.gate.weight.shape[0]} rows, expected {width}")
    for block in attention_blocks(model, arch):
        name, spec, module = block.names["module"], block.spec, block.module
        geo = head_geometry(block)
        q_out = block.q.weight.shape[0]
        if q_out % geo.head_dim or block.k.weight.shape[0] % geo.head_dim:
            problems.append(f"{name}: projection widths are not multiples of the head size {geo.head_dim}")
            continue
        if block.v.weight.shape[0] != block.k.weight.shape[0] or geo.q_heads % geo.kv_heads:
            problems.append(f"{name}: {geo.q_heads} query heads do not fit {geo.kv_heads} key/value heads")
        if block.o.weight.shape[1] != q_out:
            problems.append(f"{name}: output projection takes {block.o.weight.shape[1]}, heads give {q_out}")
        if spec.num_heads_attr and getattr(module, spec.num_heads_attr) != geo.q_heads:
            problems.append(f"{name}.{spec.num_heads_attr} = {getattr(module, spec.num_heads_attr)}, weights hold {geo.q_heads} heads")
        if spec.all_head_size_attr and getattr(module, spec.all_head_size_attr) != q_out:
            problems.append(f"{name}.{spec.all_head_size_attr} = {getattr(module, spec.all_head_size_attr)}, weights give {q_out}")
        if spec.kv_groups_attr and getattr(module, spec.kv_groups_attr) != geo.group:
            problems.append(f"{name}.{spec.kv_groups_attr} = {getattr(module, spec.kv_groups_attr)}, weights give {geo.group}")
        if spec.scaling_attr and abs(float(getattr(module, spec.scaling_attr)) * geo.head_dim ** 0.5 - 1.0) > 1e-3:
            # whole heads are removed, so a standard 1/sqrt(head_dim) scaling must still hold
            problems.append(f"{name}.{spec.scaling_attr} is not 1/sqrt({geo.head_dim})")
        if spec.pruned_heads_attr:
            pruned = getattr(module, spec.pruned_heads_attr)
            entry = (layout_of(model) or {}).get("attention", {}).get(block_key(block))
            total = entry["of"] if entry else geo.q_heads
            if total - len(pruned) != geo.q_heads:
                problems.append(f"{name}.{spec.pruned_heads_attr} removes {len(pruned)} of {total} heads, weights hold {geo.q_heads}")
    if problems:
        raise ArchitectureError("inconsistent pruned model: " + "; ".join(problems[:5]))


# ---- the layout ------------------------------------------------------------------------------

def layout_of(model_or_config: Any) -> dict | None:
    """The layout stored on a model's (or a config's) `deftcompress_layout` attribute, if any."""
    config = model_or_config if not isinstance(model_or_config, nn.Module) else model_config(model_or_config)
    return getattr(config, LAYOUT_ATTR, None)


def original_heads(model: nn.Module, block: AttentionBlock) -> tuple[list[int], int]:
    """(original numbers of the current query heads, original head count) of an attention block."""
    entry = (layout_of(model) or {}).get("attention", {}).get(block_key(block))
    if entry:
        return list(entry["heads"]), int(entry["of"])
    count = head_geometry(block).q_heads
    return list(range(count)), count


def record_layout(model: nn.Module, arch: ArchSpec, heads: dict[str, tuple[list[int], int]] | None = None,
                  original_widths: dict[str, int] | None = None) -> dict:
    """Write the current widths and skipped MLP blocks into the config (`heads`: block key -> (kept original heads,
    original count); `original_widths`: block key -> MLP width before the first pruning)."""
    heads, original_widths = heads or {}, original_widths or {}
    old = layout_of(model) or {}
    layout: dict[str, Any] = {"format": LAYOUT_FORMAT, "mlp": {}, "attention": {}}
    skipped = skipped_mlp_labels(model, arch)
    if skipped:
        layout["skipped"] = skipped
    for block in mlp_blocks(model, arch):
        key = block_key(block)
        of = old.get("mlp", {}).get(key, {}).get("of", original_widths.get(key, block.up.out_features))
        layout["mlp"][key] = {"kept": block.up.out_features, "of": of}
    for block in attention_blocks(model, arch):
        key = block_key(block)
        kept, of = heads.get(key) or original_heads(model, block)
        geo = head_geometry(block)
        kv = sorted({h // geo.group for h in kept})
        layout["attention"][key] = {"heads": kept, "kv_heads": kv, "of": of}
    setattr(model_config(model), LAYOUT_ATTR, layout)
    return layout


def apply_layout(model: nn.Module, layout: dict, arch: ArchSpec | None = None) -> None:
    """Shrink a freshly built (full-width) model to `layout`; its weights are loaded afterwards."""
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise ArchitectureError(f"{LAYOUT_ATTR}: unknown layout format {layout.get('format') if isinstance(layout, dict) else layout!r}")
    mlp, attention = layout.get("mlp", {}), layout.get("attention", {})
    skipped = layout.get("skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(label, str) for label in skipped):
        raise ArchitectureError(f"{LAYOUT_ATTR}: 'skipped' must be a list of block labels, got {skipped!r}")
    if skipped:
        from deftcompress.architecture.skip import skip_mlp_blocks

        skip_mlp_blocks(model, skipped, arch)
    for block in mlp_blocks(model, arch):
        entry = mlp.get(block_key(block))
        if entry and entry["kept"] != block.up.out_features:
            shrink_mlp(block, list(range(entry["kept"])))
    for block in attention_blocks(model, arch):
        entry = attention.get(block_key(block))
        if entry is None:
            continue
        geo = head_geometry(block)
        if entry["of"] != geo.q_heads:
            raise ArchitectureError(f"{LAYOUT_ATTR}: {block_key(block)} had {entry['of']} heads, the config builds {geo.q_heads}")
        if len(entry["heads"]) != geo.q_heads:
            shrink_attention(block, list(entry["kv_heads"]), list(range(geo.q_heads)), geo.q_heads)
            kept = [h for g in entry["kv_heads"] for h in range(g * geo.group, (g + 1) * geo.group)]
            if kept != list(entry["heads"]):
                raise ArchitectureError(f"{LAYOUT_ATTR}: {block_key(block)} heads {entry['heads']} do not match kv heads {entry['kv_heads']}")
    check_structure(model, arch)
