"""Knowledge distillation beside the task loss: the trained model also learns to match a teacher's logits.

DEFT's density pressure costs task score; a fine-tuned dense model of the same task (the PEFT run, or
any checkpoint with the same tokenizer and labels) knows the answers the sparse model drifts from.
The term is Hinton's: T^2 KL(softmax(teacher / T) || softmax(model / T)) for classification, the
squared difference of the predictions for regression. The teacher runs without gradients on the
same batch, so a step costs one more forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from deftcompress.errors import DeftcompressError

if TYPE_CHECKING:
    from deftcompress.training.context import TrainingContext

TASK_KINDS = ("classification", "regression")  # heads whose logits the term compares


def load_teacher(ctx: "TrainingContext", ref: str) -> nn.Module:
    """The teacher model, frozen, on the training's device; a one-line error when it cannot teach this task."""
    from deftcompress.core.model_refs import resolve_saved_model_ref
    from deftcompress.models.formats import load_model

    where = "deft: distill_from"
    task = ctx.task
    if task.kind not in TASK_KINDS:
        raise DeftcompressError(f"{where}: distillation compares classification or regression logits; task "
                                f"{task.name} is {task.kind}")
    path = resolve_saved_model_ref(ref, where, trust_pickle=ctx.trust_pickle)
    teacher, tokenizer, _ = load_model(path, task=None, device=ctx.device)  # its own trained head
    labels = getattr(teacher.config, "num_labels", None)
    if labels != task.num_labels:
        raise DeftcompressError(f"{where}: {ref} predicts {labels} labels, task {task.name} has "
                                f"{task.num_labels}; the teacher must be fine-tuned on the same task")
    if tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise DeftcompressError(f"{where}: {ref} has another tokenizer than the model trained; its logits would "
                                "answer other inputs")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_logits(teacher: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def distillation_term(logits: torch.Tensor, target: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """T^2 KL(teacher || model) at temperature T, mean over the batch (regression: mean squared difference)."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), target.float().squeeze(-1))
    t = temperature
    return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(target.float() / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)
