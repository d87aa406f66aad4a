"""Shared fixtures: tiny random checkpoints of each model family and a tiny local data folder.

Checkpoints are built from configs (no hub), saved as safetensors with a real tokenizer, so the
tests exercise the same loading path as users' local folders.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("DEFTCOMPRESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
T5_TOKENIZER = SHARED_DATA / "tokenizers" / "t5-small"

FAMILIES = ("bert", "roberta", "t5_relu", "t5_gated", "llama")

_POS = ["good", "great", "lovely", "fine", "superb", "warm", "funny"]
_NEG = ["bad", "awful", "dull", "poor", "boring", "cold", "weak"]


def _sentence(rng: random.Random, label: int) -> str:
    words = _POS if label else _NEG
    return f"the film was {rng.choice(words)} and {rng.choice(words)} , really {rng.choice(words)}"


def write_tiny_data(root: Path, n_train: int = 64, n_dev: int = 24) -> Path:
    """GLUE TSV layout (sst2, mrpc, stsb, cola, mnli) and a SQuAD v1.1 JSON, all tiny and synthetic."""
    rng = random.Random(0)
    glue = root / "glue"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [(lab, _sentence(rng, lab)) for lab in (rng.randint(0, 1) for _ in range(n))]
        (glue / "sst2").mkdir(parents=True, exist_ok=True)
        (glue / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for l, s in rows))
        (glue / "mrpc").mkdir(parents=True, exist_ok=True)
        (glue / "mrpc" / f"{split}.tsv").write_text(
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            + "".join(f"{l}\t{i}\t{i + 1}\t{s}\t{s if l else _sentence(rng, 1 - l)}\n" for i, (l, s) in enumerate(rows)),
            encoding="utf-8",
        )
        (glue / "stsb").mkdir(parents=True, exist_ok=True)
        (glue / "stsb" / f"{split}.tsv").write_text(
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "".join(f"{i}\tg\tf\t2012\t{i}\ts\ts\t{s}\t{s}\t{rng.uniform(0, 5):.2f}\n" for i, (l, s) in enumerate(rows))
        )
        (glue / "cola").mkdir(parents=True, exist_ok=True)
        (glue / "cola" / f"{split}.tsv").write_text("".join(f"src\t{l}\t*\t{s}\n" for l, s in rows))
        (glue / "mnli").mkdir(parents=True, exist_ok=True)
        names = ["entailment", "neutral", "contradiction"]
        (glue / "mnli" / ("train.tsv" if split == "train" else "dev_matched.tsv")).write_text(
            "index\tsentence1\tsentence2\tgold_label\n" + "".join(f"{i}\t{s}\t{s}\t{names[i % 3]}\n" for i, (l, s) in enumerate(rows))
        )
    articles = []
    for a in range(10):
        paras = []
        for p in range(2):
            ctx = f"article {a} paragraph {p} : the colour of the {_POS[p]} car is {_NEG[a % 7]} and it costs {a * 10 + p} dollars ."
            qas = [{"id": f"{a}-{p}-0", "question": "what colour is the car ?", "answers": [{"text": _NEG[a % 7], "answer_start": 0}]},
                   {"id": f"{a}-{p}-1", "question": "how much does it cost ?", "answers": [{"text": f"{a * 10 + p} dollars", "answer_start": 0}]}]
            paras.append({"context": ctx, "qas": qas})
        articles.append({"title": f"a{a}", "paragraphs": paras})
    (root / "squad").mkdir(parents=True, exist_ok=True)
    (root / "squad" / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def build_tiny_model(family: str):
    """A randomly initialised tiny model of `family` and the tokenizer it uses."""
    import transformers
    from deftcompress.core.model_refs import alias_path
    from deftcompress.models.loading import load_tokenizer

    torch.manual_seed(0)
    minilm_tok = lambda: transformers.AutoTokenizer.from_pretrained(alias_path("minilm"))  # noqa: E731
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128, hidden_act="gelu")
        return transformers.BertForSequenceClassification(cfg), minilm_tok()
    if family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=130, pad_token_id=0, hidden_act="gelu")
        return transformers.RobertaForSequenceClassification(cfg), minilm_tok()
    if family in ("t5_relu", "t5_gated"):
        gated = family == "t5_gated"
        cfg = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu",
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(cfg), load_tokenizer(str(T5_TOKENIZER))
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       pad_token_id=0, hidden_act="silu")
        return transformers.LlamaForSequenceClassification(cfg), minilm_tok()
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint("bert") -> folder with config.json, model.safetensors and a tokenizer."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            model, tok = build_tiny_model(family)
            folder = tmp_path_factory.mktemp(f"ckpt_{family}")
            model.save_pretrained(folder, safe_serialization=True)
            tok.save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return make


@pytest.fixture
def pipeline_state(tiny_checkpoint, tiny_data, tmp_path):
    """Factory: a real PipelineState holding a freshly loaded tiny model, for running one pass directly.

    pipeline_state("bert") / pipeline_state("t5_gated", task="glue/sst2"); the recipe points at the
    tiny data folder, so `state.examples("train", n)` works (taylor importance, training).
    """
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.pipeline.runner import PipelineState
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.data.tasks import get_task

    def make(family: str, task: str = "glue/sst2", **settings) -> "PipelineState":
        ref = str(tiny_checkpoint(family))
        recipe = Recipe.build(model=ref, task=task, data_dir=str(tiny_data), passes=[{"evaluate": {}}], **settings)
        spec = get_task(task)
        torch.manual_seed(0)  # the new classification head
        model, tokenizer, arch = load_model_and_tokenizer(ref, spec)
        return PipelineState(recipe=recipe, task=spec, arch=arch, model=model, tokenizer=tokenizer,
                             device=torch.device("cpu"), work_dir=tmp_path, quiet=True)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resume_after_boom(recipe, out: Path, fails_once: list[int], at: int):
    """Run `recipe` (with `test_fails_once` at step `at`) into `out`: it fails, then resumes there; the report."""
    from deftcompress.pipeline.runner import run_recipe

    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(recipe, output_dir=out, quiet=True)
    report = run_recipe(recipe, output_dir=out, quiet=True)
    assert report.resumed_from == at and fails_once == [at, at]
    return report


def assert_measured_again_alike(trained, evaluated) -> None:
    """`evaluated` measured the reloaded state afresh (not the earlier measurement reused) and found `trained`'s numbers."""
    assert "evaluation" not in evaluated.details
    assert evaluated.task_score == trained.task_score
    assert evaluated.density["encoder"] == pytest.approx(trained.density["encoder"], abs=1e-6)


@pytest.fixture
def fails_once():
    """A pass `test_fails_once` that raises RuntimeError("boom") the first time it runs; yields the step indexes it ran at."""
    from deftcompress.core.protocol import Pass
    from deftcompress.core.registry import register_pass, unregister_pass

    calls: list[int] = []

    @register_pass
    class FailsOnce(Pass):
        name = "test_fails_once"
        changes_model = False

        def run(self, state):
            calls.append(state.step_index)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return {}

    try:
        yield calls
    finally:
        unregister_pass("test_fails_once")
