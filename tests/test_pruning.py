"""Magnitude and structured pruning: exact sparsity, masks that survive training, real shape changes, reload."""

from __future__ import annotations

import copy

import pytest
import torch

from deftcompress.architecture import attention_blocks, mlp_blocks
from deftcompress.errors import ArchitectureError, RecipeError
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.pipeline.recipe import Recipe
from deftcompress.core.registry import get_pass
from deftcompress.architecture.layout import block_key, check_structure, layout_of
from deftcompress.core.selectors import matches, select_modules


def run_pass(state, name: str, **config):
    cls = get_pass(name, "test")
    from deftcompress.core.config import parse_config

    return cls(parse_config(cls.Config, config, f"test.{name}")).run(state)


def sample_inputs(state) -> dict[str, torch.Tensor]:
    enc = state.tokenizer(["the film was good and warm", "dull", "a cold , boring and weak film overall"],
                          return_tensors="pt", padding=True)
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if state.arch.kind == "encoder_decoder":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 2], [0, 7, 1, 1], [0, 3, 3, 8]])
    return inputs


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


# ---- module selection ----------------------------------------------------------------------

def test_targets_match_class_names_through_the_mro_and_regex_on_full_names():
    lin = torch.nn.Linear(2, 2)
    assert matches("encoder.layer.0.query", lin, ["Linear"])
    assert matches("x", torch.nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2), ["Linear"])  # a subclass
    assert not matches("x", torch.nn.LayerNorm(2), ["Linear"])
    assert matches("bert.pooler.dense", lin, ["re:.*pooler.*"])
    assert not matches("bert.pooler.dense", lin, ["re:pooler"])  # fullmatch, not search
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert [n for n, _ in select_modules(model, ["Linear"], ["re:2"])] == ["0"]


# ---- magnitude pruning ---------------------------------------------------------------------

def _targeted_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "classifier" not in n and "pooler" not in n}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_reaches_exactly_the_requested_sparsity(pipeline_state, scope):
    state = pipeline_state("bert")
    head_before = state.model.classifier.weight.clone()
    before = {n: w.detach().clone() for n, w in _targeted_weights(state.model).items()}
    assert all(int((w == 0).sum()) == 0 for w in before.values())  # random init: every zero below is the pass's
    details = run_pass(state, "magnitude_prune", sparsity=0.3, scope=scope)
    weights = _targeted_weights(state.model)
    assert list(weights) == list(before) and len(weights) == 12  # 2 layers x (q, k, v, attention out, up, down)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    if scope == "layer":  # every matrix rounds on its own: the total is the sum of the per-matrix counts
        assert zeros == sum(round(0.3 * w.numel()) for w in weights.values())
    else:
        assert zeros == round(0.3 * total)
    assert details["sparsity_achieved"] == pytest.approx(zeros / total, abs=1e-6)
    assert details["zero_params"] == zeros and details["targeted_params"] == total
    assert abs(zeros / total - 0.3) < 1e-3
    for name, w in weights.items():
        pruned = w == 0
        assert torch.equal(w[~pruned], before[name][~pruned]), name  # the kept weights are untouched
        if scope == "layer":
            assert int(pruned.sum()) == round(0.3 * w.numel()), name
            # one threshold per matrix: every kept weight is at least as large as every pruned one of that matrix
            assert before[name][~pruned].abs().min() >= before[name][pruned].abs().max(), name
    if scope == "global":  # one threshold: every surviving weight is at least as large as every pruned one
        kept = torch.cat([before[n][w != 0].abs().flatten() for n, w in weights.items()])
        pruned = torch.cat([before[n][w == 0].abs().flatten() for n, w in weights.items()])
        assert len(kept) + len(pruned) == total and len(pruned) == zeros
        assert kept.min() >= pruned.max()
        # not a per-matrix cut: the matrices lose different fractions
        fractions = {round(int((w == 0).sum()) / w.numel(), 3) for w in weights.values()}
        assert len(fractions) > 1
    assert torch.equal(state.model.classifier.weight, head_before)  # ignored by default
    assert len(state.constraints) == 1 and state.constraints[0].describe()["masked_entries"] == zeros


