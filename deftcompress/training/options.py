"""Option groups that training passes share, and the settings objects they produce (torch-free).

`deft` composes the first three groups; `ada_deft` composes the same three plus `AdaOptions`, instead
of copying fields. Each group checks its own fields and turns them into the settings of the code it
configures (`PeftSettings` for `peft_methods.wrapping`, `DensityLossSettings` for
`training.density_loss`, `TrainSettings` for `training.loop`), so no pass copies options by hand.
Recipes keep the flat field names: a group is a set of fields, not a nested key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deftcompress.core.config import MAX_SEQ_LENGTH, option, out_of_range
from deftcompress.core.protocol import ADAPTER, QUANTIZED, SCALES_IN_WEIGHTS, Need
from deftcompress.core.selectors import kept_module_patterns, patterns_problem
from deftcompress.peft_methods.settings import MERGEABLE, METHODS, TARGETED, PeftSettings

# report_to: the experiment trackers accelerate logs to, and the package each needs
TRACKER_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
                                    "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


# ---- settings: what the training code reads ---------------------------------------------------

@dataclass(frozen=True)
class DensityLossSettings:
    kind: str = "paper"  # a key of DENSITY_TERMS
    mode: Literal["masked", "paper"] = "masked"
    weight: float = 1.0
    eps: float = 1e-7
    eps_start: float | None = None  # paper term: eps decays log-linearly from eps_start to eps
    temperature: float = 1.0  # preact term
    margin: float = 0.0  # preact / hinge: aim this far below the exact-zero point
    zero_point: float | None = None  # None: measured from each layer's activation function
    hinge_cap: float = 4.0
    warmup_ratio: float = 0.0  # fraction of steps trained on the task loss only
    ramp_ratio: float = 0.0  # fraction of steps over which the weight (or target) then ramps in
    layer_weights: tuple[float, ...] | None = None  # one per MLP block (encoder first); normalised per stack
    target: float | None = None  # per-layer multiplier controller: exact density target
    controller_rate: float = 1.0
    lambda_max: float = 100.0


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    max_steps: int | None = None  # if set: exactly this many optimizer steps, overriding epochs (as transformers' Trainer)
    batch_size: int = 32  # global batch, split across processes
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    eval_every_epoch: bool = True  # evaluate after each epoch (when >1 runs) and keep the best one
    padding: Literal["longest", "max_length"] = "longest"
    max_seq_length: int = 128
    max_target_length: int = 32
    seed: int = 42
    desc: str = "train"
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per optimizer step
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast through accelerate
    eval_steps: int | None = None  # evaluate on the held-out rows every N optimizer steps, keep the best
    save_steps: int | None = None  # a step checkpoint every N optimizer steps (where the context has a store)
    report_to: tuple[str, ...] = ()  # accelerate trackers (tensorboard, wandb, ...)
    distill_weight: float = 1.0  # weight of the teacher's term beside the task loss (read only when there is a teacher)
    distill_temperature: float = 2.0
    distill_features: float = 0.0  # weight of the teacher's layer-wise hidden-state term (SquareHead)
    # Keep-best considers only evaluations from this fraction of the steps on (DEFT: after the density ramp,
    # when the model is held to its target; an earlier, denser checkpoint would score better and undo DEFT)
    select_from_ratio: float = 0.0
    # ... and, with a density target, only evaluations whose held-out density is within the target (x 1.1): the
    # evaluation at the ramp's end can still be above it while the per-layer multipliers catch up
    select_max_density: float | None = None


@dataclass(frozen=True)
class GateSettings:
    """ADA-DEFT's block gates (see `deftcompress.training.block_gates`)."""

    skip_blocks: int | None = None  # budget: this many blocks per stack
    skip_fraction: float | None = None  # budget: this fraction of each stack's blocks (rounded down)
    penalty: float | None = None  # no budget: L1 weight on the gates, blocks under `threshold` skipped
    threshold: float = 0.1
    ramp_ratio: float = 0.3
    decision_ratio: float = 0.6
    controller_rate: float = 1.0
    lambda_max: float = 100.0

    def budget(self, blocks: int) -> int | None:
        """Blocks to skip in a stack of `blocks` (None in penalty mode)."""
        if self.skip_blocks is not None:
            return self.skip_blocks
        if self.skip_fraction is not None:
            return int(self.skip_fraction * blocks + 1e-9)
        return None

    @property
    def trains_gates(self) -> bool:
        return bool(self.skip_blocks or self.skip_fraction or self.penalty)


