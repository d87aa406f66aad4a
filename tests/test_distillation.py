"""Knowledge distillation in DEFT: the term by hand, a teacher that holds the model to its answers, bad input."""

import pytest
import torch
import torch.nn.functional as F

from deftcompress import Recipe, run_recipe
from deftcompress.errors import DeftcompressError, RecipeError


def test_the_term_by_hand():
    from deftcompress.training.distillation import distillation_term

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    t = 2.0
    p_teacher = F.softmax(teacher / t, dim=-1)
    by_hand = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distillation_term(student, teacher, t, regression=False), by_hand)
    assert float(distillation_term(teacher, teacher, t, regression=False)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(distillation_term(student[:, :1], teacher[:, :1], t, regression=True),
                               ((student[:, 0] - teacher[:, 0]) ** 2).mean())


def _logits(folder, texts):
    from deftcompress.models.formats import load_model

    model, tokenizer, _ = load_model(folder)
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def _run(tiny_checkpoint, tiny_data, tmp_path, name, **deft):
    deft = {"method": "lora", "r": 2, "max_steps": 8, "batch_size": 8, "max_train_samples": 32, "learning_rate": 3e-2,
            "density_weight": 0.0, **deft}
    recipe = Recipe.build(name=name, model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=8, passes=[{"deft": deft}])
    return run_recipe(recipe, output_dir=tmp_path / name, quiet=True)


@pytest.mark.parametrize("density_weight", [0.0, 1.0])
def test_a_teacher_holds_the_model_to_its_answers(tiny_checkpoint, tiny_data, tmp_path, one_thread, density_weight):
    """The teacher here is the checkpoint itself (its own random head): the task loss pulls the model away from
    it, the distillation term pulls it back, so the trained model stays far closer to the teacher's answers.
    With the density loss on as well (DEFT), the distillation term must still be trained on, not only logged."""
    teacher = tiny_checkpoint("bert")
    alone = _run(tiny_checkpoint, tiny_data, tmp_path, "alone", density_weight=density_weight)
    taught = _run(tiny_checkpoint, tiny_data, tmp_path, "taught", distill_from=str(teacher), distill_weight=50.0,
                  density_weight=density_weight)
    details = taught.steps[1].details
    recorded = details["distillation"]
    assert (recorded["from"], recorded["weight"], recorded["temperature"]) == (str(teacher), 50.0, 2.0)
    assert recorded["teacher_params"] > 0
    assert details["epochs"][0]["distill_loss"] >= 0 and "distill_loss" not in alone.steps[1].details["epochs"][0]
    assert alone.steps[1].details["distillation"] is None
    texts = ["the film was good and great", "the film was dull and cold , really poor", "a fine warm story"]
    reference = _logits(teacher, texts)

    def gap(run_name):
        logits = _logits(tmp_path / run_name / "model", texts)
        return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                              reduction="batchmean"))
    print(f"KL to the teacher: taught {gap('taught'):.5f}, alone {gap('alone'):.5f}")
    assert gap("taught") < 0.5 * gap("alone")


@pytest.mark.parametrize("deft, message", [
    ({"distill_from": "/nonexistent/teacher"}, "distill_from: checkpoint folder '/nonexistent/teacher' not found"),
    ({"distill_temperature": 0}, r"distill_temperature must be in \(0, 100\]"),
    ({"distill_weight": -1}, r"distill_weight must be in \[0, 1000\]"),
])
def test_bad_distillation_configs_are_one_line_errors(tiny_checkpoint, tiny_data, deft, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                     passes=[{"deft": {"method": "lora", **deft}}])
    assert "\n" not in str(info.value) and "passes[0].deft" in str(info.value)


def test_a_teacher_for_another_label_count_is_refused(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """MNLI has three labels; the SST-2 checkpoint's head has two: a one-line error, nothing trained."""
    recipe = Recipe.build(name="mnli", model=str(tiny_checkpoint("bert")), task="glue/mnli", data_dir=str(tiny_data),
                          max_eval_samples=8, passes=[{"deft": {"method": "lora", "r": 2, "max_steps": 1, "batch_size": 8,
                                                                "distill_from": str(tiny_checkpoint("bert"))}}])
    with pytest.raises(DeftcompressError, match="predicts 2 labels, task glue/mnli has 3") as info:
        run_recipe(recipe, output_dir=tmp_path / "mnli", quiet=True)
    assert "\n" not in str(info.value)


def test_a_run_folder_model_in_deftcompress_layout_teaches(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """A PEFT run's model/ in deftcompress's layout (a bottleneck adapter: base/ and adapter/ with a manifest, no
    config.json at the top) is a valid teacher."""
    _run(tiny_checkpoint, tiny_data, tmp_path, "peft", max_steps=1, method="adapter", reduction_factor=4)
    assert (tmp_path / "peft" / "model" / "deftcompress_model.json").is_file()
    assert not (tmp_path / "peft" / "model" / "config.json").exists()
    report = _run(tiny_checkpoint, tiny_data, tmp_path, "deft", max_steps=1, density_weight=1.0,
                  distill_from=str(tmp_path / "peft" / "model"))
    assert report.steps[1].details["distillation"]["from"] == str(tmp_path / "peft" / "model")


def test_the_feature_term_by_hand():
    """SquareHead: per layer, |h_s - h_t|^2 / |h_t|^2 over real tokens, averaged over layers; layer 0 (embeddings)
    left out; padding ignored."""
    from deftcompress.training.distillation import feature_term

    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 3, 4) for _ in range(3))
    student = tuple(t + 0.1 * torch.randn_like(t) for t in teacher)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    by_hand = []
    for s, t in zip(student[1:], teacher[1:]):
        m = mask[..., None].float()
        by_hand.append(((s - t) ** 2 * m).sum() / (t ** 2 * m).sum())
    torch.testing.assert_close(feature_term(student, teacher, mask), torch.stack(by_hand).mean())
    assert float(feature_term(teacher, teacher, mask)) == 0.0
    changed_padding = tuple(s.clone() for s in student)
    for s in changed_padding:
        s[1, 2] += 100.0  # a padding position: not counted
    torch.testing.assert_close(feature_term(changed_padding, teacher, mask), feature_term(student, teacher, mask))
    with pytest.raises(DeftcompressError, match="the teacher has 2 layers and the trained model 1"):
        feature_term(student[:2], teacher, mask)


