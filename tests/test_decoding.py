"""Decoding speed (evaluate's decode_speed): greedy generation at batch 1, runtimes side by side, and causal LM graphs."""

from __future__ import annotations

import pytest
import torch

DECODE = {"decode_speed": True, "decode_prompts": 2, "decode_prompt_tokens": 8, "decode_new_tokens": 5,
          "decode_repeats": 2}


def _lm_recipe(tiny_checkpoint, tiny_data, passes, **settings):
    from deftcompress.pipeline.recipe import Recipe

    return Recipe.build(name="lm", model=str(tiny_checkpoint("llama")), task="squad/contexts", data_dir=str(tiny_data),
                        max_eval_samples=6, passes=passes, **settings)


def test_greedy_generators_agree_and_count_exactly_the_new_tokens(tiny_checkpoint, one_thread):
    from deftcompress.measurement.decoding import compare_decoding, greedy
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.data.tasks import get_task

    model, _, _ = load_model_and_tokenizer(str(tiny_checkpoint("llama")), get_task("squad/contexts"))
    prompts = [torch.randint(5, 1000, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    other = load_model_and_tokenizer(str(tiny_checkpoint("llama")), get_task("squad/contexts"))[0]
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)  # another model: its greedy tokens differ from the first step on
    result = compare_decoding({"a": greedy(model, 6), "same": greedy(model, 6),
                               "other": greedy(other, 6)}, prompts, new_tokens=6, repeats=3)
    d = result.to_dict()["runtimes"]
    assert d["a"]["speedup"] == 1.0 and d["same"]["identical_prompts"] == 2 and d["same"]["first_difference"] is None
    assert d["other"]["identical_prompts"] == 0 and d["other"]["first_difference"] == 0
    assert all(r["tokens_per_second"] > 0 and r["iqr"][0] <= r["iqr"][1] for r in d.values())
    expected = model.generate(input_ids=prompts[0], attention_mask=torch.ones_like(prompts[0]), do_sample=False,
                              max_new_tokens=6, min_new_tokens=6)[0, 8:]
    assert torch.equal(greedy(model, 6)(prompts[0]), expected)


def test_prompts_too_short_for_the_rows_name_the_option(tiny_checkpoint):
    from deftcompress.errors import DataError
    from deftcompress.measurement.decoding import decode_prompts
    from deftcompress.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_checkpoint("llama")))
    rows = [{"text_a": "a b c d e f g h i j"}, {"text_a": "short"}]
    assert decode_prompts(tokenizer, rows, 4, 1)[0].shape == (1, 4)
    with pytest.raises(DataError, match="1 of the 2 evaluation rows have 6 tokens, 2 are needed; lower decode_prompt_tokens"):
        decode_prompts(tokenizer, rows, 6, 2)


def test_evaluate_times_decoding_in_torch_sparse_and_onnxruntime_side_by_side(tiny_checkpoint, tiny_data, tmp_path,
                                                                              one_thread):
    from deftcompress.pipeline.runner import run_recipe

    recipe = _lm_recipe(tiny_checkpoint, tiny_data, [
        {"activation_threshold": {"density_target": 0.3, "calibration_samples": 8}},
        {"evaluate": {"runtime": "sparse", **DECODE}},
        {"onnx_export": {"check_rows": 4}},
        {"evaluate": {"runtime": "onnxruntime", **DECODE}},
    ])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    sparse, exported, ort = report.steps[2], report.steps[3], report.steps[4]
    decoding = sparse.details["decoding"]
    assert decoding["workload"] == {**decoding["workload"], "batch_size": 1, "prompt_tokens": 8, "new_tokens": 5,
                                    "prompts": 2, "repeats": 2}
    assert set(decoding["runtimes"]) == {"torch", "sparse"}
    # the same model in another runtime: the same greedy tokens
    assert decoding["runtimes"]["sparse"]["identical_prompts"] == 2
    assert exported.details["kind"] == "causal_lm" and exported.details["parity"]["max_abs_logit_diff"] < 1e-4
    assert set(ort.details["decoding"]["runtimes"]) == {"torch", "onnxruntime"}
    assert ort.details["decoding"]["runtimes"]["onnxruntime"]["identical_prompts"] == 2
    # perplexity in onnxruntime is the perplexity in PyTorch of the same model
    assert ort.task_score == pytest.approx(report.steps[1].task_score, rel=1e-4)
    assert "| sparse |" in (tmp_path / "run" / "report.md").read_text()
    # compare reads the last decoding measurement: onnxruntime's tokens/s and its ratio to torch beside it
    from deftcompress.reporting.compare_tables import csv_text, row_from_run, text_table

    row = row_from_run(tmp_path / "run")
    rate = ort.details["decoding"]["runtimes"]["onnxruntime"]
    assert f"{rate['tokens_per_second']:.1f} onnxruntime ({rate['speedup']:.2f}x torch)" in text_table([row])
    assert "decode tok/s: greedy decoding at batch 1" in text_table([row])
    assert "decode_tokens_per_second" in csv_text([row]).splitlines()[0]


