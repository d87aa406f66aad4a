"""ADA-DEFT: learned block weights, the budget, skipped blocks removed for real, and speed/memory measurement."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deftcompress import Recipe, RecipeError, run_recipe
from deftcompress.architecture import mlp_blocks, skipped_mlp_labels
from deftcompress.architecture.layout import record_layout
from deftcompress.architecture.skip import skip_mlp_blocks
from deftcompress.data.features import collate, encode_examples
from deftcompress.training.block_gates import BlockGates, GateBudget
from deftcompress.training.options import GateSettings

FAMILIES = ("bert", "roberta", "t5_relu", "t5_gated", "llama")
TINY = {"max_steps": 6, "batch_size": 8, "max_train_samples": 32, "r": 2, "learning_rate": 1e-2, "gate_lr": 0.3,
        "measure_speed": False}


def _batch(state, n=4):
    rows = state.eval_examples()[:n]
    features = encode_examples(state.tokenizer, state.task, state.arch, rows)
    return collate(state.tokenizer, state.task, state.arch, features)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch.inputs).logits


def _mlp_keys(keys, label, arch_names):
    return [k for k in keys if any(f"{n}." in k for n in arch_names[label])]


def test_block_weights_get_gradients_and_the_budget_pushes_the_lowest_to_zero(pipeline_state, one_thread):
    state = pipeline_state("bert")
    model = state.model
    for p in model.parameters():
        p.requires_grad_(False)
    gates = BlockGates(mlp_blocks(model, state.arch), trainable=True)
    gates.attach()
    budget = GateBudget(gates, GateSettings(skip_blocks=1, ramp_ratio=0.5, decision_ratio=0.8))
    optimizer = torch.optim.Adam(gates.parameters(), lr=0.1)
    batch = _batch(state, 8)
    model.train()
    total = 40
    for step in range(total):
        budget.begin_step(batch.token_masks, step, total)
        loss = model(**batch.inputs).loss
        term, _ = budget.end_step()
        if term is not None:
            loss = loss + term
        loss.backward()
        if step == 0:
            assert gates.values.grad is not None and bool(gates.values.grad.abs().sum() > 0)
        optimizer.step()
        optimizer.zero_grad()
        gates.clamp_()
    values = gates.values.detach()
    assert budget.decided_at == int(0.8 * total)
    assert gates.keep.tolist().count(0.0) == 1  # exactly the budget
    skipped = int(gates.keep.argmin())
    assert values[skipped] < 0.05 < values[1 - skipped]  # the candidate went to zero, the other stayed up
    assert budget.multipliers["encoder"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_skipped_block_is_gone_from_the_saved_model_and_reloads_with_the_same_logits(pipeline_state, tmp_path, family,
                                                                                       one_thread):
    from deftcompress.models.formats import load_model, save_model

    state = pipeline_state(family)
    model, batch = state.model, _batch(state)
    blocks = mlp_blocks(model, state.arch)
    labels = [blocks[0].label] + ([blocks[-1].label] if state.arch.kind == "encoder_decoder" else [])
    names = {b.label: [b.names["up"], b.names["down"]] for b in blocks}
    # scaling a block's output by 0 (ADA-DEFT's gate) is what skipping computes
    gates = BlockGates(blocks, trainable=False)
    for i, b in enumerate(blocks):
        if b.label in labels:
            gates.keep[i] = 0.0
    gates.attach()
    gated = _logits(model, batch)
    gates.detach()

    removed = skip_mlp_blocks(model, labels, state.arch)
    record_layout(model, state.arch)
    assert removed and skipped_mlp_labels(model, state.arch) == labels
    assert [b.label for b in mlp_blocks(model, state.arch)] == [b.label for b in blocks if b.label not in labels]
    in_memory = _logits(model, batch)
    torch.testing.assert_close(in_memory, gated, atol=1e-5, rtol=1e-5)

    save_model(model, tmp_path / "m", tokenizer=state.tokenizer)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for label in labels:
        assert not _mlp_keys(keys, label, names), f"{label}: MLP weights still saved"
    assert _mlp_keys(keys, blocks[1 if state.arch.kind != "encoder_decoder" else 1].label, names)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["deftcompress_layout"]["skipped"] == labels
    reloaded, _, arch = load_model(tmp_path / "m")
    assert skipped_mlp_labels(reloaded, arch) == labels
    torch.testing.assert_close(_logits(reloaded, batch), in_memory, atol=0, rtol=0)


def test_skipped_blocks_have_no_matmul_in_the_onnx_graph(pipeline_state, tmp_path, one_thread):
    import onnx

    from deftcompress.export.onnx import export_onnx

    def matmuls(model, folder):
        export_onnx(model, state.tokenizer, state.arch, folder)
        graph = onnx.load(str(folder / "model.onnx")).graph
        return sum(n.op_type in ("MatMul", "Gemm") for n in graph.node)

    state = pipeline_state("bert")
    before = matmuls(state.model, tmp_path / "full")
    skip_mlp_blocks(state.model, ["encoder.1"], state.arch)
    assert matmuls(state.model, tmp_path / "skipped") == before - 2  # up- and down-projection of one block


def _run(tiny_checkpoint, tiny_data, tmp_path, name, passes, family="bert"):
    recipe = Recipe.build(name=name, model=str(tiny_checkpoint(family)), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=4, passes=passes)
    out = tmp_path / name
    run_recipe(recipe, output_dir=out, quiet=True)
    return json.loads((out / "report.json").read_text()), out


@pytest.mark.parametrize("family", ("bert", "t5_gated", "llama"))
def test_ada_deft_pass_skips_its_budget_and_the_run_reloads(tiny_checkpoint, tiny_data, tmp_path, family, one_thread):
    from deftcompress.models.formats import load_model

    report, out = _run(tiny_checkpoint, tiny_data, tmp_path, family,
                       [{"ada_deft": {**TINY, "skip_blocks": 1, "measure_speed": family == "bert", "speed_rows": 4,
                                      "speed_repeats": 1}}], family)
    step = report["steps"][1]
    blocks = step["details"]["blocks"]
    stacks = {"bert": ["encoder"], "t5_gated": ["encoder", "decoder"], "llama": ["decoder"]}[family]
    assert sorted(blocks["per_stack"]) == sorted(stacks)
    assert all(len(s["skipped"]) == 1 for s in blocks["per_stack"].values())
    assert set(blocks["learned_weights"]) == {f"{s}.{i}" for s in stacks for i in (0, 1)}
    assert blocks["decided_at_step"] == int(0.6 * TINY["max_steps"] + 0.999)
    model, _, arch = load_model(out / "model")
    assert sorted(skipped_mlp_labels(model, arch)) == sorted(blocks["skipped"])
    if family == "bert":
        speed = step["details"]["speed"]["models"]
        assert set(speed) == {"previous step", "ada_deft"}
        assert speed["ada_deft"]["weight_bytes"] < speed["previous step"]["weight_bytes"]
        assert speed["previous step"]["latency_ratio_batch_1"] == 1.0 and speed["ada_deft"]["ms_batch_4"] > 0
        md = (out / "report.md").read_text()
        assert f"| {blocks['skipped'][0]} | skipped | - | 0 |" in md
        assert "Latency and memory of step 1 (ada_deft) against the previous step" in md


def test_every_block_kept_equals_the_deft_model(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    from deftcompress.models.formats import load_model

    common = {k: v for k, v in TINY.items() if k not in ("gate_lr", "measure_speed")}
    _, deft_out = _run(tiny_checkpoint, tiny_data, tmp_path, "deft", [{"deft": common}])
    report, ada_out = _run(tiny_checkpoint, tiny_data, tmp_path, "ada",
                           [{"ada_deft": {**common, "skip_blocks": 0, "measure_speed": False}}])
    assert report["steps"][1]["details"]["blocks"]["skipped"] == []
    deft_model, _, _ = load_model(deft_out / "model")
    ada_model, _, _ = load_model(ada_out / "model")
    deft_state, ada_state = deft_model.state_dict(), ada_model.state_dict()
    assert deft_state.keys() == ada_state.keys()
    for key in deft_state:
        assert torch.equal(deft_state[key], ada_state[key]), key


def test_after_magnitude_pruning_the_masks_of_skipped_blocks_are_dropped_and_the_rest_hold(tiny_checkpoint, tiny_data,
                                                                                          tmp_path, one_thread):
    from deftcompress.models.formats import load_model

    prune = {"magnitude_prune": {"sparsity": 0.5}}
    _, pruned_out = _run(tiny_checkpoint, tiny_data, tmp_path, "pruned_only", [prune])
    report, out = _run(tiny_checkpoint, tiny_data, tmp_path, "pruned", [prune, {"ada_deft": {**TINY, "skip_blocks": 1}}])
    details = report["steps"][2]["details"]
    (skipped,) = details["blocks"]["skipped"]
    pruned, _, _ = load_model(pruned_out / "model")
    model, _, arch = load_model(out / "model")
    kept = mlp_blocks(model, arch)
    assert [b.label for b in kept] == [label for label in ("encoder.0", "encoder.1") if label != skipped]
    before = {b.label: b for b in mlp_blocks(pruned, arch)}
    for block in kept:  # every weight pruned before is still exactly zero (LoRA merged on top of it included)
        for role in ("up", "down"):
            zeros = getattr(before[block.label], role).weight == 0
            assert int(zeros.sum()) > 0 and bool((getattr(block, role).weight[zeros] == 0).all())


def test_after_structured_pruning_kept_widths_stay_and_the_run_reloads(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    from deftcompress.models.formats import load_model

    report, out = _run(tiny_checkpoint, tiny_data, tmp_path, "structured",
                       [{"structured_prune": {"mlp_ratio": 0.5, "round_to": 1}},
                        {"ada_deft": {**TINY, "skip_blocks": 1, "merge": True}}])
    model, _, arch = load_model(out / "model")
    layout = json.loads((out / "model" / "config.json").read_text())["deftcompress_layout"]
    (kept,) = mlp_blocks(model, arch)
    assert kept.up.out_features == 32 and layout["mlp"] == {kept.label: {"kept": 32, "of": 64}}
    assert layout["skipped"] == report["steps"][2]["details"]["blocks"]["skipped"]


@pytest.mark.parametrize("config, message", [
    ({}, "set exactly one of skip_blocks, skip_fraction or gate_penalty"),
    ({"skip_blocks": 1, "gate_penalty": 0.1}, "set only one of skip_blocks, gate_penalty"),
    ({"skip_blocks": 1, "method": "qlora"}, "4-bit base weights cannot absorb"),
    ({"skip_blocks": 1, "method": "adapter"}, "bottleneck adapters sit inside the MLP output"),
    ({"skip_fraction": 1.0}, "skip_fraction must be in [0, 1)"),
    ({"skip_blocks": 1, "gate_ramp_ratio": 0.7}, "gate_ramp_ratio <= gate_decision_ratio"),
])
def test_bad_ada_deft_configs_are_one_line_errors(tiny_data, config, message):
    with pytest.raises(RecipeError, match="ada_deft") as info:
        Recipe.build(model="minilm", task="glue/sst2", data_dir=str(tiny_data), passes=[{"ada_deft": config}])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_budget_as_large_as_the_stack_is_refused_before_training(tiny_checkpoint, tiny_data, tmp_path):
    from click.testing import CliRunner

    from deftcompress.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_checkpoint('bert')}\ntask: glue/sst2\ndata_dir: {tiny_data}\nmax_eval_samples: 4\n"
                      "passes:\n  - ada_deft: {skip_blocks: 2, max_steps: 2, batch_size: 8}\n")
    result = CliRunner().invoke(main, ["apply", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0 and "cannot skip 2 of the 2 MLP blocks of the encoder stack" in result.output
    assert "Traceback" not in result.output


def test_peak_forward_bytes_counts_new_storages_not_views():
    from deftcompress.measurement.speed import peak_forward_bytes
    from deftcompress.data.features import Batch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    x = torch.randn(2, 3, 4)
    # up's output (2*3*8 floats) and GELU's (same) are alive together; up's is freed before down allocates 2*3*4
    assert peak_forward_bytes(Net(), Batch({"x": x}, {}, 2)) == 2 * (2 * 3 * 8 * 4)