def _lora(model, dropout: float = 0.1):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query", "value", "intermediate.dense"],
                        task_type="SEQ_CLS")
    return get_peft_model(model, config)


def _train_steps(model, inputs, constraint, steps: int = 6):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    labels = torch.tensor([1, 0, 0])
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if constraint is not None:
            constraint.enforce(model)


def _masked_zeros_regrown(model, masks) -> int:
    """Entries that the masks say must be zero but are not, in a plain (unwrapped) model."""
    modules = dict(model.named_modules())
    return sum(int((modules[name].weight.detach()[~keep] != 0).sum()) for name, keep in masks.items())


@pytest.mark.parametrize("merge_before_release", [False, True])
def test_masks_survive_lora_training_and_merging(pipeline_state, merge_before_release):
    state = pipeline_state("bert")
    run_pass(state, "magnitude_prune", sparsity=0.5)
    constraint = state.constraints[0]
    inputs = sample_inputs(state)
    model = _lora(state.model)
    constraint.bind(model)
    _train_steps(model, inputs, constraint)
    lora_b = [m.lora_B["default"].weight for n, m in model.named_modules() if hasattr(m, "lora_B") and "query" in n]
    assert any(bool(b.abs().sum() > 0) for b in lora_b)  # the adapter really trained
    trained_logits = logits(model, inputs)  # computed with the masked delta (hooks)
    if merge_before_release:  # what `deft` does with merge: true
        model = model.merge_and_unload()
        constraint.enforce(model)
        constraint.release(model)
        plain = model
    else:
        constraint.release(model)
        assert constraint.describe()["lora_layers_folded_at_release"] == 6  # 2 layers x (query, value, intermediate.dense)
        assert torch.allclose(logits(model, inputs), trained_logits, atol=1e-5)  # still the wrapped model, folded
        plain = model.merge_and_unload()
    assert _masked_zeros_regrown(plain, constraint.masks) == 0
    assert torch.allclose(logits(plain, inputs), trained_logits, atol=1e-5)


def test_without_the_constraint_lora_regrows_pruned_weights(pipeline_state):
    """The control for the test above: the same training, unconstrained, fills the zeros back in."""
    state = pipeline_state("bert")
    run_pass(state, "magnitude_prune", sparsity=0.5)
    masks = state.constraints[0].masks
    model = _lora(state.model)
    _train_steps(model, sample_inputs(state), None)
    assert _masked_zeros_regrown(model.merge_and_unload(), masks) > 1000


def test_masks_survive_full_fine_tuning(pipeline_state):
    state = pipeline_state("bert")
    run_pass(state, "magnitude_prune", sparsity=0.4, scope="layer")
    constraint = state.constraints[0]
    constraint.bind(state.model)
    _train_steps(state.model, sample_inputs(state), constraint)
    constraint.release(state.model)
    assert _masked_zeros_regrown(state.model, constraint.masks) == 0


@pytest.mark.parametrize("method, merge", [("lora", False), ("qlora", True)])
def test_magnitude_prune_then_deft_keeps_zeros_in_the_saved_model(tiny_checkpoint, tiny_data, tmp_path, method, merge):
    from deftcompress.core.selectors import kept_module_patterns
    from deftcompress.passes.magnitude_prune import magnitude_masks, targeted_weights
    from deftcompress.pipeline.runner import run_recipe
    from deftcompress.data.tasks import get_task

    ref = str(tiny_checkpoint("bert"))
    recipe = Recipe.build(name="mp", model=ref, data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"magnitude_prune": {"sparsity": 0.5}},
                                  {"deft": {"method": method, "max_steps": 3, "batch_size": 8, "lora_dropout": 0.1,
                                            "learning_rate": 0.05, "merge": merge}}])  # big steps: regrowth shows
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.steps[1].details["sparsity_achieved"] == 0.5
    original, _, _ = load_model_and_tokenizer(ref, get_task("glue/sst2"))
    masks = magnitude_masks(targeted_weights(original, ["Linear"], kept_module_patterns()), 0.5, "global")
    saved, _, _ = load_model_and_tokenizer(str(tmp_path / "run" / "model"), get_task("glue/sst2"))
    assert _masked_zeros_regrown(saved, masks) == 0
    changed = [n for n in masks if not torch.equal(dict(saved.named_modules())[n].weight, dict(original.named_modules())[n].weight)]
    assert changed  # LoRA was folded into the (masked) weights


