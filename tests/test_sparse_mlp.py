"""Sparse MLP execution: the same outputs as dense on every family and path, dense where sparse would not pay."""

import pytest
import torch

from conftest import build_tiny_model
from deftcompress.architecture import mlp_blocks
from deftcompress.runtime.sparse_mlp import (FixedChoice, LayerCosts, SparseCalibration, SparseMLPRuntime, _choose)


def _inputs(n=3, length=9):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (n, length)), "attention_mask": torch.ones(n, length, dtype=torch.long)}


def _outputs(model, family, inputs):
    with torch.no_grad():
        if family.startswith("t5"):
            out = model(**inputs, decoder_input_ids=inputs["input_ids"][:, :4], output_hidden_states=True)
            return torch.cat([out.encoder_last_hidden_state.flatten(), out.decoder_hidden_states[-1].flatten()])
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


@pytest.fixture(params=["kernels", "pytorch"])
def kernels(request, monkeypatch):
    """Every path twice: with the compiled kernels, and as on a machine where they could not build."""
    from deftcompress.runtime import sparse_kernels

    if request.param == "pytorch":
        monkeypatch.setattr(sparse_kernels, "_loaded", None)
        monkeypatch.setattr(sparse_kernels, "_why_not", "disabled by the test")
    elif sparse_kernels.load() is None:
        pytest.skip(f"no compiled kernels here: {sparse_kernels.why_not()}")
    return request.param


@pytest.mark.parametrize("family", ["bert", "t5_relu", "t5_gated", "llama"])
@pytest.mark.parametrize("path", ["per_token", "union"])
def test_sparse_paths_compute_what_dense_computes(family, path, kernels):
    model, _ = build_tiny_model(family)
    model.eval()
    inputs = _inputs()
    dense = _outputs(model, family, inputs)
    with SparseMLPRuntime(model, calibration=FixedChoice(path)) as runtime:
        sparse = _outputs(model, family, inputs)
    assert (sparse - dense).abs().max() <= 1e-5
    report = runtime.layer_report()
    downs = [r for r in report if r["role"] == "down"]
    assert len(downs) == len(mlp_blocks(model)) and all(r["paths"][path] == r["calls"] > 0 for r in downs)
    gates = [r for r in report if r["role"] == "gate"]
    assert len(gates) == (len(downs) if family in ("t5_gated", "llama") else 0)
    gate_path = "per_token" if path == "per_token" and kernels == "kernels" else "union"  # per token: the kernel
    assert all(r["paths"][gate_path] == r["calls"] > 0 for r in gates)  # the multiplied projection skipped rows
    # everything is back in place
    assert all(type(b.down) is torch.nn.Linear for b in mlp_blocks(model))


def test_zero_activations_skip_work_and_whole_zero_tokens_give_the_bias(kernels):
    """A ReLU block where some tokens have no active neuron at all: the empty bags give exactly the bias."""
    from deftcompress.runtime.sparse_mlp import _down_per_token, _down_union

    torch.manual_seed(0)
    h = torch.relu(torch.randn(6, 32) - 1.0)
    h[2] = 0.0
    linear = torch.nn.Linear(32, 8)
    weight_t = linear.weight.detach().t().contiguous()
    with torch.no_grad():
        expected = linear(h)
        for fn in (_down_per_token, _down_union):
            got = fn(h, weight_t, linear.bias, h != 0)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(got[2], linear.bias.detach())


def test_one_token_leaves_the_layer_bias_alone(kernels):
    """One token (decoding, or a one-row call): the kernel once summed into the bias tensor itself, so every call
    shifted the layer's bias. Two calls in a row must give the dense output and leave the bias as it was."""
    from deftcompress.runtime.sparse_mlp import _down_per_token

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    bias_before = linear.bias.detach().clone()
    weight_t = linear.weight.detach().t().contiguous()
    h = torch.relu(torch.randn(1, 32))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(_down_per_token(h, weight_t, linear.bias, h != 0), linear(h), atol=1e-6, rtol=0)
    assert torch.equal(linear.bias.detach(), bias_before)


