"""The reusable training loop: batching, schedule length, keep-best, constraints, extra losses."""

from __future__ import annotations

import math

import pytest
import torch

from deftcompress.core.protocol import Constraint
from deftcompress.training.context import TrainingContext
from deftcompress.training.loop import TrainingError, TrainSettings, collate, encode_examples, train


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _ctx(state) -> TrainingContext:
    return TrainingContext.from_state(state, "test_train")


def _lora(state):
    from deftcompress.peft_methods.wrapping import PeftSettings, wrap_model

    return wrap_model(state.model, state.arch, state.task, PeftSettings(method="lora", r=2)).model


def test_seq2seq_batches_mask_label_padding_and_pad_to_max_length_in_paper_mode(pipeline_state):
    state = pipeline_state("t5_relu")
    examples = state.examples("train", 4)
    features = encode_examples(state.tokenizer, state.task, state.arch, examples, max_seq_length=40, max_target_length=6)
    batch = collate(state.tokenizer, state.task, state.arch, features)
    labels, dmask = batch.inputs["labels"], batch.inputs["decoder_attention_mask"]
    lengths = [len(f["labels"]) for f in features]
    assert labels.shape[1] == max(lengths)
    for i, n in enumerate(lengths):
        assert labels[i, :n].tolist() == features[i]["labels"] and (labels[i, n:] == -100).all()
        assert dmask[i].tolist() == [1] * n + [0] * (labels.shape[1] - n)
    assert torch.equal(batch.token_masks["decoder"], dmask) and torch.equal(batch.token_masks["encoder"], batch.inputs["attention_mask"])
    paper = collate(state.tokenizer, state.task, state.arch, features, padding="max_length", max_seq_length=40,
                    max_target_length=6)
    assert paper.inputs["input_ids"].shape[1] == 40 and paper.inputs["labels"].shape[1] == 6


def test_classification_batches_for_encoders_and_decoders(pipeline_state):
    for family, stack in (("bert", "encoder"), ("llama", "decoder")):
        state = pipeline_state(family)
        features = encode_examples(state.tokenizer, state.task, state.arch, state.examples("train", 5))
        batch = collate(state.tokenizer, state.task, state.arch, features)
        assert batch.inputs["labels"].dtype == torch.long and batch.inputs["labels"].shape == (5,)
        assert list(batch.token_masks) == [stack]
    stsb = pipeline_state("bert", task="glue/stsb")
    features = encode_examples(stsb.tokenizer, stsb.task, stsb.arch, stsb.examples("train", 3))
    assert collate(stsb.tokenizer, stsb.task, stsb.arch, features).inputs["labels"].dtype == torch.float32


def test_max_steps_sets_the_length_across_epochs(pipeline_state):
    state = pipeline_state("bert")
    result = train(_ctx(state), _lora(state), state.examples("train", 16), TrainSettings(max_steps=5, batch_size=8,
                                                                                        eval_every_epoch=False))
    # 16 rows / 8 = 2 steps per epoch: 5 steps take 3 epochs (2 + 2 + 1)
    assert result.steps == 5 and [e.steps for e in result.epochs] == [2, 2, 1]
    assert result.seconds_per_step > 0 and result.world_size == 1


class CountingConstraint(Constraint):
    name = "counting"

    def __init__(self):
        self.calls = {"bind": 0, "enforce": 0, "release": 0}

    def bind(self, model):
        self.calls["bind"] += 1

    def enforce(self, model):
        self.calls["enforce"] += 1

    def release(self, model):
        self.calls["release"] += 1


def test_constraints_are_enforced_after_every_optimizer_step(pipeline_state):
    state = pipeline_state("bert")
    constraint = CountingConstraint()
    state.constraints.append(constraint)
    train(_ctx(state), _lora(state), state.examples("train", 16), TrainSettings(max_steps=3, batch_size=8, eval_every_epoch=False))
    assert constraint.calls == {"bind": 0, "enforce": 3, "release": 0}  # binding / releasing is the pass's job


