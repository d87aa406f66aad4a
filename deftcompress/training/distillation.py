"""Knowledge distillation beside the task loss: the trained model also learns to match a teacher's logits,
and optionally its hidden states layer by layer.

DEFT's density pressure costs task score; a fine-tuned dense model of the same task (the PEFT run, or
any checkpoint with the same tokenizer and labels) knows the answers the sparse model drifts from.
The term is Hinton's: T^2 KL(softmax(teacher / T) || softmax(model / T)) for classification, the
squared difference of the predictions for regression; for language modelling the same KL over the
next-token distribution at every real token, averaged over those tokens (a dense teacher, e.g. the
model before activation cutoffs, tells the sparse one what it predicted). The teacher runs without gradients on the
same batch, so a step costs one more forward pass.

The feature term (`distill_features`) is SquareHead's (Kurtic et al., 2310.06927, who found logit
distillation alone diverges at high sparsity): for every layer's hidden state, the squared difference
to the teacher's over real tokens, divided by the teacher's own mean square there, averaged over the
layers. It hands the sparse model a target for every layer, not only for its last logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from deftcompress.errors import DeftcompressError

if TYPE_CHECKING:
    from deftcompress.training.context import TrainingContext

TASK_KINDS = ("classification", "regression", "language_modeling")  # heads whose logits the term compares


def load_teacher(ctx: "TrainingContext", ref: str, where: str = "deft: distill_from") -> nn.Module:
    """The teacher model, frozen, on the training's device; a one-line error when it cannot teach this task."""
    from deftcompress.core.model_refs import resolve_saved_model_ref
    from deftcompress.models.formats import load_model

    task = ctx.task
    if task.kind not in TASK_KINDS:
        raise DeftcompressError(f"{where}: distillation compares classification, regression or next-token logits; "
                                f"task {task.name} is {task.kind}")
    path = resolve_saved_model_ref(ref, where, trust_pickle=ctx.trust_pickle)
    teacher, tokenizer, _ = load_model(path, task=None, device=ctx.device)  # its own trained head
    if task.kind == "language_modeling":
        if not type(teacher).__name__.endswith("ForCausalLM"):
            raise DeftcompressError(f"{where}: {ref} is not a causal language model ({type(teacher).__name__}); "
                                    "a language-modelling student learns from next-token logits")
    elif getattr(teacher.config, "num_labels", None) != task.num_labels:
        labels = getattr(teacher.config, "num_labels", None)
        raise DeftcompressError(f"{where}: {ref} predicts {labels} labels, task {task.name} has "
                                f"{task.num_labels}; the teacher must be fine-tuned on the same task")
    if tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise DeftcompressError(f"{where}: {ref} has another tokenizer than the model trained; its logits would "
                                "answer other inputs")
    return frozen(teacher)


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter that trains: a teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_outputs(teacher: nn.Module, inputs: dict[str, torch.Tensor], hidden_states: bool = False):
    """The teacher's output on the batch, without gradients (with every layer's hidden state if asked)."""
    with torch.no_grad():
        return teacher(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=hidden_states)


def hidden_states_of(output) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden state of a model output (encoder then decoder for encoder-decoder models)."""
    states = getattr(output, "hidden_states", None)
    if states is None:
        states = (getattr(output, "encoder_hidden_states", None) or ()) + (getattr(output, "decoder_hidden_states", None) or ())
    return tuple(states or ())


def feature_term(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                 token_mask: torch.Tensor | None) -> torch.Tensor:
    """SquareHead: mean over layers of sum_tokens |h_s - h_t|^2 / sum_tokens |h_t|^2, over real tokens only.
    The embeddings' output (layer 0) is left out: the trained model shares it with the teacher."""
    if len(student) != len(teacher):
        raise DeftcompressError(f"distill_features: the teacher has {len(teacher) - 1} layers and the trained model "
                                f"{len(student) - 1}; feature distillation pairs layers one to one")
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        if s.shape != t.shape:
            raise DeftcompressError(f"distill_features: hidden states of shape {tuple(s.shape)} against the teacher's "
                                    f"{tuple(t.shape)}; the teacher must have the trained model's widths")
        mask = token_mask[..., None].to(s.dtype) if token_mask is not None and token_mask.shape == s.shape[:2] else 1.0
        t = t.float()
        terms.append(((s.float() - t) ** 2 * mask).sum() / (t ** 2 * mask).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distillation_term(logits: torch.Tensor, target: torch.Tensor, temperature: float, regression: bool,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 KL(teacher || model) at temperature T, mean over the batch (regression: mean squared difference); logits
    per token ([batch, tokens, vocabulary]): the mean over the real tokens of `token_mask`."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), target.float().squeeze(-1))
    t = temperature
    if logits.dim() == 3:
        per_token = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(target.float() / t, dim=-1),
                             log_target=True, reduction="none").sum(-1)
        mask = token_mask.to(per_token.dtype) if token_mask is not None else torch.ones_like(per_token)
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0) * (t * t)
    return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(target.float() / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)