def test_the_choice_is_dense_where_sparse_is_not_clearly_faster():
    costs = LayerCosts(dense=1.0, per_token=(0.1, 5.0), union=(0.2, 1.0))  # per-token: 0.1 + 5 d, union: 0.2 + u
    assert _choose(costs, per_token=0.02, union=0.9) == "per_token"  # 0.2 against 1.0
    assert _choose(costs, per_token=0.5, union=0.5) == "union"  # 0.7 against 2.6 and 1.0
    assert _choose(costs, per_token=0.5, union=0.75) == "dense"  # 0.95 is within the 10% margin of dense
    assert _choose(costs, per_token=0.3, union=1.0) == "dense"


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    from deftcompress.runtime import cost_model

    calls = []
    real = cost_model.measure_costs
    monkeypatch.setattr(cost_model, "measure_costs", lambda *a, **k: calls.append(a) or real(*a, **k))
    path = tmp_path / "cache.json"
    first = SparseCalibration(path, repeats=2)
    costs = first.costs(64, 16, tokens=5, gated=False)  # between the 1- and 8-token buckets
    assert len(calls) == 2 and path.is_file()
    assert costs.dense > 0 and costs.per_token is not None
    # the union path only where the kernel is missing: the kernel reads each active row once per call anyway
    assert (costs.union is None) == (cost_model._kernels() is not None)
    again = SparseCalibration(path, repeats=2).costs(64, 16, tokens=5, gated=False)
    assert len(calls) == 2  # read from the cache
    assert again.dense == pytest.approx(costs.dense)