def test_keep_best_restores_the_best_epochs_weights(pipeline_state, monkeypatch):
    import deftcompress.measurement.evaluation as evaluation
    from deftcompress.measurement.evaluation import Evaluation

    state = pipeline_state("bert")
    model = _lora(state)
    seen: list[dict[str, torch.Tensor]] = []
    scores = iter([0.5, 0.9, 0.7])  # epoch 2 is the best

    def fake_evaluate(model, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return Evaluation(task_metric="accuracy", task_score=next(scores), metrics={}, density=None, examples=1, seconds=0.0)

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    result = train(_ctx(state), model, state.examples("train", 16), TrainSettings(epochs=3, batch_size=8, learning_rate=1e-2))
    assert [e.eval_score for e in result.epochs] == [0.5, 0.9, 0.7] and result.chosen_epoch == 2
    final = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(final[n], v) for n, v in seen[1].items())
    assert any(not torch.equal(final[n], v) for n, v in seen[2].items())  # epoch 3 really moved away
    assert "restored epoch 2" in result.notes[0]


def test_extra_loss_is_added_with_its_weight(pipeline_state):
    class Constant:
        label = "const"

        def begin_step(self, token_masks, step, total_steps):
            self.total = total_steps

        def end_step(self):
            return torch.tensor(0.25), 0.5

    state = pipeline_state("bert")
    result = train(_ctx(state), _lora(state), state.examples("train", 16), TrainSettings(max_steps=2, batch_size=8,
                                                                                        eval_every_epoch=False),
                   extra_loss=Constant())
    epoch = result.epochs[0]
    assert epoch.train_loss == pytest.approx(epoch.task_loss + 0.25, rel=1e-5) and epoch.extra_loss == 0.5
    assert result.to_dict()["epochs"][0]["const_loss"] == 0.5


def test_a_model_with_nothing_to_train_is_a_clear_error(pipeline_state):
    state = pipeline_state("bert")
    state.model.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(_ctx(state), state.model, state.examples("train", 8), TrainSettings(max_steps=1, batch_size=4))


# ---- training options users of Hugging Face tooling expect (issue 12) ---------------------------------

def _options_run(tiny_checkpoint, tiny_data, tmp_path, name, **deft):
    from deftcompress import Recipe, run_recipe

    deft = {"max_steps": 4, "batch_size": 4, "max_train_samples": 32, "r": 2, "learning_rate": 1e-2, **deft}
    recipe = Recipe.build(name=name, model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=4, passes=[{"deft": deft}])
    out = tmp_path / name
    report = run_recipe(recipe, output_dir=out, quiet=True)
    return report.steps[1].details, out


