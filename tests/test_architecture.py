import pytest
import transformers

from deftcompress.architecture import attention_blocks, mlp_blocks, spec_for
from deftcompress.errors import ArchitectureError
from conftest import build_tiny_model


@pytest.mark.parametrize(
    "family, stacks, gated, act_suffix",
    [
        ("bert", {"encoder": 2}, False, "intermediate.intermediate_act_fn"),
        ("roberta", {"encoder": 2}, False, "intermediate.intermediate_act_fn"),
        ("t5_relu", {"encoder": 2, "decoder": 2}, False, "DenseReluDense.act"),
        ("t5_gated", {"encoder": 2, "decoder": 2}, True, "DenseReluDense.act"),
        ("llama", {"decoder": 2}, True, "mlp.act_fn"),
    ],
)
def test_table_locates_mlp_and_attention(family, stacks, gated, act_suffix):
    model, _ = build_tiny_model(family)
    blocks = mlp_blocks(model)
    counts = {}
    for b in blocks:
        counts[b.stack] = counts.get(b.stack, 0) + 1
        assert b.names["act"].endswith(act_suffix)
        assert (b.gate is not None) == gated
        assert b.up.out_features == b.down.in_features == 64
    assert counts == stacks
    # T5 decoder layers also carry cross-attention
    attn = attention_blocks(model)
    expected = sum(stacks.values()) + (stacks.get("decoder", 0) if family.startswith("t5") else 0)
    assert len(attn) == expected


def test_table_works_through_peft_wrapper():
    import peft

    model, _ = build_tiny_model("bert")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=spec_for(model).default_lora_targets(True), r=2))
    blocks = mlp_blocks(wrapped)
    assert len(blocks) == 2 and blocks[0].layer_name.startswith("base_model.model.")
    assert spec_for(wrapped).family == "bert"


def test_unknown_family_says_how_to_add_it():
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ArchitectureError, match="gpt2.*architecture/families"):
        spec_for(model)


def test_default_lora_targets():
    model, _ = build_tiny_model("bert")
    assert spec_for(model).default_lora_targets() == ["query", "value"]
    assert spec_for(model).default_lora_targets(include_mlp_up=True) == ["query", "value", "intermediate.dense"]


def test_default_lora_targets_t5_and_llama():
    t5, _ = build_tiny_model("t5_gated")
    assert spec_for(t5).default_lora_targets(True) == ["q", "v", "DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"]
    llama, _ = build_tiny_model("llama")
    assert spec_for(llama).default_lora_targets(True) == ["q_proj", "v_proj", "mlp.gate_proj", "mlp.up_proj"]
