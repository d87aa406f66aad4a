"""Evaluation: task score and activation density from the same forward passes.

Classification (encoders, decoder-only with a classification head): one forward per batch gives
the logits and, through the density meter's hooks, the density. Text-to-text (T5): the encoder
runs once; its output feeds a teacher-forced decoder pass over the reference labels (decoder
density) and generation (the score; the meter is paused so generated steps are not counted).
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deftcompress.architecture import ArchSpec, mlp_blocks
from deftcompress.measurement.density import DensityMeter, DensityMode, DensityResult
from deftcompress.data.features import encode_inputs, length_sorted_batches, pad_inputs, target_batch
from deftcompress.data.metrics import compute_metrics
from deftcompress.data.tasks import TaskSpec
from deftcompress.data.text_to_text import max_answer_tokens, parse_t5_prediction


@dataclass(frozen=True)
class EvalSettings:
    density_mode: DensityMode = "masked"
    density_tau: float = 0.01
    batch_size: int = 64
    max_seq_length: int = 128
    max_target_length: int = 32
    measure_density: bool = True
    runtime: str = "torch"  # torch | onnxruntime (the exported graph) | sparse (deftcompress.runtime.sparse_mlp)
    ort_threads: int = 0
    ort_optimization: str = "all"
    sparse_timed_calls: int = 8  # runtime sparse: per layer, calls timed both dense and as chosen (for the report)
    decode_prompts: int = 0  # > 0: also time greedy decoding at batch 1 on this many prompts (measurement.decoding)
    decode_prompt_tokens: int = 64
    decode_new_tokens: int = 64
    decode_repeats: int = 3


@dataclass
class Evaluation:
    task_metric: str
    task_score: float
    metrics: dict[str, float]
    density: DensityResult | None
    examples: int
    seconds: float
    predictions: list[Any] = field(default_factory=list, repr=False)
    runtime_details: dict[str, Any] = field(default_factory=dict)  # what a runtime other than torch reports
    # the sparse MLP runtime the evaluation ran in (deftcompress.runtime.sparse_mlp), kept so the step's latency
    # is timed in the same runtime: its calibration, plans and in-place checks carry over
    sparse_runtime: Any = field(default=None, repr=False)

    @property
    def latency_ms_per_example(self) -> float:
        return 1000.0 * self.seconds / max(self.examples, 1)


def _generate_takes_encoder_outputs(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "encoder_outputs" in inspect.signature(base.forward).parameters


def is_prompt_learning(model: nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: TaskSpec, examples: list[dict], arch: ArchSpec,
             settings: EvalSettings = EvalSettings(), progress: bool = True, desc: str = "evaluate") -> Evaluation:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    text_to_text = arch.text_to_text
    padding = "max_length" if settings.density_mode == "paper" else "longest"
    features = encode_inputs(tokenizer, task, arch, examples, settings.max_seq_length)
    meter = DensityMeter(mlp_blocks(model, arch), settings.density_mode, settings.density_tau) if settings.measure_density else None
    predictions: list[Any] = [None] * len(examples)
    nll, tokens = 0.0, 0  # language modelling: summed next-token loss over real tokens
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex")
    try:
        if meter:
            meter.__enter__()
        for idx in length_sorted_batches(features, settings.batch_size):
            padded = pad_inputs(tokenizer, [features[i] for i in idx], padding, settings.max_seq_length)
            batch = {k: v.to(device) for k, v in padded.items()}
            if text_to_text:
                preds = _text_to_text_batch(model, tokenizer, task, [examples[i] for i in idx], batch, meter, settings)
            elif task.kind == "language_modeling":
                if meter:
                    meter.set_token_mask(arch.stacks[0].name, batch["attention_mask"])
                batch_nll, batch_tokens = next_token_loss(model(**batch).logits, batch["input_ids"], batch["attention_mask"])
                nll, tokens = nll + batch_nll, tokens + batch_tokens
                preds = [None] * len(idx)
            else:
                if meter:
                    meter.set_token_mask(arch.stacks[0].name, batch["attention_mask"])
                logits = model(**batch).logits
                preds = logits.squeeze(-1).float().tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
            for i, p in zip(idx, preds):
                predictions[i] = p
            bar.update(len(idx))
    finally:
        bar.close()
        if meter:
            meter.__exit__(None, None, None)
        model.train(was_training)
    seconds = time.perf_counter() - start
    if task.kind == "language_modeling":
        metrics = perplexity_metrics(nll, tokens)
    else:
        metrics = compute_metrics(task, predictions, examples)
    return Evaluation(task_metric=task.metric, task_score=metrics[task.metric], metrics=metrics,
                      density=meter.result() if meter else None, examples=len(examples), seconds=seconds,
                      predictions=predictions)


def perplexity_metrics(nll: float, tokens: int) -> dict[str, float]:
    """Perplexity, mean loss and token count from the summed next-token loss over `tokens` real tokens."""
    mean = nll / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean, "tokens": float(tokens)}


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy of predicting each real token from the ones before it, number of such tokens)."""
    targets = input_ids[:, 1:]
    counted = mask[:, 1:].bool() & mask[:, :-1].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return float(losses[counted].sum()), int(counted.sum())


def _text_to_text_batch(model, tokenizer, task: TaskSpec, examples: list[dict], batch: dict, meter: DensityMeter | None,
                        settings: EvalSettings) -> list[Any]:
    padding = "max_length" if settings.density_mode == "paper" else "longest"
    labels, decoder_mask = target_batch(tokenizer, task, examples, padding, settings.max_target_length)
    labels, decoder_mask = labels.to(batch["input_ids"].device), decoder_mask.to(batch["input_ids"].device)
    if meter:
        meter.set_token_mask("encoder", batch["attention_mask"])
        meter.set_token_mask("decoder", decoder_mask)
    max_new = max_answer_tokens(tokenizer, task, settings.max_target_length)
    if is_prompt_learning(model) or not _generate_takes_encoder_outputs(model):
        # Virtual tokens are added inside the peft wrapper's forward, so the encoder cannot be run apart;
        # adapters' T5 wraps forward(*args, **kwargs), and generate() then refuses precomputed encoder outputs.
        model(**batch, labels=labels, decoder_attention_mask=decoder_mask)
        ctx = meter.tap.paused("encoder", "decoder") if meter else nullcontext()
        with ctx:
            generated = model.generate(**batch, max_new_tokens=max_new)
    else:
        encoder_outputs = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True)
        model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"], labels=labels, decoder_attention_mask=decoder_mask)
        ctx = meter.tap.paused("encoder", "decoder") if meter else nullcontext()
        with ctx:
            generated = model.generate(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"], max_new_tokens=max_new)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [parse_t5_prediction(task, t) for t in texts]