def test_feature_distillation_holds_the_hidden_states_to_the_teachers(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """With the logits' term off, the feature term alone keeps every layer's hidden states closer to the teacher's
    (the checkpoint itself) than training without it."""
    from deftcompress.models.formats import load_model

    teacher = tiny_checkpoint("bert")
    _run(tiny_checkpoint, tiny_data, tmp_path, "alone", density_weight=1.0)
    taught = _run(tiny_checkpoint, tiny_data, tmp_path, "taught", density_weight=1.0, distill_from=str(teacher),
                  distill_weight=0.0, distill_features=50.0)
    assert taught.steps[1].details["distillation"]["features_weight"] == 50.0
    texts = ["the film was good and great", "a fine warm story"]

    def gap(folder):
        model, tokenizer, _ = load_model(folder)
        reference, _, _ = load_model(teacher)
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            a = model(**inputs, output_hidden_states=True).hidden_states
            b = reference(**inputs, output_hidden_states=True).hidden_states
        return sum(float(((x - y) ** 2).mean()) for x, y in zip(a[1:], b[1:]))
    print(f"hidden-state gap: taught {gap(tmp_path / 'taught' / 'model'):.5f}, alone {gap(tmp_path / 'alone' / 'model'):.5f}")
    assert gap(tmp_path / "taught" / "model") < 0.5 * gap(tmp_path / "alone" / "model")


def test_feature_distillation_needs_a_teacher(tiny_checkpoint, tiny_data):
    with pytest.raises(RecipeError, match="distill_features needs distill_from"):
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                     passes=[{"deft": {"method": "lora", "distill_features": 1.0}}])


def test_the_next_token_term_by_hand_counts_real_tokens_only():
    from deftcompress.training.distillation import distillation_term

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t = 2.0
    p = F.softmax(teacher / t, dim=-1)
    per_token = (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1)
    by_hand = per_token[mask.bool()].mean() * t * t
    torch.testing.assert_close(distillation_term(student, teacher, t, regression=False, token_mask=mask), by_hand)
    scrambled = student.clone()
    scrambled[mask == 0] = 100.0  # padding positions do not count
    torch.testing.assert_close(distillation_term(scrambled, teacher, t, regression=False, token_mask=mask), by_hand)


def test_a_causal_lm_teaches_a_thresholded_decoder_next_tokens(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """Language modelling: the dense model teaches the model with activation cutoffs (logits and hidden states); a
    classifier is refused as a language-modelling teacher in one line."""
    from deftcompress.data.tasks import get_task
    from deftcompress.models.loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_checkpoint("llama")), get_task("squad/contexts"))
    model.save_pretrained(tmp_path / "dense_lm")
    tokenizer.save_pretrained(tmp_path / "dense_lm")

    def run(name, teacher):
        recipe = Recipe.build(name=name, model=str(tmp_path / "dense_lm"), task="squad/contexts", data_dir=str(tiny_data),
                              max_eval_samples=4, passes=[
                                  {"activation_threshold": {"density_target": 0.3, "calibration_samples": 8}},
                                  {"deft": {"method": "lora", "r": 2, "max_steps": 2, "batch_size": 4,
                                            "density_weight": 0.0, "distill_from": teacher, "distill_features": 1.0}}])
        return run_recipe(recipe, output_dir=tmp_path / name, quiet=True)

    details = run("taught", str(tmp_path / "dense_lm")).steps[2].details
    assert details["distillation"]["from"] == str(tmp_path / "dense_lm")
    assert details["epochs"][0]["distill_loss"] > 0
    with pytest.raises(DeftcompressError, match="is not a causal language model") as info:
        run("refused", str(tiny_checkpoint("llama")))
    assert "\n" not in str(info.value)