def test_decode_speed_on_a_classification_task_is_refused_at_validation(tiny_checkpoint, tiny_data):
    from deftcompress.errors import RecipeError
    from deftcompress.pipeline.recipe import Recipe

    with pytest.raises(RecipeError, match="decode_speed times greedy generation of a causal language model; task "
                                          "glue/sst2 is classification"):
        Recipe.build(model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                     passes=[{"evaluate": {"decode_speed": True}}])
    with pytest.raises(RecipeError, match="decode_new_tokens must be in"):
        Recipe.build(model=str(tiny_checkpoint("llama")), task="squad/contexts", data_dir=str(tiny_data),
                     passes=[{"evaluate": {"decode_speed": True, "decode_new_tokens": 0}}])


def test_the_report_shows_decoding_per_runtime():
    from deftcompress.reporting.report import Report, StepRecord

    decoding = {"workload": {"batch_size": 1, "prompt_tokens": 64, "new_tokens": 64, "prompts": 4, "repeats": 3,
                             "others_load": 0.0},
                "reference": "torch",
                "runtimes": {"torch": {"tokens_per_second": 20.0, "iqr": [19.5, 20.5], "speedup": 1.0,
                                       "identical_prompts": 4, "first_difference": None},
                             "sparse": {"tokens_per_second": 27.0, "iqr": [26.0, 28.0], "speedup": 1.35,
                                        "identical_prompts": 3, "first_difference": 41}}}
    step = StepRecord(index=1, pass_name="evaluate", task_metric="perplexity", task_score=20.0, metrics={},
                      density={}, params=1, nonzero_params=1, size_bytes=1, latency_ms_per_example=1.0,
                      eval_examples=4, eval_seconds=1.0, seconds=1.0, details={"decoding": decoding})
    report = Report(name="r", model="m", task="squad/contexts", steps=[step])
    md = report.markdown()
    assert "| sparse | 27.00 | 26.00-28.00 | 1.35x | 3/4 | token 41 |" in md
    assert "greedy, batch 1, 4 prompts of 64 tokens + 64 new tokens, median of 3 alternating repetitions" in md
    assert "| torch | 20.00 | 19.50-20.50 | 1.00x | 4/4 | - |" in md


def test_decoding_options_time_and_leave_the_recipe_hash_alone(tiny_checkpoint, tiny_data):
    """Adding decode_speed to a finished run's recipe must not make it another run: the options only time."""
    from deftcompress.pipeline.progress import recipe_hash

    def hashed(evaluate):
        recipe = _lm_recipe(tiny_checkpoint, tiny_data, [{"evaluate": evaluate}])
        return recipe_hash(recipe, str(tiny_checkpoint("llama")))

    plain = hashed({})
    assert hashed({**DECODE}) == plain
    assert hashed({"density_tau": 0.5}) != plain  # a field that changes what is measured still counts