# ---- structured pruning --------------------------------------------------------------------

def _reference_with_removed_units_zeroed(original, pruned, arch):
    """The unpruned model with the removed neurons' and heads' contributions zeroed: must equal the pruned model."""
    reference = copy.deepcopy(original)
    for ref_block, new_block in zip(mlp_blocks(reference, arch), mlp_blocks(pruned, arch)):
        rows = ref_block.up.weight.detach()
        kept = [int(torch.nonzero((rows == row).all(dim=1))[0]) for row in new_block.up.weight.detach()]
        removed = [i for i in range(rows.shape[0]) if i not in set(kept)]
        with torch.no_grad():
            ref_block.down.weight[:, removed] = 0
    layout = layout_of(pruned)
    for block in attention_blocks(reference, arch):
        entry = layout["attention"][block_key(block)]
        d = int(getattr(block.module, block.spec.head_dim_attr))
        for head in set(range(entry["of"])) - set(entry["heads"]):
            with torch.no_grad():
                block.o.weight[:, head * d:(head + 1) * d] = 0
    return reference


@pytest.mark.parametrize("family", ["bert", "t5_relu", "t5_gated", "llama"])
def test_structured_prune_really_removes_units_computes_right_and_reloads(pipeline_state, family, tmp_path):
    state = pipeline_state(family)
    original = copy.deepcopy(state.model)
    inputs = sample_inputs(state)
    details = run_pass(state, "structured_prune", mlp_ratio=0.5, head_ratio=0.5, round_to=8)
    model = state.model

    for block in mlp_blocks(model, state.arch):  # 64 -> 32 neurons
        assert block.up.weight.shape[0] == 32 and block.down.weight.shape[1] == 32
        if block.gate is not None:
            assert block.gate.weight.shape[0] == 32
    for block in attention_blocks(model, state.arch):
        heads = block.q.weight.shape[0] // int(getattr(block.module, block.spec.head_dim_attr))
        assert heads == (4 if block.cross else 2), block.names["module"]  # T5 cross-attention is kept
        assert block.o.weight.shape[1] == block.q.weight.shape[0]
    if family == "llama":  # grouped-query: one of two key/value heads left, with both its query heads
        assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == 8
    assert details["mlp_ratio_achieved"] == 0.5 and details["head_ratio_achieved"] == 0.5
    assert details["params_after"] < details["params_before"]
    check_structure(model, state.arch)

    reference = _reference_with_removed_units_zeroed(original, model, state.arch)
    assert torch.allclose(logits(model, inputs), logits(reference, inputs), atol=1e-5)

    folder = tmp_path / "pruned"
    model.save_pretrained(folder, safe_serialization=True)
    state.tokenizer.save_pretrained(folder)
    reloaded, _, _ = load_model_and_tokenizer(str(folder), state.task)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    assert [b.up.weight.shape for b in mlp_blocks(reloaded, state.arch)] == [b.up.weight.shape for b in mlp_blocks(model, state.arch)]


