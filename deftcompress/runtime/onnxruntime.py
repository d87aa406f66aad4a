"""onnxruntime as a runtime of the pipeline: evaluate an exported graph as it would be deployed.

Density in onnxruntime is the masked density (real tokens); the paper mode, which counts padding,
is a PyTorch-side measurement.

Classifier graphs run in a plain `onnxruntime.InferenceSession` over the same features and batches
as the PyTorch evaluation (`deftcompress.data.features`); the score comes from the logits and, when
the graph has density outputs, the density from its per-layer counts. Causal language models run
through optimum's `ORTModelForCausalLM` (perplexity from its logits; `ort_greedy` for decoding speed),
text-to-text graphs through `ORTModelForSeq2SeqLM` (generation); the density of either is not measured
in onnxruntime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from deftcompress.data.features import encode_inputs, length_sorted_batches, pad_inputs
from deftcompress.data.metrics import compute_metrics
from deftcompress.export.onnx import OnnxGraph

if TYPE_CHECKING:
    from deftcompress.measurement.speed import Forward


@dataclass(frozen=True)
class SessionSettings:
    threads: int = 0  # 0: onnxruntime decides
    optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # onnxruntime's worker threads spin while waiting for work: right for a server, but in one process
    # that also runs PyTorch (side-by-side timing) the spinning threads steal the other model's cores
    spinning: bool = True

    def options(self):
        import onnxruntime as ort

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.optimization]
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options


def session(path: Path, settings: SessionSettings = SessionSettings()):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), settings.options(), providers=["CPUExecutionProvider"])


def classifier_outputs(sess, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run a classifier graph on a padded batch (tensors or arrays); returns every output by name."""
    names = {i.name for i in sess.get_inputs()}
    feed = {k: (v.numpy() if hasattr(v, "numpy") else v).astype(np.int64) for k, v in batch.items() if k in names}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def onnx_forward(folder: str, file: str, threads: int = 0, optimization: str = "all", spinning: bool = True) -> Forward:
    """A callable that runs a classifier graph on a `Batch` through onnxruntime (what `evaluate_onnx` runs), for
    `measurement.speed` to time beside PyTorch models.

    `spinning=False` when PyTorch models are timed in the same process: onnxruntime's idle threads
    would otherwise spin on the cores the next model needs (measured: a 0.79x model timed as 1.09x)."""
    sess = session(Path(folder) / file, SessionSettings(threads, optimization, spinning))
    return lambda batch: classifier_outputs(sess, {k: v for k, v in batch.inputs.items() if k != "labels"})


def evaluate_onnx(graph: OnnxGraph, tokenizer, task, examples: list[dict], arch, settings, session_settings: SessionSettings,
                  progress: bool = True, desc: str = "evaluate (onnxruntime)"):
    """Task score, density (from the graph's density outputs) and latency of an exported model."""
    from tqdm.auto import tqdm

    from deftcompress.measurement.density import density_from_counts
    from deftcompress.measurement.evaluation import Evaluation

    if graph.kind == "causal_lm":
        return _evaluate_causal_lm(graph, tokenizer, task, examples, arch, settings, session_settings, progress, desc)
    if graph.kind != "classifier":
        return _evaluate_text_to_text(graph, tokenizer, task, examples, arch, settings, session_settings, progress, desc)
    sess = session(Path(graph.folder) / graph.main_file(), session_settings)
    padding = "max_length" if settings.density_mode == "paper" else "longest"
    features = encode_inputs(tokenizer, task, arch, examples, settings.max_seq_length)
    predictions: list[Any] = [None] * len(examples)
    counted = graph.density_outputs and settings.density_mode == "masked"  # the graph counts real tokens only
    nonzero = positions = 0
    start = time.perf_counter()
    with tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        for idx in length_sorted_batches(features, settings.batch_size):
            out = classifier_outputs(sess, pad_inputs(tokenizer, [features[i] for i in idx], padding, settings.max_seq_length))
            logits = out["logits"]
            preds = logits[:, 0].astype(float).tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
            for i, p in zip(idx, preds):
                predictions[i] = p
            if counted:
                nonzero = nonzero + out["mlp_nonzero"].astype(np.int64)
                positions = positions + out["mlp_positions"].astype(np.int64)
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    metrics = compute_metrics(task, predictions, examples)
    density = None
    if counted and len(examples):
        layers = [(label.split(".")[0], int(label.split(".")[1])) for label in graph.layers]
        counts = [(int(nz), int(pos), w) for nz, pos, w in zip(nonzero, positions, graph.widths)]
        density = density_from_counts(layers, counts, None, settings.density_mode, settings.density_tau)
    return Evaluation(task_metric=task.metric, task_score=metrics[task.metric], metrics=metrics, density=density,
                      examples=len(examples), seconds=seconds, predictions=predictions)