# ---- option groups: what recipes write --------------------------------------------------------


@dataclass
class PeftOptions:
    """Which PEFT method, on which modules, and whether it is merged afterwards."""

    method: Literal["lora", "qlora", "adapter", "prompt", "prefix", "ia3"] = option(
        "lora", "PEFT method: lora | qlora (4-bit nf4 base + LoRA) | adapter (bottleneck, adapters' SeqBnConfig) | "
                "prompt | prefix | ia3")
    r: int = option(8, "lora / qlora: rank")
    lora_alpha: float = option(16.0, "lora / qlora: scaling numerator (updates are scaled by alpha / r)")
    lora_dropout: float = option(0.0, "lora / qlora: dropout on the LoRA input")
    lora_plus_ratio: float | None = option(
        None, "lora / qlora: LoRA+ (Hayou et al., 2402.12354): LoRA's B matrices learn at learning_rate times this "
              "ratio (the paper suggests 16), A at learning_rate; null = one rate for both")
    target_modules: list[str] | None = option(
        None, "lora / qlora / ia3: module-name suffixes to adapt; null = per family from the architecture table "
              "(query, value for LoRA; key, value for IA3; plus the MLP up-projection if target_mlp_up)")
    target_mlp_up: bool = option(True, "with target_modules null: also adapt the MLP up-projection, the layer that "
                                       "sets the pre-activations the density loss acts on")
    reduction_factor: int = option(16, "adapter: bottleneck size = hidden size / reduction_factor")
    num_virtual_tokens: int = option(20, "prompt / prefix: number of virtual tokens")
    merge: bool = option(False, "fold the adapter into the base weights after training (lora, qlora, ia3); the next "
                                "pass then gets a plain model")
    quantize_skip: list[str] = option(
        kept_module_patterns(), "qlora: Linear layers left unquantized (selectors: class name, module-name component "
                                "or 're:<regex>'; default: every family's heads, pooler and LM head)")

    def peft_problem(self) -> str | None:
        m = self.method
        if self.merge and m not in MERGEABLE:
            return f"merge: true needs lora, qlora or ia3 ({m} cannot be folded into the weights)"
        if self.target_modules is not None and m not in TARGETED:
            return f"target_modules applies to lora, qlora and ia3, not to {m}"
        if self.target_modules is not None and not self.target_modules:
            return "target_modules must name at least one module (or be null for the default)"
        for name in ("r", "reduction_factor", "num_virtual_tokens"):
            if not 1 <= getattr(self, name) <= 4096:
                return f"{name} must be in [1, 4096], got {getattr(self, name)}"
        if self.lora_alpha <= 0:
            return "lora_alpha must be > 0"
        if not 0 <= self.lora_dropout < 1:
            return "lora_dropout must be in [0, 1)"
        if self.lora_plus_ratio is not None and (m not in ("lora", "qlora") or not 0 < self.lora_plus_ratio <= 1000):
            return ("lora_plus_ratio applies to lora and qlora" if m not in ("lora", "qlora")
                    else "lora_plus_ratio must be in (0, 1000]")
        return patterns_problem(self.quantize_skip, "quantize_skip")

    def peft_settings(self):
        return PeftSettings(method=self.method, r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=tuple(self.target_modules) if self.target_modules else None,
                            target_mlp_up=self.target_mlp_up, reduction_factor=self.reduction_factor,
                            num_virtual_tokens=self.num_virtual_tokens, quantize_skip=tuple(self.quantize_skip))


