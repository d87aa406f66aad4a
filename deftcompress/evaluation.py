"""Evaluation: task score and activation density from the same forward passes.

Classification (encoders, decoder-only with a classification head): one forward per batch gives
the logits and, through the density meter's hooks, the density. Text-to-text (T5): the encoder
runs once; its output feeds a teacher-forced decoder pass over the reference labels (decoder
density) and generation (the score; the meter is paused so generated steps are not counted).
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import ArchSpec, mlp_blocks
from .density import DensityMeter, DensityMode, DensityResult
from .tasks import TaskSpec, compute_metrics, parse_t5_prediction, t5_source, t5_target


@dataclass(frozen=True)
class EvalSettings:
    density_mode: DensityMode = "masked"
    density_tau: float = 0.01
    batch_size: int = 64
    max_seq_length: int = 128
    max_target_length: int = 32
    measure_density: bool = True


@dataclass
class Evaluation:
    task_metric: str
    task_score: float
    metrics: dict[str, float]
    density: DensityResult | None
    examples: int
    seconds: float
    predictions: list[Any] = field(default_factory=list, repr=False)

    @property
    def latency_ms_per_example(self) -> float:
        return 1000.0 * self.seconds / max(self.examples, 1)


def _encode_inputs(tokenizer, task: TaskSpec, examples: list[dict], max_len: int, text_to_text: bool) -> list[dict]:
    if text_to_text:
        enc = tokenizer([t5_source(task, ex) for ex in examples], truncation=True, max_length=max_len)
    else:
        a = [ex["text_a"] for ex in examples]
        b = [ex["text_b"] for ex in examples] if examples and examples[0]["text_b"] is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_len) if b is not None else tokenizer(a, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def _batches(features: list[dict], batch_size: int):
    # Length-sorted batches: little padding, so fast; order is restored when scoring.
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _pad(tokenizer, items: list[dict], paper_mode: bool, max_len: int) -> dict[str, torch.Tensor]:
    kwargs = {"padding": "max_length", "max_length": max_len} if paper_mode else {"padding": "longest"}
    return tokenizer.pad(items, return_tensors="pt", **kwargs)


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
    text_to_text = arch.kind == "encoder_decoder"
    paper = settings.density_mode == "paper"
    features = _encode_inputs(tokenizer, task, examples, settings.max_seq_length, text_to_text)
    meter = DensityMeter(mlp_blocks(model, arch), settings.density_mode, settings.density_tau) if settings.measure_density else None
    predictions: list[Any] = [None] * len(examples)
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex")
    try:
        if meter:
            meter.__enter__()
        for idx in _batches(features, settings.batch_size):
            batch = {k: v.to(device) for k, v in _pad(tokenizer, [features[i] for i in idx], paper, settings.max_seq_length).items()}
            if text_to_text:
                preds = _text_to_text_batch(model, tokenizer, task, [examples[i] for i in idx], batch, meter, settings)
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
    metrics = compute_metrics(task, predictions, examples)
    return Evaluation(task_metric=task.metric, task_score=metrics[task.metric], metrics=metrics,
                      density=meter.result() if meter else None, examples=len(examples), seconds=seconds,
                      predictions=predictions)


def _text_to_text_batch(model, tokenizer, task: TaskSpec, examples: list[dict], batch: dict, meter: DensityMeter | None,
                        settings: EvalSettings) -> list[Any]:
    paper = settings.density_mode == "paper"
    targets = tokenizer([t5_target(task, ex) for ex in examples], truncation=True, max_length=settings.max_target_length,
                        padding="max_length" if paper else "longest", return_tensors="pt")
    labels = targets["input_ids"].to(batch["input_ids"].device)
    decoder_mask = targets["attention_mask"].to(labels.device)
    labels = labels.masked_fill(decoder_mask == 0, -100)
    if meter:
        meter.set_token_mask("encoder", batch["attention_mask"])
        meter.set_token_mask("decoder", decoder_mask)
    max_new = settings.max_target_length if task.kind == "qa" else 8
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

