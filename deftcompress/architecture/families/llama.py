"""Llama-style decoders (llama, mistral, qwen2, qwen3): SiLU-gated MLP, grouped-query attention."""

from deftcompress.architecture.spec import ArchSpec, AttentionSpec, MLPSpec, SkipStep, StackSpec

DECODER = StackSpec(
    name="decoder",
    layers=r"(?:.*\.)?layers\.(\d+)",
    mlp=MLPSpec(block=("mlp",), act=("mlp.act_fn",), up=("mlp.gate_proj",), down=("mlp.down_proj",), gate=("mlp.up_proj",),
                # pre-norm: h + mlp(post_attention_layernorm(h)); skipped: h + 0, the norm not computed
                skip=(SkipStep("post_attention_layernorm", "identity"), SkipStep("mlp", "zero"))),
    attention=AttentionSpec(
        module=("self_attn",), q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",),
        o=("self_attn.o_proj",), num_heads_attr=None, head_dim_attr="head_dim", scaling_attr="scaling",
        kv_groups_attr="num_key_value_groups",
    ),
)

FAMILIES = (
    ArchSpec(
        family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), kind="decoder", stacks=(DECODER,),
        trained_heads=("score",), kept_modules=("score", "lm_head"), prompt_tuning_padding_side="left",
        notes="SiLU-gated MLP: density counts act_fn(gate_proj(x)), before the product with up_proj(x).",
    ),
)