def test_stock_from_pretrained_refuses_a_pruned_checkpoint(pipeline_state, tmp_path):
    """The stale-config trap: the saved config's widths are the stock ones; only the layout-aware loader reads it."""
    import transformers

    state = pipeline_state("bert")
    run_pass(state, "structured_prune", mlp_ratio=0.5)
    state.model.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises((RuntimeError, ValueError)):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_structured_prune_sees_through_frozen_parameters_and_restores_them(pipeline_state):
    state = pipeline_state("bert")
    for p in state.model.parameters():
        p.requires_grad_(False)
    state.model.classifier.weight.requires_grad_(True)
    run_pass(state, "structured_prune", mlp_ratio=0.5, round_to=1)
    assert all(b.up.weight.shape[0] == 32 for b in mlp_blocks(state.model, state.arch))
    trainable = [n for n, p in state.model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight"]


def test_structured_prune_taylor_and_global_scope(pipeline_state, tmp_path):
    state = pipeline_state("t5_gated")
    details = run_pass(state, "structured_prune", mlp_ratio=0.4, head_ratio=0.25, importance="taylor", scope="global",
                       round_to=1, taylor_batches=2, taylor_batch_size=4)
    assert details["taylor_batches"] == 2
    widths = [b.up.weight.shape[0] for b in mlp_blocks(state.model, state.arch)]
    assert abs(sum(widths) - 0.6 * 4 * 64) <= 4  # one global threshold, per-layer widths may differ
    check_structure(state.model, state.arch)
    assert all(p.grad is None for p in state.model.parameters())
    state.model.save_pretrained(tmp_path, safe_serialization=True)
    state.tokenizer.save_pretrained(tmp_path)
    reloaded, _, _ = load_model_and_tokenizer(str(tmp_path), state.task)
    inputs = sample_inputs(state)
    assert torch.equal(logits(reloaded, inputs), logits(state.model, inputs))


def test_check_structure_catches_a_stale_head_count(pipeline_state):
    state = pipeline_state("bert")
    run_pass(state, "structured_prune", mlp_ratio=0.25, head_ratio=0.5)
    state.model.bert.encoder.layer[0].attention.self.num_attention_heads = 4  # what a forgotten update leaves
    with pytest.raises(ArchitectureError, match="num_attention_heads"):
        check_structure(state.model, state.arch)


def test_structured_prune_through_the_pipeline_saves_a_reloadable_model(tiny_checkpoint, tiny_data, tmp_path):
    from deftcompress.pipeline.runner import run_recipe
    from deftcompress.data.tasks import get_task

    recipe = Recipe.build(name="sp", model=str(tiny_checkpoint("llama")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"structured_prune": {"mlp_ratio": 0.25, "head_ratio": 0.5}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    step = report.steps[-1]
    assert step.params < report.steps[0].params
    model, _, _ = load_model_and_tokenizer(str(tmp_path / "run" / "model"), get_task("glue/sst2"))
    assert model.model.layers[1].mlp.up_proj.weight.shape[0] == 48
    assert model.model.layers[1].self_attn.q_proj.weight.shape[0] == 16


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("passes, message", [
    ([{"magnitude_prune": {"sparsity": 1.0}}], r"sparsity must be in \[0, 1\)"),
    ([{"magnitude_prune": {"targets": ["re:("]}}], r"targets: bad regular expression"),
    ([{"magnitude_prune": {"scope": "row"}}], r"scope: expected one of"),
    ([{"structured_prune": {"mlp_ratio": 0.0}}], r"nothing to prune"),
    ([{"structured_prune": {"importance": "random"}}], r"importance: expected one of"),
    ([{"magnitude_prune": {}}, {"structured_prune": {}}], r"passes\[1\]\.structured_prune: .*put structured_prune before it"),
    ([{"deft": {"method": "lora"}}, {"structured_prune": {}}], r"passes\[1\]\.structured_prune: .*merge: true"),
    ([{"deft": {"method": "prefix"}}, {"magnitude_prune": {}}], r"passes\[1\]\.magnitude_prune: .*prune before it"),
])
def test_bad_pruning_plans_are_rejected_before_loading(passes, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.build(model="minilm", passes=passes)


def test_good_pruning_plans_validate():
    Recipe.build(model="minilm", passes=[{"structured_prune": {}}, {"magnitude_prune": {}}, {"deft": {}}])
    Recipe.build(model="minilm", passes=[{"deft": {"merge": True}}, {"structured_prune": {"head_ratio": 0.25}}])


def test_shipped_pruning_and_quantization_recipes_validate():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("structured_then_deft.yaml", "deft_then_quantize.yaml"):
        recipe = Recipe.from_file(recipes / name)
        assert recipe.model == "minilm" and recipe.plan
