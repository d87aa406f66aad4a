"""T5 encoder-decoders (t5, mt5): ReLU (`wi`) or gated-GELU (`wi_0` / `wi_1`) feed-forwards."""

from typing import Literal

from deftcompress.architecture.spec import ArchSpec, AttentionSpec, MLPSpec, SkipStep, StackSpec


def _attention(module: str, cross: bool = False) -> AttentionSpec:
    return AttentionSpec(
        module=(module,), q=(f"{module}.q",), k=(f"{module}.k",), v=(f"{module}.v",), o=(f"{module}.o",),
        num_heads_attr="n_heads", head_dim_attr="key_value_proj_dim", all_head_size_attr="inner_dim",
        # T5 shares layer 0's relative position bias (all heads) with later layers; each layer
        # picks its own heads' rows from it through `pruned_heads`.
        pruned_heads_attr="pruned_heads",
        heads_prunable=not cross,
        not_prunable_because="HF's T5 shares one cross-attention position bias across decoder layers" if cross else "",
    )


def _stack(name: Literal["encoder", "decoder"]) -> StackSpec:
    ff = "layer.1" if name == "encoder" else "layer.2"
    dense = f"{ff}.DenseReluDense"
    return StackSpec(
        name=name,
        layers=rf"(?:.*\.)?{name}\.block\.(\d+)",
        # ReLU T5 has `wi`; gated-GELU (v1.1, flan) has `wi_0` (into the activation) and `wi_1` (the gate).
        mlp=MLPSpec(block=(ff,), act=(f"{dense}.act",), up=(f"{dense}.wi", f"{dense}.wi_0"), down=(f"{dense}.wo",),
                    gate=(f"{dense}.wi_1",),
                    # pre-norm T5LayerFF: h + dropout(DenseReluDense(layer_norm(h))); skipped: h
                    skip=(SkipStep(ff, "identity"),)),
        attention=_attention("layer.0.SelfAttention"),
        cross_attention=_attention("layer.1.EncDecAttention", cross=True) if name == "decoder" else None,
    )


FAMILIES = (
    ArchSpec(
        family="t5", model_types=("t5", "mt5"), kind="encoder_decoder", stacks=(_stack("encoder"), _stack("decoder")),
        kept_modules=("lm_head",), text_to_text=True, activation_attr="feed_forward_proj", gated_activation_prefix="gated-",
        layer_count_attr=None,
        fixed_depth_because="each stack's first block holds the relative position bias every later block reads",
        notes="Density is the activation before the gate product (gated-GELU).",
    ),
)