def _evaluate_text_to_text(graph, tokenizer, task, examples, arch, settings, session_settings, progress, desc):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from tqdm.auto import tqdm

    from deftcompress.data.text_to_text import max_answer_tokens, parse_t5_prediction
    from deftcompress.measurement.evaluation import Evaluation

    model = ORTModelForSeq2SeqLM.from_pretrained(graph.folder, session_options=session_settings.options(),
                                                 provider="CPUExecutionProvider")
    features = encode_inputs(tokenizer, task, arch, examples, settings.max_seq_length)
    max_new = max_answer_tokens(tokenizer, task, settings.max_target_length)
    predictions: list[Any] = [None] * len(examples)
    start = time.perf_counter()
    with tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        for idx in length_sorted_batches(features, settings.batch_size):
            batch = pad_inputs(tokenizer, [features[i] for i in idx], "longest", settings.max_seq_length)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=max_new)
            for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                predictions[i] = parse_t5_prediction(task, text)
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    metrics = compute_metrics(task, predictions, examples)
    return Evaluation(task_metric=task.metric, task_score=metrics[task.metric], metrics=metrics, density=None,
                      examples=len(examples), seconds=seconds, predictions=predictions)


def causal_lm(folder: str, session_settings: SessionSettings = SessionSettings()):
    """optimum's `ORTModelForCausalLM` over an exported causal LM graph (past key values in and out)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(folder, session_options=session_settings.options(),
                                               provider="CPUExecutionProvider")


def ort_greedy(folder: str, new_tokens: int, session_settings: SessionSettings = SessionSettings()):
    """A `measurement.decoding` generator: greedy decoding of a causal LM graph, exactly `new_tokens` new ids."""
    from deftcompress.measurement.decoding import greedy

    return greedy(causal_lm(folder, session_settings), new_tokens)


def _evaluate_causal_lm(graph, tokenizer, task, examples, arch, settings, session_settings, progress, desc):
    import torch
    from tqdm.auto import tqdm

    from deftcompress.measurement.evaluation import Evaluation, next_token_loss, perplexity_metrics

    model = causal_lm(graph.folder, session_settings)
    features = encode_inputs(tokenizer, task, arch, examples, settings.max_seq_length)
    nll, tokens = 0.0, 0
    start = time.perf_counter()
    with tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        for idx in length_sorted_batches(features, settings.batch_size):
            batch = pad_inputs(tokenizer, [features[i] for i in idx], "longest", settings.max_seq_length)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            batch_nll, batch_tokens = next_token_loss(torch.as_tensor(logits), batch["input_ids"], batch["attention_mask"])
            nll, tokens = nll + batch_nll, tokens + batch_tokens
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    metrics = perplexity_metrics(nll, tokens)
    return Evaluation(task_metric=task.metric, task_score=metrics[task.metric], metrics=metrics, density=None,
                      examples=len(examples), seconds=seconds, predictions=[None] * len(examples))