@dataclass
class DensityOptions:
    """The density loss, its schedule and controller, and the per-neuron activation scales."""

    density_weight: float = option(1.0, "weight of the density loss; 0 = plain PEFT through exactly the same code path")
    density_loss: Literal["paper", "preact", "hinge"] = option(
        "preact", "preact (default; with density_target and activation scales, the best measured: "
                  "benchmarks/results/deft_research.md): sigmoid((x - theta)/T) on the pre-activation, theta = the "
                  "activation's exact-zero point - preact_margin; paper: a^2/(a^2+eps) on the activation (the paper's "
                  "reference loss, with density_target null to reproduce it); hinge: "
                 "min(relu(x - theta), hinge_cap)/hinge_cap")
    density_eps: float = option(1.0e-7, "paper loss: eps (the paper used 1e-7)")
    density_eps_start: float | None = option(None, "paper loss: if set, eps decays log-linearly from this to density_eps")
    density_mode: Literal["masked", "paper"] | None = option(
        None, "masked: real tokens only; paper: padding counted and batches padded to max_seq_length (the paper's "
              "code); null = the recipe's density_mode")
    preact_temperature: float = option(1.0, "preact loss: temperature T of the sigmoid")
    preact_margin: float = option(0.0, "preact / hinge: aim this far below the exact-zero point")
    preact_zero_point: float | None = option(
        None, "preact / hinge: pre-activation at or below which the activation is exactly 0; null = measured "
              "(GELU -5.543, tanh-GELU -5.158, ReLU 0, SiLU -88.7)")
    hinge_cap: float = option(4.0, "hinge loss: cap of the hinge")
    density_warmup_ratio: float = option(0.0, "fraction of the steps trained on the task loss only, before the "
                                              "density weight rises")
    density_ramp_ratio: float = option(0.5, "after the warm-up: fraction of the steps over which the weight rises "
                                            "linearly from 0, or the density target falls from 1 (0 = at once)")
    density_target: float | None = option(
        0.38, "per-layer exact density to aim for: a multiplier per layer rises while the layer's density on the "
              "training batch is above the (ramped) target and scales the loss (times density_weight); null = a "
              "constant density_weight, as in the paper")
    density_controller_rate: float = option(1.0, "density_target: multiplier step per unit of density excess per step")
    density_lambda_max: float = option(100.0, "density_target: cap of each layer's multiplier")
    density_layer_weights: list[float] | None = option(
        None, "relative weight of each MLP layer (encoder layers first, then decoder); null = equal")
    train_mlp_bias: bool = option(False, "also train the MLP up-projection bias (a per-neuron threshold shift); "
                                         "BERT / RoBERTa only, T5 and Llama MLPs have no bias")
    mlp_bias_lr: float | None = option(None, "learning rate of the MLP biases (null = learning_rate)")
    activation_scale: bool | None = option(
        None, "train a per-neuron scale s >= 1 on each MLP's activation input (undone after the activation, folded "
              "into the weights at the end) so the frozen activation can reach exact zeros; null = on whenever density "
              "pressure is on")
    activation_scale_fold: Literal["weights", "activation", "module"] | None = option(
        None, "where the scales go after training: weights = s into the up-projection rows and 1/s into the "
              "down-projection columns (a stock checkpoint); activation = 1/s stays a per-neuron multiply after the "
              "activation (for int8: quantized weights and activations cannot hold a 1/s spread of ~1000); module = "
              "both stay beside the activation, act(s x) / s, and no weight changes (4-bit qlora weights); null = "
              "module for qlora, weights otherwise")
    activation_scale_lr: float = option(0.15, "learning rate of the scales' logarithms")
    activation_scale_min: float = option(1.0, "lower bound of every scale")
    density_grad: Literal["all", "scale_only"] = option(
        "scale_only", "with activation scales: scale_only = the density loss trains only the scales (the adapter and "
                      "head learn the task alone); all = it trains everything")

    def density_problem(self, method: str) -> str | None:
        if self.mlp_bias_lr is not None and self.mlp_bias_lr <= 0:
            return "mlp_bias_lr must be > 0"
        if self.mlp_bias_lr is not None and not self.train_mlp_bias:
            return "mlp_bias_lr is set but train_mlp_bias is false"
        if self.density_weight < 0:
            return "density_weight must be >= 0"
        if self.density_eps <= 0:
            return "density_eps must be > 0"
        if self.density_eps_start is not None and self.density_eps_start <= self.density_eps:
            return "density_eps_start must be larger than density_eps (eps decays from it)"
        if self.preact_temperature <= 0:
            return "preact_temperature must be > 0"
        if self.hinge_cap <= 0:
            return "hinge_cap must be > 0"
        if not (0 <= self.density_warmup_ratio <= 1 and 0 <= self.density_ramp_ratio <= 1):
            return "density_warmup_ratio and density_ramp_ratio must be in [0, 1]"
        if self.density_warmup_ratio + self.density_ramp_ratio > 1:
            return "density_warmup_ratio + density_ramp_ratio must be <= 1"
        if self.density_target is not None and not 0 <= self.density_target < 1:
            return "density_target must be in [0, 1)"
        if self.density_controller_rate <= 0 or self.density_lambda_max <= 0:
            return "density_controller_rate and density_lambda_max must be > 0"
        if method == "qlora" and self.activation_scale_fold in ("weights", "activation"):
            return (f"activation_scale_fold: {self.activation_scale_fold} puts the scales into the 4-bit weights, which "
                    "cannot hold them; use module (the default for qlora)")
        if self.activation_scale_lr <= 0 or self.activation_scale_min < 1:
            return "activation_scale_lr must be > 0 and activation_scale_min >= 1"
        if self.density_layer_weights is not None and (not self.density_layer_weights or min(self.density_layer_weights) < 0):
            return "density_layer_weights must be a non-empty list of weights >= 0"
        return None

    def uses_activation_scales(self) -> bool:
        """activation_scale null: on whenever there is density pressure."""
        if self.activation_scale is not None:
            return self.activation_scale
        return self.density_weight > 0

    def scale_fold(self, method: str) -> str:
        """Where the trained scales go: the recipe's choice, or module for 4-bit qlora bases and weights otherwise."""
        return self.activation_scale_fold or ("module" if method == "qlora" else "weights")

    def density_loss_settings(self, mode: str):
        return DensityLossSettings(
            kind=self.density_loss, mode=mode, weight=self.density_weight, eps=self.density_eps,
            eps_start=self.density_eps_start, temperature=self.preact_temperature, margin=self.preact_margin,
            zero_point=self.preact_zero_point, hinge_cap=self.hinge_cap, warmup_ratio=self.density_warmup_ratio,
            ramp_ratio=self.density_ramp_ratio,
            layer_weights=tuple(self.density_layer_weights) if self.density_layer_weights else None,
            target=self.density_target, controller_rate=self.density_controller_rate,
            lambda_max=self.density_lambda_max)


