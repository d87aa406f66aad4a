"""BERT and RoBERTa encoders (and XLM-RoBERTa): same layer layout, different heads."""

from deftcompress.architecture.spec import ArchSpec, AttentionSpec, MLPSpec, SkipStep, StackSpec

ENCODER = StackSpec(
    name="encoder",
    layers=r"(?:.*\.)?encoder\.layer\.(\d+)",
    mlp=MLPSpec(block=("intermediate",), act=("intermediate.intermediate_act_fn",), up=("intermediate.dense",),
                down=("output.dense",),
                # post-norm: output = LayerNorm(dropout(dense(x)) + residual); skipped: LayerNorm(residual)
                skip=(SkipStep("intermediate", "identity"), SkipStep("output", "norm_of_residual", norm="LayerNorm"))),
    attention=AttentionSpec(
        module=("attention.self",), q=("attention.self.query",), k=("attention.self.key",), v=("attention.self.value",),
        o=("attention.output.dense",), num_heads_attr="num_attention_heads", head_dim_attr="attention_head_size",
        all_head_size_attr="all_head_size",
    ),
)

FAMILIES = (
    ArchSpec(family="bert", model_types=("bert",), kind="encoder", stacks=(ENCODER,), trained_heads=("classifier",),
             kept_modules=("classifier", "pooler"), learned_positions_offset=0),
    ArchSpec(family="roberta", model_types=("roberta", "xlm-roberta"), kind="encoder", stacks=(ENCODER,),
             trained_heads=("classifier",), kept_modules=("classifier", "pooler"), prefix_tuning_drops_backbone_cache=True,
             learned_positions_offset=2,
             notes="No pooler in the classification model: the head pools the first token itself."),
)