def test_gradient_accumulation_runs_micro_batches_per_optimizer_step(tiny_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                                     one_thread):
    from deftcompress.training import loop

    calls = []
    original = loop._forward_loss
    monkeypatch.setattr(loop, "_forward_loss", lambda model, batch, **kw: calls.append(batch.size) or original(model, batch, **kw))
    details, _ = _options_run(tiny_checkpoint, tiny_data, tmp_path, "accum", gradient_accumulation_steps=3)
    assert details["steps"] == 4 and details["gradient_accumulation_steps"] == 3
    assert calls == [4] * 12  # 3 micro-batches of 4 rows for each of the 4 optimizer steps


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused_there(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    from deftcompress.training.loop import TrainingError

    details, _ = _options_run(tiny_checkpoint, tiny_data, tmp_path, "bf16", mixed_precision="bf16")
    assert details["mixed_precision"] == "bf16" and math.isfinite(details["epochs"][0]["task_loss"])
    with pytest.raises(TrainingError, match="fp16 needs a GPU"):
        _options_run(tiny_checkpoint, tiny_data, tmp_path, "fp16", mixed_precision="fp16")


def test_eval_steps_choose_on_held_out_training_rows_and_tensorboard_gets_the_losses(tiny_checkpoint, tiny_data,
                                                                                    tmp_path, one_thread):
    details, out = _options_run(tiny_checkpoint, tiny_data, tmp_path, "evals", validation_fraction=0.25, eval_steps=2,
                                report_to=["tensorboard"])
    assert details["held_out_rows"] == 8 and details["train_rows"] == 24
    assert [e["step"] for e in details["step_evals"]] == [2, 4] and details["chosen_step"] in (2, 4)
    assert any("held-out training rows" in n for n in details["notes"])
    events = list((out / "passes" / "01_deft" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("deft, message", [
    ({"eval_steps": 2}, "eval_steps needs validation_fraction"),
    ({"report_to": ["tensorbored"]}, "report_to: unknown tracker 'tensorbored'"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be in [1, 4096]"),
    ({"mixed_precision": "fp8"}, "expected one of 'no' | 'bf16' | 'fp16'"),
])
def test_bad_training_options_are_one_line_errors(tiny_data, deft, message):
    from deftcompress import Recipe, RecipeError

    with pytest.raises(RecipeError) as info:
        Recipe.build(model="minilm", task="glue/sst2", data_dir=str(tiny_data), passes=[{"deft": deft}])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deft_keeps_weights_only_from_after_the_density_ramp(tiny_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                              one_thread):
    """Held-out scores that fall as density falls (as on MRPC) must not pick a checkpoint from before DEFT took hold:
    plain PEFT keeps its best step anywhere, DEFT only among steps after the ramp."""
    from types import SimpleNamespace

    from deftcompress.measurement import evaluation

    scores = iter([0.9, 0.8, 0.7, 0.6] * 2)  # the earliest evaluation scores best, every run

    def falling(*args, **kwargs):
        return SimpleNamespace(task_score=next(scores), density=None)

    monkeypatch.setattr(evaluation, "evaluate", falling)
    common = dict(validation_fraction=0.25, eval_steps=1, density_ramp_ratio=0.75, density_warmup_ratio=0.0)
    peft, _ = _options_run(tiny_checkpoint, tiny_data, tmp_path, "peft", density_weight=0.0, **common)
    deft, _ = _options_run(tiny_checkpoint, tiny_data, tmp_path, "deft", **common)
    assert peft["chosen_step"] == 1
    assert deft["chosen_step"] == 3  # the best of steps 3 and 4 (ceil(0.75 * 4) = 3)
    assert any("after the density ramp" in n for n in deft["notes"])


def test_with_a_density_target_deft_keeps_only_weights_that_reach_it(tiny_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                                     one_thread):
    """The evaluation at the ramp's end can still be denser than the target (the per-layer multipliers catch up
    later, as relufy then DEFT showed: 0.142 at the ramp's end, 0.05 later, for a target of 0.08): keep-best
    considers only evaluations within the target (x 1.1), and keeps the last weights if none is."""
    from types import SimpleNamespace

    from deftcompress.measurement import evaluation

    def run(name, densities, target):
        measured = iter(zip([0.9, 0.8, 0.7, 0.6], densities))

        def falling(*args, **kwargs):
            score, density = next(measured)
            return SimpleNamespace(task_score=score, density=SimpleNamespace(overall=lambda: density))
        monkeypatch.setattr(evaluation, "evaluate", falling)
        details, _ = _options_run(tiny_checkpoint, tiny_data, tmp_path, name, validation_fraction=0.25, eval_steps=1,
                                  density_ramp_ratio=0.5, density_warmup_ratio=0.0, density_target=target)
        return details

    reached = run("reached", [1.0, 0.5, 0.4, 0.2], 0.3)  # steps 2 and 3 are after the ramp but above 0.33
    assert reached["chosen_step"] == 4
    assert any("with held-out density <= 0.33" in n for n in reached["notes"])
    early = run("early", [1.0, 0.3, 0.2, 0.1], 0.3)  # within the target from the ramp's end: the best of 2-4
    assert early["chosen_step"] == 2
    never = run("never", [1.0, 0.9, 0.8, 0.7], 0.3)
    assert never["chosen_step"] == 4 and any("none was eligible" in n for n in never["notes"])
