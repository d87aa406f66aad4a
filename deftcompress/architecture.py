"""The architecture table: one record per model family.

Each record knows, per stack (encoder / decoder), where the transformer layers are, where the MLP
keeps its up-projection, activation, optional gate and down-projection, and where the attention
keeps its projections and head-count attributes. Density measurement, the DEFT loss, layer skipping,
structured pruning and export all read this table; nothing else hard-codes module names.

To add a family: append an `ArchSpec` to `ARCHITECTURES` with the `model_type` values of its
configs (see `config.json`), then run `pytest tests/test_architecture.py`.
Paths are relative to a layer module and may list alternatives (first one present wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Literal

from torch import nn

from .errors import ArchitectureError

Paths = tuple[str, ...]


@dataclass(frozen=True)
class MLPSpec:
    block: Paths  # the whole MLP (what ADA-DEFT skips)
    act: Paths  # activation module: its output is what density counts, its input the pre-activation
    up: Paths  # linear whose output feeds `act`
    down: Paths  # projection after the activation
    gate: Paths = ()  # gated MLPs: the linear multiplied with the activation output


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
    notes: str = ""

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
        names: list[str] = []

        def add(name: str) -> None:
            if name not in names:
                names.append(name)

        for s in self.stacks:
            for paths in (s.attention.q, s.attention.v):
                for p in paths:
                    add(p.rsplit(".", 1)[-1])
            if include_mlp_up:
                for p in s.mlp.up + s.mlp.gate:
                    add(".".join(p.split(".")[-2:]))
        return names


_BERT_LIKE = dict(
    kind="encoder",
    stacks=(
        StackSpec(
            name="encoder",
            layers=r"(?:.*\.)?encoder\.layer\.(\d+)",
            mlp=MLPSpec(block=("intermediate",), act=("intermediate.intermediate_act_fn",), up=("intermediate.dense",), down=("output.dense",)),
            attention=AttentionSpec(
                module=("attention.self",), q=("attention.self.query",), k=("attention.self.key",), v=("attention.self.value",),
                o=("attention.output.dense",), num_heads_attr="num_attention_heads", head_dim_attr="attention_head_size",
                all_head_size_attr="all_head_size",
            ),
        ),
    ),
)


def _t5_stack(name: Literal["encoder", "decoder"]) -> StackSpec:
    ff = "layer.1" if name == "encoder" else "layer.2"
    dense = f"{ff}.DenseReluDense"

    def t5_attention(module: str) -> AttentionSpec:
        return AttentionSpec(
            module=(module,), q=(f"{module}.q",), k=(f"{module}.k",), v=(f"{module}.v",), o=(f"{module}.o",),
            num_heads_attr="n_heads", head_dim_attr="key_value_proj_dim", all_head_size_attr="inner_dim",
            # T5 shares layer 0's relative position bias (all heads) with later layers; each layer
            # picks its own heads' rows from it through `pruned_heads`.
            pruned_heads_attr="pruned_heads",
        )

    return StackSpec(
        name=name,
        layers=rf"(?:.*\.)?{name}\.block\.(\d+)",
        # ReLU T5 has `wi`; gated-GELU (v1.1, flan) has `wi_0` (into the activation) and `wi_1` (the gate).
        mlp=MLPSpec(block=(ff,), act=(f"{dense}.act",), up=(f"{dense}.wi", f"{dense}.wi_0"), down=(f"{dense}.wo",), gate=(f"{dense}.wi_1",)),
        attention=t5_attention("layer.0.SelfAttention"),
        cross_attention=t5_attention("layer.1.EncDecAttention") if name == "decoder" else None,
    )


_LLAMA_LIKE = dict(
    kind="decoder",
    stacks=(
        StackSpec(
            name="decoder",
            layers=r"(?:.*\.)?layers\.(\d+)",
            mlp=MLPSpec(block=("mlp",), act=("mlp.act_fn",), up=("mlp.gate_proj",), down=("mlp.down_proj",), gate=("mlp.up_proj",)),
            attention=AttentionSpec(
                module=("self_attn",), q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
                o=("self_attn.o_proj",), num_heads_attr=None, head_dim_attr="head_dim", scaling_attr="scaling",
                kv_groups_attr="num_key_value_groups",
            ),
        ),
    ),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(family="bert", model_types=("bert",), **_BERT_LIKE),
    ArchSpec(family="roberta", model_types=("roberta", "xlm-roberta"), **_BERT_LIKE),
    ArchSpec(
        family="t5",
        model_types=("t5", "mt5"),
        kind="encoder_decoder",
        stacks=(_t5_stack("encoder"), _t5_stack("decoder")),
        notes="ReLU (`wi`) and gated-GELU (`wi_0`/`wi_1`) feed-forwards; density is the activation before the gate product.",
    ),
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        notes="SiLU-gated MLP: density counts act_fn(gate_proj(x)), before the product with up_proj(x).",
        **_LLAMA_LIKE,
    ),
)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise ArchitectureError(
        f"model family {model_type!r} is not in the architecture table (known: {known}); "
        "add an ArchSpec record to deftcompress/architecture.py"
    )


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


def mlp_blocks(model: nn.Module, spec: ArchSpec | None = None) -> list[MLPBlock]:
    """Every MLP block of the model, encoder stack first, in layer order."""
    spec = spec or spec_for(model)
    blocks = []
    for stack in spec.stacks:
        for index, layer_name, layer in _layers(model, stack):
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
    if not blocks:
        raise ArchitectureError(f"found no {spec.family} layers in {type(model).__name__}; check the layer patterns in the architecture table")
    return blocks


def attention_blocks(model: nn.Module, spec: ArchSpec | None = None, include_cross: bool = True) -> list[AttentionBlock]:
    spec = spec or spec_for(model)
    out = []
    for stack in spec.stacks:
        attns = [(stack.attention, False)] + ([(stack.cross_attention, True)] if include_cross and stack.cross_attention else [])
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
