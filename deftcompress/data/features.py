"""The one tokenise / pad path of the toolkit: training, evaluation and pruning importance all use it.

    features = encode_inputs(tokenizer, task, arch, examples, max_seq_length)       # model inputs, unpadded
    batch = pad_inputs(tokenizer, features[:8], padding="longest", max_length=128)  # tensors
    train_features = encode_examples(tokenizer, task, arch, examples)               # + labels
    train_batch = collate(tokenizer, task, arch, train_features[:8])                # tensors, labels, token masks

Classification and regression: one or two text columns (`text_a`, `text_b`), labels as ints or
floats. Text-to-text families (the record's `text_to_text`, T5): `t5_source` -> `t5_target`, label
padding set to -100 so it does not count in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deftcompress.data.tasks import TaskSpec
from deftcompress.data.text_to_text import t5_source, t5_target
from deftcompress.errors import DataError

if TYPE_CHECKING:
    from deftcompress.architecture import ArchSpec


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the model's forward, labels included
    token_masks: dict[str, torch.Tensor]  # stack name -> [batch, seq] mask of real tokens
    size: int

    def to(self, device: torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()},
                          {k: v.to(device) for k, v in self.token_masks.items()}, self.size)


def encode_inputs(tokenizer, task: TaskSpec, arch: "ArchSpec", examples: list[dict], max_seq_length: int = 128) -> list[dict]:
    """Model inputs per example (unpadded): input ids, attention mask and, where the tokenizer makes them, token types."""
    if arch.text_to_text:
        enc = tokenizer([t5_source(task, ex) for ex in examples], truncation=True, max_length=max_seq_length)
    else:
        a = [ex["text_a"] for ex in examples]
        b = [ex["text_b"] for ex in examples] if examples and examples[0].get("text_b") is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length) if b is not None else \
            tokenizer(a, truncation=True, max_length=max_seq_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(examples))]


def length_sorted_batches(features: list[dict], batch_size: int):
    """Batches of example indices, shortest first: little padding, so fast; callers restore the order."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def calibration_inputs(tokenizer, task: TaskSpec, arch: "ArchSpec", examples: list[dict], batch_size: int,
                       max_seq_length: int, device) -> list[dict[str, torch.Tensor]]:
    """Padded model inputs of `examples` (no labels), shortest first: what calibrating passes run the model on."""
    features = encode_inputs(tokenizer, task, arch, examples, max_seq_length)
    return [{k: v.to(device) for k, v in pad_inputs(tokenizer, [features[i] for i in indices],
                                                     max_length=max_seq_length).items()}
            for indices in length_sorted_batches(features, batch_size)]


def pad_inputs(tokenizer, features: list[dict], padding: str = "longest", max_length: int = 128) -> dict[str, torch.Tensor]:
    """Pad features to the longest (`longest`) or to `max_length` (`max_length`, the DEFT paper's padding)."""
    kwargs = {"padding": "max_length", "max_length": max_length} if padding == "max_length" else {"padding": "longest"}
    return dict(tokenizer.pad(features, return_tensors="pt", **kwargs))


def target_batch(tokenizer, task: TaskSpec, examples: list[dict], padding: str = "longest",
                 max_target_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-text reference labels (-100 at padding) and the decoder's token mask, for teacher forcing."""
    targets = tokenizer([t5_target(task, ex) for ex in examples], truncation=True, max_length=max_target_length,
                        padding="max_length" if padding == "max_length" else "longest", return_tensors="pt")
    mask = targets["attention_mask"]
    return targets["input_ids"].masked_fill(mask == 0, -100), mask


def encode_examples(tokenizer, task: TaskSpec, arch: "ArchSpec", examples: list[dict], max_seq_length: int = 128,
                    max_target_length: int = 32) -> list[dict[str, Any]]:
    """Tokenised train features (unpadded): the model inputs of `encode_inputs`, and labels."""
    if not examples:
        raise DataError(f"{task.name}: no training examples")
    inputs = encode_inputs(tokenizer, task, arch, examples, max_seq_length)
    if task.kind == "language_modeling":  # labels are the inputs (the model shifts them); built at collate time
        return [{**f, "labels": None} for f in inputs]
    if arch.text_to_text:
        targets = tokenizer([t5_target(task, ex) for ex in examples], truncation=True, max_length=max_target_length)
        return [{**f, "labels": targets["input_ids"][i]} for i, f in enumerate(inputs)]
    return [{**f, "labels": ex["label"]} for f, ex in zip(inputs, examples)]


def collate(tokenizer, task: TaskSpec, arch: "ArchSpec", features: list[dict], padding: str = "longest",
            max_seq_length: int = 128, max_target_length: int = 32) -> Batch:
    """Pad a list of features into a batch; token masks per stack for losses that count real tokens."""
    inputs_only = [{k: v for k, v in f.items() if k != "labels"} for f in features]
    batch = pad_inputs(tokenizer, inputs_only, padding, max_seq_length)
    if arch.text_to_text:
        lengths = [len(f["labels"]) for f in features]
        width = max_target_length if padding == "max_length" else max(lengths)
        labels = torch.full((len(features), width), tokenizer.pad_token_id, dtype=torch.long)
        decoder_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
            decoder_mask[i, :len(f["labels"])] = 1
        batch["labels"] = labels.masked_fill(decoder_mask == 0, -100)  # padding does not count in the loss
        batch["decoder_attention_mask"] = decoder_mask
        masks = {"encoder": batch["attention_mask"], "decoder": decoder_mask}
    elif task.kind == "language_modeling":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # padding predicts nothing
        masks = {arch.stacks[0].name: batch["attention_mask"]}
    else:
        dtype = torch.float32 if task.kind == "regression" else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
        masks = {arch.stacks[0].name: batch["attention_mask"]}
    return Batch(inputs=batch, token_masks=masks, size=len(features))