@dataclass
class TrainingOptions:
    """Optimisation: length, batch, AdamW and its schedule, epoch selection."""

    epochs: int = option(1, "training epochs")
    max_steps: int | None = option(None, "if set: exactly this many optimizer steps (overrides epochs)")
    max_train_samples: int | None = option(None, "train on a seeded random subset of this many training rows")
    batch_size: int = option(32, "global batch size (split across processes under torchrun)")
    learning_rate: float = option(5.0e-4, "peak AdamW learning rate (linear warm-up, then linear decay to 0)")
    warmup_ratio: float = option(0.06, "fraction of the steps in learning-rate warm-up")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (null = none)")
    eval_every_epoch: bool = option(True, "with more than one epoch: evaluate after each and keep the best epoch "
                                          "(the paper's code keeps the last)")
    max_seq_length: int | None = option(None, "truncation (and paper-mode padding) length; null = the recipe's")
    gradient_accumulation_steps: int = option(
        1, "micro-batches of batch_size per optimizer step (effective batch = batch_size x this)")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast through accelerate: bf16 (CPUs and recent GPUs) or fp16 (GPUs only)")
    validation_fraction: float | None = option(
        None, "hold out this fraction of the training rows (seeded) for the evaluations that choose anything during "
              "training (eval_steps, the best epoch); null = the best epoch is chosen on the recipe's evaluation rows")
    eval_steps: int | None = option(
        None, "evaluate on the held-out rows every N optimizer steps and keep the best weights (needs "
              "validation_fraction)")
    save_steps: int | None = option(
        50, "every N optimizer steps, a step checkpoint of the running training (trainable weights, optimizer, "
            "schedule position, random state, loss controllers; one kept, replaced atomically, dropped when the pass "
            "ends): a run stopped inside this pass (Ctrl-C, SIGTERM, SIGKILL, a crash) resumes from it with the same "
            "numbers; null = resume only at pass boundaries")
    report_to: list[str] = option([], "experiment trackers through accelerate (tensorboard, wandb, mlflow, ...): "
                                      "losses every step, evaluations; logs under the pass's folder")
    distill_from: str | None = option(
        None, "knowledge distillation: a model fine-tuned on the same task with the same tokenizer (a run's model/ "
              "folder, a checkpoint folder or hub id) whose logits the trained model also learns to match; each step "
              "runs it once more, without gradients; reference = the max_score_drop reference; null = none")
    distill_weight: float = option(1.0, "distill_from: weight of T^2 KL(teacher || model) (regression: squared "
                                        "difference) beside the task loss")
    distill_temperature: float = option(2.0, "distill_from: softmax temperature T of both logits")
    distill_features: float = option(
        0.0, "distill_from: weight of a layer-wise feature term beside the logits' (SquareHead: per layer, the squared "
             "difference of the hidden states over real tokens divided by the teacher's own mean square, averaged "
             "over layers); the teacher needs the trained model's depth and widths; 0 = logits only")

    def training_problem(self) -> str | None:
        for name, top in (("epochs", 10_000), ("batch_size", 65_536)):
            if not 1 <= getattr(self, name) <= top:
                return f"{name} must be in [1, {top}], got {getattr(self, name)}"
        for name in ("max_steps", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 10**9:
                return f"{name} must be in [1, 10**9] or null, got {value}"
        bounded = out_of_range("max_seq_length", self.max_seq_length, MAX_SEQ_LENGTH, nullable=True)
        if bounded:
            return bounded
        if self.learning_rate <= 0:
            return "learning_rate must be > 0"
        if not 0 <= self.warmup_ratio < 1:
            return "warmup_ratio must be in [0, 1)"
        if self.weight_decay < 0:
            return "weight_decay must be >= 0"
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            return "max_grad_norm must be > 0 or null"
        if not 1 <= self.gradient_accumulation_steps <= 4096:
            return "gradient_accumulation_steps must be in [1, 4096]"
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            return "validation_fraction must be in (0, 1) or null"
        if self.save_steps is not None and not 1 <= self.save_steps <= 10**9:
            return f"save_steps must be in [1, 10**9] or null, got {self.save_steps}"
        if self.eval_steps is not None and (self.eval_steps < 1 or self.validation_fraction is None):
            return "eval_steps needs validation_fraction (evaluations that choose weights use held-out training rows)"
        unknown = [t for t in self.report_to if t not in TRACKER_PACKAGES]
        if unknown:
            return f"report_to: unknown tracker {unknown[0]!r} (known: {', '.join(sorted(TRACKER_PACKAGES))})"
        if not 0 <= self.distill_weight <= 1000:
            return "distill_weight must be in [0, 1000]"
        if not 0 < self.distill_temperature <= 100:
            return "distill_temperature must be in (0, 100]"
        if not 0 <= self.distill_features <= 1000:
            return "distill_features must be in [0, 1000]"
        if self.distill_features > 0 and self.distill_from is None:
            return "distill_features needs distill_from (the teacher whose hidden states are matched)"
        if self.distill_from is not None and self.distill_from != REFERENCE:  # checked by BudgetOptions
            from deftcompress.core.model_refs import resolve_saved_model_ref
            from deftcompress.errors import DeftcompressError

            try:  # a missing teacher is a recipe error, found before anything runs
                resolve_saved_model_ref(self.distill_from, "distill_from")
            except DeftcompressError as exc:
                return str(exc)
        return None

    def train_settings(self, *, padding: str, max_seq_length: int, max_target_length: int, seed: int, desc: str):
        return TrainSettings(epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
                             learning_rate=self.learning_rate, warmup_ratio=self.warmup_ratio,
                             weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                             eval_every_epoch=self.eval_every_epoch, padding=padding,
                             max_seq_length=self.max_seq_length or max_seq_length,
                             max_target_length=max_target_length, seed=seed, desc=desc,
                             gradient_accumulation_steps=self.gradient_accumulation_steps,
                             mixed_precision=self.mixed_precision, eval_steps=self.eval_steps,
                             save_steps=self.save_steps, report_to=tuple(self.report_to),
                             distill_weight=self.distill_weight,
                             distill_temperature=self.distill_temperature, distill_features=self.distill_features)


REFERENCE = "reference"  # distill_from: reference = learn from the budget's reference (BudgetOptions)


@dataclass
class BudgetOptions:
    """An accuracy budget: the most compression whose held-out score stays within it (`training.score_budget`)."""

    max_score_drop: float | None = option(
        None, "accuracy budget, in points of the task metric (x100 for accuracy / F1; perplexity: percent above the "
              "reference): train a reference, then search the compression (deft: budget_density_targets; ada_deft: "
              "skip_blocks down to 1) and keep the most compressed model whose score on held-out training rows "
              "(validation_fraction, 0.1 if unset) stays within it; the reference if none does; null = no budget")
    budget_reference: str | None = option(
        None, "max_score_drop: what the budget is measured against: null = PEFT trained here first (same method, "
              "steps, data order and seed, no density loss, no skipped blocks); or a finished model (a run's model/ "
              "folder, a checkpoint folder or hub id) fine-tuned on the same task, scored on the same held-out rows")
    budget_held_out_samples: int | None = option(
        None, "max_score_drop: score the search on this many rows of the training split that the training never "
              "sees (drawn, seeded, from beyond max_train_samples, which must be set), so the trainings keep all "
              "their rows and the budget is judged on enough rows to resolve it (a 1-point budget wants a few "
              "thousand); null = validation_fraction of the training rows (0.1 if unset)")
    budget_held_out_min_words: int | None = option(
        None, "budget_held_out_samples: draw them only among rows of at least this many words (whitespace-split, "
              "both texts of a pair), so the budget is judged on rows like the ones the model will read when the "
              "training split holds shorter pieces (SST-2's training rows are parse-tree phrases, median 7 words, "
              "its sentences about 20); null = any row")

    budget_confidence: float | None = option(
        None, "max_score_drop: a point is within the budget only when this one-sided bound of its drop is (e.g. 0.9: "
              "the 90th percentile of a paired bootstrap over the held-out rows), so a drop the rows cannot tell "
              "from the budget does not pass; null = the measured drop itself. The bootstrap's standard error is "
              "reported either way (classification, regression and QA tasks)")

    def budget_task_problem(self, task) -> str | None:
        if self.budget_confidence is not None and task.kind == "language_modeling":
            return (f"budget_confidence bootstraps per-row scores; task {task.name} is scored by perplexity over all "
                    "tokens (leave budget_confidence null)")
        return None

    def budget_problem(self, distill_from: str | None, max_train_samples: int | None) -> str | None:
        if self.max_score_drop is not None and not 0 <= self.max_score_drop <= 100:
            return f"max_score_drop must be in [0, 100] points, got {self.max_score_drop}"
        if self.budget_confidence is not None:
            if self.max_score_drop is None:
                return "budget_confidence is set but max_score_drop is not (it bounds the budget's drop)"
            if not 0.5 <= self.budget_confidence < 1:
                return f"budget_confidence must be in [0.5, 1), got {self.budget_confidence}"
        if self.budget_held_out_samples is not None:
            if self.max_score_drop is None:
                return "budget_held_out_samples is set but max_score_drop is not (they are the budget's rows)"
            if self.budget_held_out_samples < 1:
                return f"budget_held_out_samples must be >= 1, got {self.budget_held_out_samples}"
            if max_train_samples is None:
                return ("budget_held_out_samples draws rows the training does not use: set max_train_samples "
                        "(or leave it null and use validation_fraction)")
        if self.budget_held_out_min_words is not None:
            if self.budget_held_out_samples is None:
                return ("budget_held_out_min_words chooses among budget_held_out_samples' rows; set "
                        "budget_held_out_samples too")
            if self.budget_held_out_min_words < 1:
                return f"budget_held_out_min_words must be >= 1, got {self.budget_held_out_min_words}"
        if self.budget_reference is not None and self.max_score_drop is None:
            return "budget_reference is set but max_score_drop is not (the reference measures a budget)"
        if distill_from == REFERENCE and self.max_score_drop is None:
            return "distill_from: reference learns from the budget's reference; set max_score_drop"
        if self.budget_reference is not None:
            from deftcompress.core.model_refs import resolve_saved_model_ref
            from deftcompress.errors import DeftcompressError

            try:
                resolve_saved_model_ref(self.budget_reference, "budget_reference")
            except DeftcompressError as exc:
                return str(exc)
        return None


@dataclass
class AdaOptions:
    """ADA-DEFT: a learned weight per MLP block, a budget that pushes weights to 0, and the skip decision."""

    skip_blocks: int | None = option(
        None, "budget: MLP blocks to skip per stack (encoder and decoder apart); 0 = keep all (the result equals DEFT)")
    skip_fraction: float | None = option(None, "budget: fraction of each stack's MLP blocks to skip (rounded down)")
    gate_penalty: float | None = option(
        None, "no fixed budget: weight of an L1 penalty on the block weights; blocks under skip_threshold are skipped")
    skip_threshold: float = option(0.1, "gate_penalty: block weights below this are skipped at the decision step")
    gate_lr: float = option(0.05, "learning rate of the block weights (each starts at 1, kept in [0, 1])")
    gate_ramp_ratio: float = option(
        0.3, "fraction of the steps over which the budget's pressure ramps in (the allowed sum of the weights of a "
             "stack's k lowest blocks falls from k to 0), or the penalty weight rises from 0")
    gate_decision_ratio: float = option(
        0.6, "after this fraction of the steps the skipped blocks are fixed (weight 0) and the rest of training lets "
             "the task loss recover without them")
    gate_controller_rate: float = option(1.0, "budget: multiplier step per unit of excess block weight per step")
    gate_lambda_max: float = option(100.0, "budget: cap of each stack's multiplier")
    measure_speed: bool = option(
        True, "measure latency (batch 1 and eval_batch_size) and memory of the model before and after this pass in "
              "one process, alternating (keeps a copy of the incoming model during the pass)")
    speed_rows: int = option(64, "measure_speed: evaluation rows in the fixed timing workload")
    speed_repeats: int = option(5, "measure_speed: repetitions (the median is reported)")

    def ada_problem(self, method: str) -> str | None:
        budgets = [n for n in ("skip_blocks", "skip_fraction", "gate_penalty") if getattr(self, n) is not None]
        if len(budgets) != 1:
            return ("set exactly one of skip_blocks, skip_fraction or gate_penalty" if not budgets else
                    f"set only one of {', '.join(budgets)}")
        if self.skip_blocks is not None and self.skip_blocks < 0:
            return "skip_blocks must be >= 0"
        if self.skip_fraction is not None and not 0 <= self.skip_fraction < 1:
            return "skip_fraction must be in [0, 1)"
        if self.gate_penalty is not None and self.gate_penalty < 0:
            return "gate_penalty must be >= 0"
        if not 0 < self.skip_threshold < 1:
            return "skip_threshold must be in (0, 1)"
        if self.gate_lr <= 0 or self.gate_controller_rate <= 0 or self.gate_lambda_max <= 0:
            return "gate_lr, gate_controller_rate and gate_lambda_max must be > 0"
        if not (0 <= self.gate_ramp_ratio <= self.gate_decision_ratio < 1):
            return "need 0 <= gate_ramp_ratio <= gate_decision_ratio < 1"
        if method in ("qlora", "adapter"):
            why = ("4-bit base weights cannot absorb the learned block weights" if method == "qlora" else
                   "bottleneck adapters sit inside the MLP output, so a skipped block would drop them")
            return f"method {method} cannot be used with ADA-DEFT: {why}; use lora, ia3, prompt or prefix"
        if not 1 <= self.speed_rows <= 100_000 or not 1 <= self.speed_repeats <= 1000:
            return "speed_rows must be in [1, 100000] and speed_repeats in [1, 1000]"
        return None

    def gate_settings(self) -> GateSettings:
        return GateSettings(skip_blocks=self.skip_blocks, skip_fraction=self.skip_fraction, penalty=self.gate_penalty,
                            threshold=self.skip_threshold, ramp_ratio=self.gate_ramp_ratio,
                            decision_ratio=self.gate_decision_ratio, controller_rate=self.gate_controller_rate,
                            lambda_max=self.gate_lambda_max)


# ---- plan facts of a DEFT training (shared by `deft` and `ada_deft`) -----------------------------

def deft_leaves(config) -> dict[str, str]:
    facts = {} if config.merge else {ADAPTER: f"a {config.method} adapter"}
    if config.uses_activation_scales() and config.scale_fold(config.method) == "weights":
        facts[SCALES_IN_WEIGHTS] = "per-neuron activation scales folded into the weights (up to ~1000x apart)"
    return facts


def deft_needs() -> list[Need]:
    return [
        # An unmerged adapter stays on the model: a second PEFT pass cannot wrap it again.
        Need(ADAPTER, False, "{here}: {earlier} leaves {note} on the model; set merge: true there (lora, qlora, ia3) "
                             "to train again"),
        Need(QUANTIZED, False, "{here}: cannot train after {earlier} ({note}); train first, then quantize"),
    ]