def test_evaluate_with_the_sparse_runtime_scores_as_dense_and_reports_each_layer(tiny_checkpoint, tiny_data, tmp_path,
                                                                               monkeypatch):
    from deftcompress import Recipe, run_recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh calibration, kept out of the user's cache
    recipe = Recipe.build(name="sparse", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=16,
                          eval_batch_size=1, latency_repeats=1,
                          passes=[{"evaluate": {}}, {"evaluate": {"runtime": "sparse", "sparse_timed_calls": 2}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    dense, sparse = report.steps[1], report.steps[2]
    assert sparse.task_score == dense.task_score
    assert sparse.density["encoder"] == pytest.approx(dense.density["encoder"], abs=1e-9)
    layers = sparse.details["sparse_mlp"]["layers"]
    assert [r["layer"] for r in layers] == ["encoder.0", "encoder.1"]
    assert all(r["calls"] == 16 and sum(r["paths"].values()) == 16 and r["timed_calls"] == 2 for r in layers)
    assert (tmp_path / "cache" / "deftcompress" / "sparse_mlp.json").is_file()
    text = (tmp_path / "run" / "report.md").read_text()
    assert "Sparse MLP execution in step 2" in text and "dense / per-token / union calls" in text


def test_the_kernels_build_where_a_compiler_is_found():
    """Every kernel test skips where the kernels cannot build; a build error must not pass for a missing compiler."""
    import shutil

    from deftcompress.runtime import sparse_kernels

    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on this machine")
    assert sparse_kernels.load() is not None, sparse_kernels.why_not()


class _SparseBelowTenth:  # a calibration: the per-token kernel pays below 10% density, the union never
    def costs(self, d_in, d_out, tokens, gated):
        return LayerCosts(dense=1.0, per_token=(0.0, 9.0), union=None)


def _needs_kernels():
    from deftcompress.runtime import sparse_kernels

    if sparse_kernels.load() is None:
        pytest.skip(f"no compiled kernels here: {sparse_kernels.why_not()}")


def test_the_count_and_the_choice_run_inside_the_kernel():
    """Where only dense and the kernel compete, one compiled call counts, chooses and computes: dense above the
    calibrated limit (0.9 / 9 = 10% here), sparse below, for the down-projection and a gated projection alike."""
    from deftcompress.runtime.sparse_mlp import VERIFY_CALLS, LayerStats, SparseDown, SparseGate

    _needs_kernels()
    torch.manual_seed(0)
    down_linear, gate_linear = torch.nn.Linear(32, 8), torch.nn.Linear(8, 32)
    down = SparseDown(down_linear, _SparseBelowTenth(), LayerStats("x", "down"), None)
    gate = SparseGate(gate_linear, _SparseBelowTenth(), LayerStats("x", "gate"), None)
    dense_h = torch.relu(torch.randn(2, 32)) + 0.1
    sparse_h = torch.zeros(2, 32)
    sparse_h[0, 3], sparse_h[1, 7], sparse_h[1, 20] = 1.5, -2.0, 0.5  # 3 of 64
    x = torch.randn(2, 8)
    with torch.no_grad():
        for h in (dense_h, sparse_h, sparse_h):
            torch.testing.assert_close(down(h), down_linear(h), atol=1e-6, rtol=0)
            gate.take_pattern(h)
            torch.testing.assert_close(gate(x), gate_linear(x) * (h != 0), atol=1e-6, rtol=0)
    for module in (down, gate):
        report = module.stats.to_dict()
        assert report["counted_in_kernel_calls"] == report["calls"] == 3
        assert report["paths"] == {"dense": 1, "per_token": 2, "union": 0}
        assert report["unchecked_dense_calls"] == 0  # the count costs nothing here: no dense streak
        assert report["density"] == round((64 + 3 + 3) / (3 * 64), 4)
    # once the in-place checks are done, the bound kernel call is the whole forward: same outputs, same bookkeeping
    with torch.no_grad():
        for h in [sparse_h] * VERIFY_CALLS + [dense_h, sparse_h.unsqueeze(0)]:
            torch.testing.assert_close(down(h), down_linear(h), atol=1e-6, rtol=0)
            gate.take_pattern(h)
            torch.testing.assert_close(gate(x.reshape(h.shape[:-1] + (8,))), gate_linear(x).reshape(h.shape[:-1] + (32,))
                                       * (h != 0), atol=1e-6, rtol=0)
    for module in (down, gate):
        assert set(module._fast_calls) == {2}
        report = module.stats.to_dict()
        assert report["counted_in_kernel_calls"] == report["calls"] == 5 + VERIFY_CALLS
        assert report["paths"] == {"dense": 2, "per_token": 3 + VERIFY_CALLS, "union": 0}


def test_dense_calls_of_many_lengths_bind_the_kernel_call_per_length_bucket():
    """Sentences of many lengths: after FAST_AFTER dense calls in a token-count bucket (4-7 tokens here), a length
    never seen before is bound on its first call, not after FAST_AFTER calls of its own (the watched calls cost
    time with cold caches)."""
    from deftcompress.runtime.sparse_mlp import FAST_AFTER, LayerStats, SparseDown

    _needs_kernels()
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    down = SparseDown(linear, _SparseBelowTenth(), LayerStats("x", "down"), None)
    with torch.no_grad():
        for i in range(FAST_AFTER):
            h = torch.relu(torch.randn(4 + i % 3, 32)) + 0.1  # 4, 5 or 6 tokens: all dense
            torch.testing.assert_close(down(h), linear(h), atol=1e-6, rtol=0)
        assert not down._fast_calls  # each call so far was watched
        h = torch.relu(torch.randn(7, 32)) + 0.1
        torch.testing.assert_close(down(h), linear(h), atol=1e-6, rtol=0)
        assert set(down._fast_calls) == {7}
        h = torch.relu(torch.randn(9, 32)) + 0.1  # another bucket (8-15): watched again
        down(h)
        assert 9 not in down._fast_calls
    report = down.stats.to_dict()
    assert report["counted_in_kernel_calls"] == report["calls"] == FAST_AFTER + 2
    assert report["paths"]["dense"] == FAST_AFTER + 2


def test_hooks_on_a_swapped_projection_still_run():
    """The swapped modules skip nn.Module.__call__ only where it has nothing to do: a forward hook registered on one
    (or a global module hook) still runs, with the same output."""
    from deftcompress.runtime.sparse_mlp import LayerStats, SparseDown

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    down = SparseDown(linear, _SparseBelowTenth(), LayerStats("x", "down"), None)
    h = torch.zeros(2, 32)
    h[0, 3] = 1.0
    seen = []
    with torch.no_grad():
        for _ in range(12):  # past the watched calls: the bound call would otherwise be made directly
            down(h)
        handle = down.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        out = down(h)
        handle.remove()
        glob = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append("global"))
        try:
            down(h)
        finally:
            glob.remove()
        down(h)
    torch.testing.assert_close(seen[0], out)
    torch.testing.assert_close(out, linear(h), atol=1e-6, rtol=0)
    assert seen[1:] == ["global"]


def test_a_kernel_that_loses_in_place_is_dropped_there_too(monkeypatch):
    from deftcompress.runtime import sparse_projections
    from deftcompress.runtime.sparse_mlp import VERIFY_CALLS, LayerStats, SparseDown

    _needs_kernels()
    real = sparse_projections._kernels()

    class SlowKernels:
        def down_auto(self, *args):
            import time as _time

            _time.sleep(0.002)
            return real.down_auto(*args)

    monkeypatch.setattr(sparse_projections, "_kernels", lambda: SlowKernels())
    linear = torch.nn.Linear(16, 4)
    down = SparseDown(linear, _SparseBelowTenth(), LayerStats("x", "down"), None)
    h = torch.zeros(3, 16)
    h[:, 0] = 1.0  # 1/16 active: the kernel's side
    with torch.no_grad():
        for _ in range(VERIFY_CALLS + 2):
            torch.testing.assert_close(down(h), linear(h), atol=1e-6, rtol=0)
    report = down.stats.to_dict()
    assert report["counted_in_kernel_calls"] == VERIFY_CALLS and report["paths"]["per_token"] == VERIFY_CALLS
    assert report["dropped_in_place"][0]["path"] == "per_token" and report["paths"]["dense"] == 2
    assert report["unchecked_dense_calls"] == 2 and report["calls"] == VERIFY_CALLS + 2  # plain dense, not even a count


def test_a_clearly_dense_layer_stops_counting_for_a_while(monkeypatch):
    """The count that decides costs time too: a layer above its crossover skips it for DENSE_STREAK calls (where
    the count runs in Python: without the kernels, or where the union may win)."""
    from deftcompress.runtime import sparse_kernels
    from deftcompress.runtime.sparse_mlp import DENSE_STREAK, LayerStats, SparseDown

    monkeypatch.setattr(sparse_kernels, "_loaded", None)
    monkeypatch.setattr(sparse_kernels, "_why_not", "disabled by the test")

    class Costs:  # sparse pays only below 10% density here
        def costs(self, d_in, d_out, tokens, gated):
            return LayerCosts(dense=1.0, per_token=(0.0, 9.0), union=None)

    linear = torch.nn.Linear(16, 4)
    down = SparseDown(linear, Costs(), LayerStats("x", "down"), None)
    dense_input, sparse_input = torch.randn(3, 16), torch.zeros(3, 16)
    sparse_input[:, 0] = 1.0  # 1/16 active
    with torch.no_grad():
        for _ in range(1 + DENSE_STREAK):
            down(dense_input)
        report = down.stats.to_dict()
        assert report["calls"] == 1 + DENSE_STREAK and report["unchecked_dense_calls"] == DENSE_STREAK
        out = down(sparse_input)  # the streak is over: counted again, and sparse
    assert down.stats.paths["per_token"] == 1
    torch.testing.assert_close(out, linear(sparse_input))


def test_a_path_that_loses_in_place_is_dropped_after_a_few_calls(monkeypatch):
    """The cost model said sparse; in place it is slower: after VERIFY_CALLS timed calls the layer goes dense."""
    import time as _time

    from deftcompress.runtime import sparse_projections
    from deftcompress.runtime.sparse_mlp import VERIFY_CALLS, LayerStats, SparseDown

    real = sparse_projections._down_union

    def slow_union(*args):
        _time.sleep(0.002)
        return real(*args)

    class UnionPays:  # what a (wrong) calibration would say
        def costs(self, d_in, d_out, tokens, gated):
            return LayerCosts(dense=1.0, per_token=None, union=(0.0, 0.0))

    monkeypatch.setattr(sparse_projections, "_down_union", slow_union)
    linear = torch.nn.Linear(16, 4)
    down = SparseDown(linear, UnionPays(), LayerStats("x", "down"), None)
    h = torch.relu(torch.randn(3, 16))
    with torch.no_grad():
        for _ in range(VERIFY_CALLS + 3):
            torch.testing.assert_close(down(h), linear(h), atol=1e-6, rtol=0)
    report = down.stats.to_dict()
    assert report["paths"]["union"] == VERIFY_CALLS and report["paths"]["dense"] == 3
    assert report["unchecked_dense_calls"] == 2  # once dropped, a dense call starts a streak: no count for the next ones
    assert report["dropped_in_place"][0]["path"] == "union" and report["dropped_in_place"][0]["tokens_bucket"] == "2-3"


def test_entering_the_runtime_again_reuses_its_modules_and_statistics():
    model, _ = build_tiny_model("llama")
    model.eval()
    runtime = SparseMLPRuntime(model, calibration=FixedChoice("union"))
    inputs = _inputs()
    for _ in range(3):
        with runtime:
            _outputs(model, "llama", inputs)
    report = runtime.layer_report()
    assert len(report) == 2 * len(mlp_blocks(model))  # a down and a gate per layer, not one set per entry
    assert all(r["calls"] == 3 for r in report)
    assert all(type(b.down) is torch.nn.Linear and type(b.gate) is torch.nn.Linear for b in mlp_blocks(model))


def test_after_the_report_timing_calls_go_through_the_counting_kernel():
    """Timed calls (for the report) count in Python and time both paths; after them the kernel counts and chooses."""
    from deftcompress.runtime.sparse_mlp import LayerStats, SparseDown, _Timer

    _needs_kernels()
    linear = torch.nn.Linear(16, 4)
    down = SparseDown(linear, _SparseBelowTenth(), LayerStats("x", "down"), _Timer(2))
    h = torch.zeros(3, 16)
    h[:, 0] = 1.0
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(down(h), linear(h), atol=1e-6, rtol=0)
    report = down.stats.to_dict()
    assert report["timed_calls"] == 2 and report["counted_in_kernel_calls"] == 3 and report["calls"] == 5


# ---- int8 weights ----------------------------------------------------------------------------------

def _int8_block(seed: int = 0, d: int = 48, f: int = 160, tokens: int = 5, density: float = 0.1):
    torch.manual_seed(seed)
    up, down, gate = torch.nn.Linear(d, f), torch.nn.Linear(f, d), torch.nn.Linear(d, f)
    x = torch.randn(tokens, d)
    with torch.no_grad():
        pre = up(x)
        a = torch.relu(pre - torch.quantile(pre.flatten(), 1 - density))
    return up, down, gate, x, a


@pytest.mark.parametrize("tokens", [1, 5])
def test_int8_products_compute_the_dequantized_product(kernels, tokens):
    from deftcompress.runtime.sparse_kernels import down_int8, gate_int8, quantize_rows

    _, down, gate, x, a = _int8_block(tokens=tokens)
    q_down, s_down = quantize_rows(down.weight)
    q_gate, s_gate = quantize_rows(gate.weight)
    assert q_down.dtype == torch.int8 and int(q_down.abs().max()) == 127
    with torch.no_grad():
        expected_down = a @ (q_down.float() * s_down[:, None]).t() + down.bias
        expected_gate = (x @ (q_gate.float() * s_gate[:, None]).t() + gate.bias) * (a != 0)
        torch.testing.assert_close(down_int8(a, q_down.t().contiguous(), s_down, down.bias), expected_down,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate_int8(x, a, q_gate, s_gate, gate.bias), expected_gate, atol=1e-5, rtol=1e-5)


def test_the_sparse_int8_block_stays_within_the_dense_int8_blocks_own_error(kernels):
    """Tolerance: against fp32, the sparse int8 block's largest error is at most 1.5x that of PyTorch's dense
    dynamic int8 block (per-channel weights, activations quantized per call) on the same inputs."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from deftcompress.runtime.sparse_kernels import down_int8, gate_int8, quantize_rows

    for seed in range(3):
        up, down, gate, x, a = _int8_block(seed=seed, tokens=16)
        dense = quantize_dynamic(torch.nn.ModuleDict({"down": down, "gate": gate}),
                                 qconfig_spec={torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        q_down, s_down = quantize_rows(down.weight)
        q_gate, s_gate = quantize_rows(gate.weight)
        with torch.no_grad():
            fp32 = down(a * gate(x))
            dense_int8 = dense["down"](a * dense["gate"](x))
            sparse_int8 = down_int8(a * gate_int8(x, a, q_gate, s_gate, gate.bias), q_down.t().contiguous(), s_down,
                                    down.bias)
        own = float((dense_int8 - fp32).abs().max())
        assert 0 < float((sparse_int8 - fp32).abs().max()) <= 1.5 * own


def test_int8_products_refuse_float_weights_and_wrong_scales():
    from deftcompress.runtime.sparse_kernels import down_int8, gate_int8, quantize_rows

    _, down, gate, x, a = _int8_block()
    q, s = quantize_rows(down.weight)
    with pytest.raises(ValueError, match="int8 tensor"):
        down_int8(a, down.weight.t().contiguous(), s)
    with pytest.raises(ValueError, match=r"one float32 scale per output feature expected \(48\)"):
        down_int8(a, q.t().contiguous(), s[:10])
    with pytest.raises(ValueError, match="one float32 scale per output feature"):
        gate_int8(x, a, q, s.double())


def test_the_int8_choice_runs_the_dense_layer_above_its_density(kernels):
    from deftcompress.runtime.sparse_kernels import down_int8, down_int8_or_dense, quantize_rows

    _, down, _, _, sparse_h = _int8_block(density=0.1)
    dense_h = torch.relu(torch.randn_like(sparse_h)) + 0.1  # every activation nonzero
    q, s = quantize_rows(down.weight)
    calls = []

    def dense(h):
        calls.append(h.shape)
        return torch.zeros(h.shape[0], 48)

    with torch.no_grad():
        torch.testing.assert_close(down_int8_or_dense(sparse_h, q.t().contiguous(), s, down.bias, dense),
                                   down_int8(sparse_h, q.t().contiguous(), s, down.bias))
        assert not calls
        down_int8_or_dense(dense_h, q.t().contiguous(), s, down.bias, dense)
    assert calls == [dense_h.shape]


def test_the_compiled_density_count_decides_at_the_limit_like_torch(kernels):
    from deftcompress.runtime.sparse_kernels import load, sparse_enough

    t = torch.zeros(2, 50)
    t.view(-1)[:20] = 1.0  # 20 of 100 nonzero
    assert sparse_enough(t, 0.2)
    assert not sparse_enough(t, 0.19)
    t.view(-1)[-1] = -3.0  # 21 of 100
    assert not sparse_enough(t, 0.2)
    assert sparse_enough(torch.zeros(3, 7), 0.0)
    if kernels == "kernels":  # not the compiled count's case: it answers false, so the caller runs its dense layer
        assert not load().density_at_most(torch.zeros(4, 4, dtype=torch.float64), 0.5)
        assert not load().density_at_most(torch.zeros(4, 8)[:, ::2], 0.5)


class _SparseBelowNineTenths:  # a calibration: the per-token kernel pays below 90% density, the union never
    def costs(self, d_in, d_out, tokens, gated):
        return LayerCosts(dense=1.0, per_token=(0.0, 1.0), union=None)


def _thresholded_llama():
    from deftcompress.architecture.activation import set_thresholds

    model, _ = build_tiny_model("llama")
    model.eval()
    set_thresholds(model, {b.label: 0.05 for b in mlp_blocks(model)})  # exact zeros in SiLU's output
    return model


def test_one_token_calls_of_a_gated_block_run_as_one_compiled_call(monkeypatch):
    """Decoding: once the block's two projections settled on the kernel at one token, the whole block runs as one
    compiled call (checked once against its own forward); outputs stay the block's own, both projections' reports
    count the calls, and leaving the runtime gives the block its own forward back."""
    from deftcompress.runtime import sparse_projections
    from deftcompress.runtime.sparse_mlp import VERIFY_CALLS

    _needs_kernels()
    # on layers this small the kernel may lose to dense in place and be dropped; this test is about what follows
    monkeypatch.setattr(sparse_projections._Swapped, "_check_in_place", lambda *args: None)
    model = _thresholded_llama()
    blocks = mlp_blocks(model)
    torch.manual_seed(3)
    tokens = [torch.randn(1, 1, 32) for _ in range(VERIFY_CALLS + 4)]
    with torch.no_grad():
        expected = [[b.block(x) for x in tokens] for b in blocks]
        runtime = SparseMLPRuntime(model, calibration=_SparseBelowNineTenths())
        with runtime:
            got = [[b.block(x) for x in tokens] for b in blocks]
            prompt = torch.randn(1, 5, 32)  # more tokens: the block's own forward, through the swapped projections
            torch.testing.assert_close(blocks[0].block(prompt), expected_prompt := type(blocks[0].block).forward(
                blocks[0].block, prompt), atol=1e-5, rtol=0)
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    report = runtime.layer_report()
    for gate, down in zip(report[1::2], report[0::2]):
        assert gate["role"] == "gate" and 0 < gate["fused_block_calls"] < len(tokens)
        assert gate["calls"] == down["calls"]  # the fused calls went into both projections' tallies
    assert all("forward" not in vars(b.block) for b in blocks)
    assert expected_prompt.shape == (1, 5, 32)


def test_a_block_that_computes_otherwise_keeps_its_own_forward(monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    from deftcompress.runtime import sparse_projections

    _needs_kernels()
    monkeypatch.setattr(sparse_projections._Swapped, "_check_in_place", lambda *args: None)
    own = llama.LlamaMLP.forward
    monkeypatch.setattr(llama.LlamaMLP, "forward", lambda self, x: 2.0 * own(self, x))  # not down(act(up) * gate)
    model = _thresholded_llama()
    block = mlp_blocks(model)[0].block
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        expected = block(x)
        with SparseMLPRuntime(model, calibration=_SparseBelowNineTenths()) as runtime:
            for _ in range(10):
                torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)
    assert "fused_block_calls" not in runtime.layer_report()[1]
    assert runtime._fused[0]._call is False
