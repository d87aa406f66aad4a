"""The record types of the architecture table, and finding a family's record (torch-free).

Each family is one `ArchSpec`: per stack (encoder / decoder) where the transformer layers are, where
the MLP keeps its up-projection, activation, optional gate and down-projection, where the attention
keeps its projections and head-count attributes, and the family facts passes need (task heads,
text-to-text, PEFT quirks). Density measurement, the DEFT loss, structured pruning, PEFT wrapping and
evaluation read these records; nothing else hard-codes module names or family names.

To add a family: write a module under `families/` with its `ArchSpec`, add it to `FAMILY_MODULES`
below, then run `pytest tests/test_architecture.py`.
Paths are relative to a layer module and may list alternatives (first one present wins).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from deftcompress.errors import ArchitectureError

Paths = tuple[str, ...]
FAMILY_MODULES = ("bert", "t5", "llama")  # modules of deftcompress.architecture.families, in lookup order


@dataclass(frozen=True)
class SkipStep:
    """One module replaced when a whole MLP block is skipped (ADA-DEFT), relative to the layer.

    kind: ``identity`` returns its first input (a pre-norm residual branch, or an activation path);
    ``zero`` returns a scalar 0 that the family's residual add broadcasts; ``norm_of_residual``
    returns `norm(residual)` for post-norm blocks computing ``norm(mlp(x) + residual)`` (BERT's
    output), keeping the original module's `norm` submodule under the same name.
    """

    path: str
    kind: Literal["identity", "zero", "norm_of_residual"]
    norm: str | None = None


@dataclass(frozen=True)
class MLPSpec:
    block: Paths  # the whole MLP: a layer whose block is a skip module has no MLP (see `skip`)
    act: Paths  # activation module: its output is what density counts, its input the pre-activation
    up: Paths  # linear whose output feeds `act`
    down: Paths  # projection after the activation
    gate: Paths = ()  # gated MLPs: the linear multiplied with the activation output
    # What replaces the MLP when it is skipped, so the layer computes exactly `x` + 0 * MLP(x)
    # and keeps no MLP weights (empty: the family cannot skip MLP blocks).
    skip: tuple[SkipStep, ...] = ()


@dataclass(frozen=True)
class AttentionSpec:
    module: Paths
    q: Paths
    k: Paths
    v: Paths
    o: Paths
    num_heads_attr: str | None  # attribute on `module` with the head count (None: derive from q / head_dim)
    head_dim_attr: str
    all_head_size_attr: str | None = None
    scaling_attr: str | None = None  # cached 1/sqrt(head_dim), if the module keeps one
    kv_groups_attr: str | None = None  # grouped-query attention: query heads per key/value head
    pruned_heads_attr: str | None = None  # set of removed head indices (original numbering) the module reads itself
    heads_prunable: bool = True  # False: structured pruning keeps every head (see `not_prunable_because`)
    not_prunable_because: str = ""


@dataclass(frozen=True)
class StackSpec:
    name: Literal["encoder", "decoder"]
    layers: str  # regex on a layer's full module name; group 1 is the layer index
    mlp: MLPSpec
    attention: AttentionSpec
    cross_attention: AttentionSpec | None = None


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    kind: Literal["encoder", "encoder_decoder", "decoder"]
    stacks: tuple[StackSpec, ...]
    # Classification heads: trained with every PEFT method (module-name components).
    trained_heads: tuple[str, ...] = ()
    # Never pruned or quantized by default: heads, pooler, LM head (module-name components).
    kept_modules: tuple[str, ...] = ()
    # Tasks are phrased as text and answered by generation (T5), instead of a classification head.
    text_to_text: bool = False
    # Prompt tuning feeds embeddings, so a last-token classifier must find its token at the end: pad on the left.
    prompt_tuning_padding_side: Literal["left", "right"] | None = None
    # peft's prefix-tuning classifier takes output[1] as the pooled output; pooler-less backbones return their
    # cache there, so the backbone's cache output is dropped (see peft_methods.wrapping.patch_prefix_classification).
    prefix_tuning_drops_backbone_cache: bool = False
    # The config field naming the MLP activation (relufy sets "relu" there, so stock from_pretrained rebuilds it),
    # and the prefix gated MLPs use in it (T5: feed_forward_proj "gated-gelu").
    activation_attr: str | None = "hidden_act"
    # Learned absolute position embeddings: inputs longer than config.max_position_embeddings minus this offset fail
    # inside the model (RoBERTa's positions start after the padding index: 2). None: relative or rotary positions.
    learned_positions_offset: int | None = None
    # The config field holding the number of layers (depth pruning sets it); None: layers cannot be removed, because
    # `fixed_depth_because`.
    layer_count_attr: str | None = "num_hidden_layers"
    fixed_depth_because: str = ""
    gated_activation_prefix: str = ""
    notes: str = ""

    def max_input_tokens(self, config) -> int | None:
        """The longest input the model's position embeddings allow, or None where positions do not limit it."""
        size = getattr(config, "max_position_embeddings", None)
        if self.learned_positions_offset is None or not isinstance(size, int):
            return None
        return size - self.learned_positions_offset

    def stack(self, name: str) -> StackSpec:
        for s in self.stacks:
            if s.name == name:
                return s
        raise ArchitectureError(f"{self.family} has no {name} stack")

    def default_lora_targets(self, include_mlp_up: bool = False) -> list[str]:
        """Module-name suffixes for peft's `target_modules`: query and value, optionally the MLP up-projection(s).

        Attention projections are named by their leaf ("query"); MLP projections by their last two
        components ("intermediate.dense"), since a bare "dense" would also hit the pooler and outputs.
        """
        return self._targets((lambda a: (a.q, a.v)), include_mlp_up, with_gate=True)

    def default_ia3_targets(self, include_mlp_up: bool = False) -> list[str]:
        """IA3 scales key and value (and the projection into the activation: a per-neuron pre-activation scale)."""
        return self._targets((lambda a: (a.k, a.v)), include_mlp_up, with_gate=False)

    def _targets(self, attention_paths, include_mlp_up: bool, with_gate: bool) -> list[str]:
        names: list[str] = []
        for s in self.stacks:
            for paths in attention_paths(s.attention):
                for p in paths:
                    leaf = p.rsplit(".", 1)[-1]
                    if leaf not in names:
                        names.append(leaf)
            if include_mlp_up:
                for p in s.mlp.up + (s.mlp.gate if with_gate else ()):
                    short = ".".join(p.split(".")[-2:])
                    if short not in names:
                        names.append(short)
        return names


def all_families() -> tuple[ArchSpec, ...]:
    """Every record of the table, in lookup order."""
    records = []
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"deftcompress.architecture.families.{name}")
        records.extend(module.FAMILIES)
    return tuple(records)


def spec_for_model_type(model_type: str) -> ArchSpec:
    families = all_families()
    for spec in families:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in families for t in s.model_types)
    raise ArchitectureError(
        f"model family {model_type!r} is not in the architecture table (known: {known}); "
        "add an ArchSpec record under deftcompress/architecture/families/"
    )


def kept_module_names() -> tuple[str, ...]:
    """`kept_modules` of every family, for defaults chosen before the model is known."""
    names: list[str] = []
    for spec in all_families():
        names += [h for h in spec.kept_modules if h not in names]
    return tuple(names)
