"""`deft`: Density-Efficient Fine-Tuning (Runwal, Pedapati, Chen: "From PEFT to DEFT").

A PEFT method (LoRA, QLoRA, IA3, prompt or prefix tuning through peft; the bottleneck adapter
through `adapters`) trains on the task loss plus `density_weight` times a density loss on the MLP
activations (see `deftcompress.density_loss`), so that fewer MLP activations are nonzero. With
`density_weight: 0` it is plain PEFT through exactly the same code (same data order, same
optimizer; the density loss is then only measured, outside the autograd graph).

Not peft's own `peft.tuners.deft`, an unrelated method that shares the name.

The adapter is saved in its library's format under the run's `passes/NN_deft/adapter/`; the model
handed to the next pass is the wrapped model (or the merged plain model with `merge: true`). The
run's final `model/` folder always reloads: see `deftcompress.peft_methods.save_for_reload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.config import PassConfig, option
from deftcompress.errors import RecipeError
from deftcompress.registry import Pass, register_pass

PROMPT_METHODS = ("prompt", "prefix")
MERGEABLE = ("lora", "qlora", "ia3")
TARGETED = ("lora", "qlora", "ia3")


@dataclass
class DeftConfig(PassConfig):
    method: Literal["lora", "qlora", "adapter", "prompt", "prefix", "ia3"] = option(
        "lora", "PEFT method: lora | qlora (4-bit nf4 base + LoRA) | adapter (bottleneck, adapters' SeqBnConfig) | "
                "prompt | prefix | ia3")
    r: int = option(8, "lora / qlora: rank")
    lora_alpha: float = option(16.0, "lora / qlora: scaling numerator (updates are scaled by alpha / r)")
    lora_dropout: float = option(0.0, "lora / qlora: dropout on the LoRA input")
    target_modules: list[str] | None = option(
        None, "lora / qlora / ia3: module-name suffixes to adapt; null = per family from the architecture table "
              "(query, value for LoRA; key, value for IA3; plus the MLP up-projection if target_mlp_up)")
    target_mlp_up: bool = option(True, "with target_modules null: also adapt the MLP up-projection, the layer that "
                                       "sets the pre-activations the density loss acts on")
    reduction_factor: int = option(16, "adapter: bottleneck size = hidden size / reduction_factor")
    num_virtual_tokens: int = option(20, "prompt / prefix: number of virtual tokens")
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
              "pressure is on and the base weights are float (not qlora)")
    activation_scale_lr: float = option(0.15, "learning rate of the scales' logarithms")
    activation_scale_min: float = option(1.0, "lower bound of every scale")
    density_grad: Literal["all", "scale_only"] = option(
        "scale_only", "with activation scales: scale_only = the density loss trains only the scales (the adapter and "
                      "head learn the task alone); all = it trains everything")
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
    merge: bool = option(False, "fold the adapter into the base weights after training (lora, qlora, ia3); the next "
                                "pass then gets a plain model")
    quantize_skip: list[str] = option(["classifier", "pooler", "score", "lm_head"],
                                      "qlora: Linear layers left unquantized (name components or 're:<regex>')")

    def check(self) -> str | None:
        m = self.method
        if self.merge and m not in MERGEABLE:
            return f"merge: true needs lora, qlora or ia3 ({m} cannot be folded into the weights)"
        if self.target_modules is not None and m not in TARGETED:
            return f"target_modules applies to lora, qlora and ia3, not to {m}"
        if self.target_modules is not None and not self.target_modules:
            return "target_modules must name at least one module (or be null for the default)"
        positive = {"r": self.r, "reduction_factor": self.reduction_factor, "num_virtual_tokens": self.num_virtual_tokens,
                    "epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                return f"{name} must be >= 1, got {value}"
        for name in ("max_steps", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"{name} must be >= 1 or null, got {value}"
        if self.max_seq_length is not None and self.max_seq_length < 8:
            return "max_seq_length must be >= 8 or null"
        if self.lora_alpha <= 0:
            return "lora_alpha must be > 0"
        if not 0 <= self.lora_dropout < 1:
            return "lora_dropout must be in [0, 1)"
        if self.learning_rate <= 0:
            return "learning_rate must be > 0"
        if self.mlp_bias_lr is not None and self.mlp_bias_lr <= 0:
            return "mlp_bias_lr must be > 0"
        if self.mlp_bias_lr is not None and not self.train_mlp_bias:
            return "mlp_bias_lr is set but train_mlp_bias is false"
        if not 0 <= self.warmup_ratio < 1:
            return "warmup_ratio must be in [0, 1)"
        if self.weight_decay < 0:
            return "weight_decay must be >= 0"
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            return "max_grad_norm must be > 0 or null"
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
        if self.activation_scale and self.method == "qlora":
            return "activation_scale cannot fold into 4-bit weights: set activation_scale: false (or null) for qlora"
        if self.activation_scale_lr <= 0 or self.activation_scale_min < 1:
            return "activation_scale_lr must be > 0 and activation_scale_min >= 1"
        if self.density_layer_weights is not None and (not self.density_layer_weights or min(self.density_layer_weights) < 0):
            return "density_layer_weights must be a non-empty list of weights >= 0"
        return None


@register_pass
class Deft(Pass):
    """DEFT fine-tuning: a PEFT method trained with an MLP activation density loss."""

    name = "deft"
    Config = DeftConfig
    trains = True
    summary = ("Density-Efficient Fine-Tuning: LoRA / QLoRA / adapter / prompt / prefix / IA3 trained with a loss that "
               "sparsifies MLP activations (density_weight 0 = plain PEFT).")

    @classmethod
    def check_plan(cls, plan, position, recipe) -> None:
        # An unmerged adapter stays on the model: a second PEFT pass cannot wrap it again.
        for earlier in plan[:position]:
            if earlier.name == cls.name and not earlier.config.merge:
                raise RecipeError(f"{plan[position].where}: {earlier.where} leaves a {earlier.config.method} adapter on "
                                  "the model; set merge: true there (lora, qlora, ia3) to train again")

    def run(self, state) -> dict[str, Any]:
        import torch

        from deftcompress import distributed
        from deftcompress.architecture import mlp_blocks
        from deftcompress.density_loss import DensityLoss, DensityLossSettings
        from deftcompress.peft_methods import PeftSettings, enable_mlp_bias, merge, save_adapter, save_for_reload, \
            trainable_parameter_count, wrap_model
        from deftcompress.training import TrainSettings, default_parameter_groups, train

        c = self.config
        density_mode = c.density_mode or state.recipe.density_mode
        torch.manual_seed(state.seed)  # same adapter initialisation for PEFT and DEFT runs of one recipe
        total_params = sum(p.numel() for p in state.model.parameters())
        notes: list[str] = []
        if c.method == "prompt" and state.arch.kind == "decoder" and state.tokenizer.padding_side != "left":
            # peft feeds embeddings, so a decoder classifier cannot find the last real token: it takes the last position
            state.tokenizer.padding_side = "left"
            notes.append("tokenizer padding side set to left (prompt tuning of a decoder-only classifier)")

        wrapped = wrap_model(state.model, state.arch, state.task, PeftSettings(
            method=c.method, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
            target_modules=tuple(c.target_modules) if c.target_modules else None, target_mlp_up=c.target_mlp_up,
            reduction_factor=c.reduction_factor, num_virtual_tokens=c.num_virtual_tokens,
            quantize_skip=tuple(c.quantize_skip)))
        model = wrapped.model
        notes += wrapped.notes
        state.model = model  # from here on the wrapped model is the pipeline's model
        trained_biases = enable_mlp_bias(model, state.arch) if c.train_mlp_bias else []
        groups = None
        if trained_biases and c.mlp_bias_lr is not None:
            groups = default_parameter_groups(model, c.weight_decay, {id(p): c.mlp_bias_lr for _, p in trained_biases})
        pressure = c.density_weight > 0
        use_scales = c.activation_scale if c.activation_scale is not None else (pressure and c.method != "qlora")
        scales = None
        if use_scales:
            from deftcompress.activation_scale import ActivationScales, ScaleFloor

            scales = ActivationScales(mlp_blocks(model, state.arch), min_scale=c.activation_scale_min)
            model.add_module("deftcompress_activation_scales", scales)  # its parameters train with the adapter
            scales.attach()
            lrs = {id(p): c.activation_scale_lr for p in scales.parameters()}
            lrs.update({id(p): c.mlp_bias_lr for _, p in trained_biases} if c.mlp_bias_lr is not None else {})
            groups = default_parameter_groups(model, c.weight_decay, lrs)
            state.constraints.append(ScaleFloor(scales))
        trainable = trainable_parameter_count(model)
        state.bind_constraints(model)

        settings = TrainSettings(
            epochs=c.epochs, max_steps=c.max_steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
            warmup_ratio=c.warmup_ratio, weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
            eval_every_epoch=c.eval_every_epoch, padding="max_length" if density_mode == "paper" else "longest",
            max_seq_length=c.max_seq_length or state.recipe.max_seq_length,
            max_target_length=state.eval_settings().max_target_length, seed=state.seed, desc=f"deft {c.method}")
        density = DensityLoss(mlp_blocks(model, state.arch), DensityLossSettings(
            kind=c.density_loss, mode=density_mode, weight=c.density_weight, eps=c.density_eps,
            eps_start=c.density_eps_start, temperature=c.preact_temperature, margin=c.preact_margin,
            zero_point=c.preact_zero_point, hinge_cap=c.hinge_cap, warmup_ratio=c.density_warmup_ratio,
            ramp_ratio=c.density_ramp_ratio,
            layer_weights=tuple(c.density_layer_weights) if c.density_layer_weights else None, target=c.density_target,
            controller_rate=c.density_controller_rate, lambda_max=c.density_lambda_max))
        if scales is not None and c.density_grad == "scale_only":
            density.pre_transform = scales.scale_only_gradient
        try:
            with density:
                result = train(state, model, state.examples("train", c.max_train_samples), settings, extra_loss=density,
                               parameter_groups=groups)
        finally:
            if scales is not None:
                state.constraints = [x for x in state.constraints if getattr(x, "scales", None) is not scales]
        model = result.model
        scale_details = None
        if scales is not None:
            # Fold exactly into the weights: the model keeps its architecture and saves as a plain checkpoint.
            scale_state = scales.state_for_saving()
            scale_details = scales.fold_into_weights()
            model._modules.pop("deftcompress_activation_scales", None)

        adapter_dir = state.pass_dir(self.name) / "adapter"
        if distributed.is_main_process():
            save_adapter(model, adapter_dir, trained_biases)
            if scales is not None:
                from safetensors.torch import save_file

                # The adapter was trained on scaled MLPs: these scales (already folded into model/) belong with it.
                save_file(scale_state, str(adapter_dir / "activation_scales.safetensors"))  # read by load_adapter_into
        distributed.barrier()
        if c.merge:
            model = merge(model)
        state.enforce_constraints(model)
        state.release_constraints(model)
        state.model = model
        # The pipeline's final save reads state.model at the end, whatever later passes made of it.
        state.artifacts["save_model"] = lambda folder: save_for_reload(state.model, folder)
        relative_adapter = adapter_dir.relative_to(state.work_dir)
        state.artifacts["deft"] = {"adapter_dir": adapter_dir, "method": c.method, "library": wrapped.library}

        details: dict[str, Any] = {
            "method": c.method,
            "library": wrapped.library,
            "target_modules": wrapped.target_modules,
            "trainable_params": trainable,
            "trainable_fraction": round(trainable / max(total_params, 1), 6),
            "density_loss": density.describe(),
            "train_mlp_bias": c.train_mlp_bias,
            "activation_scales": scale_details or False,
            **{k: v for k, v in result.to_dict().items() if k not in ("trainable_params", "notes")},
            "train_rows": len(state.examples("train", c.max_train_samples)),
            "batch_size": c.batch_size,
            "adapter_dir": str(relative_adapter),
            "merged": c.merge,
            "notes": notes + result.notes,
        }
        if wrapped.quantization:
            details["quantization"] = wrapped.quantization
        return details


__all__ = ["Deft", "DeftConfig"]
