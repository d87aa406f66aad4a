"""`deft`: Density-Efficient Fine-Tuning (Runwal, Pedapati, Chen: "From PEFT to DEFT").

A PEFT method (LoRA, QLoRA, IA3, prompt or prefix tuning through peft; the bottleneck adapter
through `adapters`) trains on the task loss plus `density_weight` times a density loss on the MLP
activations (see `deftcompress.training.density_loss`), so that fewer MLP activations are nonzero. With
`density_weight: 0` it is plain PEFT through exactly the same code (same data order, same
optimizer; the density loss is then only measured, outside the autograd graph).

Not peft's own `peft.tuners.deft`, an unrelated method that shares the name.

The adapter is saved in its library's format under the run's `passes/NN_deft/adapter/`; the model
handed to the next pass is the wrapped model (or the merged plain model with `merge: true`). The
run's final `model/` folder always reloads: see `deftcompress.models.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deftcompress.core.config import PassConfig
from deftcompress.core.protocol import ADAPTER, QUANTIZED, SCALES_IN_WEIGHTS, Need, Pass
from deftcompress.core.registry import register_pass
from deftcompress.training.options import DensityOptions, PeftOptions, TrainingOptions


@dataclass
class DeftConfig(TrainingOptions, DensityOptions, PeftOptions, PassConfig):
    """PEFT method, density loss and training options (fields in that order; see `deftcompress passes`)."""

    def problem(self) -> str | None:
        return self.peft_problem() or self.density_problem(self.method) or self.training_problem()


@register_pass
class Deft(Pass):
    """DEFT fine-tuning: a PEFT method trained with an MLP activation density loss."""

    name = "deft"
    Config = DeftConfig
    trains = True
    summary = ("Density-Efficient Fine-Tuning: LoRA / QLoRA / adapter / prompt / prefix / IA3 trained with a loss that "
               "sparsifies MLP activations (density_weight 0 = plain PEFT).")

    @classmethod
    def leaves(cls, config: DeftConfig) -> dict[str, str]:
        facts = {} if config.merge else {ADAPTER: f"a {config.method} adapter"}
        if config.uses_activation_scales(config.method) and config.activation_scale_fold == "weights":
            facts[SCALES_IN_WEIGHTS] = "per-neuron activation scales folded into the weights (up to ~1000x apart)"
        return facts

    @classmethod
    def needs(cls, config: DeftConfig) -> list[Need]:
        return [
            # An unmerged adapter stays on the model: a second PEFT pass cannot wrap it again.
            Need(ADAPTER, False, "{here}: {earlier} leaves {note} on the model; set merge: true there (lora, qlora, ia3) "
                                 "to train again"),
            Need(QUANTIZED, False, "{here}: cannot train after {earlier} ({note}); train first, then quantize"),
        ]

    def run(self, state) -> dict[str, Any]:
        import torch

        from deftcompress.architecture import mlp_blocks
        from deftcompress.peft_methods.wrapping import enable_mlp_bias, trainable_parameter_count, wrap_model
        from deftcompress.training.density_loss import DensityLoss
        from deftcompress.training.loop import train

        c = self.config
        density_mode = c.density_mode or state.recipe.density_mode
        torch.manual_seed(state.seed)  # same adapter initialisation for PEFT and DEFT runs of one recipe
        total_params = sum(p.numel() for p in state.model.parameters())
        notes: list[str] = []
        side = state.arch.prompt_tuning_padding_side
        if c.method == "prompt" and side and state.tokenizer.padding_side != side:
            state.tokenizer.padding_side = side
            notes.append(f"tokenizer padding side set to {side} (prompt tuning of a {state.arch.family} classifier)")

        wrapped = wrap_model(state.model, state.arch, state.task, c.peft_settings())
        model = state.model = wrapped.model  # from here on the wrapped model is the pipeline's model
        notes += wrapped.notes
        trained_biases = enable_mlp_bias(model, state.arch) if c.train_mlp_bias else []
        scales, floor = self._attach_scales(state, model) if c.uses_activation_scales(c.method) else (None, None)
        groups = self._parameter_groups(model, trained_biases, scales)
        trainable = trainable_parameter_count(model)
        state.bind_constraints(model)

        train_rows = state.examples("train", c.max_train_samples)
        settings = c.train_settings(padding="max_length" if density_mode == "paper" else "longest",
                                    max_seq_length=state.recipe.max_seq_length,
                                    max_target_length=state.eval_settings().max_target_length, seed=state.seed,
                                    desc=f"deft {c.method}")
        density = DensityLoss(mlp_blocks(model, state.arch), c.density_loss_settings(density_mode))
        if scales is not None and c.density_grad == "scale_only":
            density.pre_transform = scales.scale_only_gradient
        try:
            with density:
                result = train(state, model, train_rows, settings, extra_loss=density, parameter_groups=groups)
        finally:
            if floor is not None:  # the scales are folded below: their floor binds nothing after this pass
                state.constraints.remove(floor)
        model = result.model
        scale_state, scale_details = None, None
        if scales is not None:
            # Fold exactly into the weights: the model keeps its architecture and saves as a plain checkpoint.
            scale_state = scales.state_for_saving()
            scale_details = scales.fold_into_weights(model, separate_inverse=c.activation_scale_fold == "activation")
            scale_details["fold"] = c.activation_scale_fold
            model._modules.pop("deftcompress_activation_scales", None)
        adapter_dir = self._save_adapter(state, model, trained_biases, scale_state)
        if c.merge:
            from deftcompress.peft_methods.wrapping import merge

            model = merge(model)
        state.enforce_constraints(model)
        state.release_constraints(model)
        state.model = model

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
            "train_rows": len(train_rows),
            "batch_size": c.batch_size,
            "adapter_dir": str(adapter_dir.relative_to(state.work_dir)),
            "merged": c.merge,
            "notes": notes + result.notes,
        }
        if wrapped.quantization:
            details["quantization"] = wrapped.quantization
        return details

    def _attach_scales(self, state, model):
        """Per-neuron activation scales, trained with the adapter; a constraint keeps them >= their floor."""
        from deftcompress.architecture import mlp_blocks
        from deftcompress.training.activation_scale import ActivationScales, ScaleFloor

        scales = ActivationScales(mlp_blocks(model, state.arch), min_scale=self.config.activation_scale_min)
        model.add_module("deftcompress_activation_scales", scales)  # its parameters train with the adapter
        scales.attach()
        floor = ScaleFloor(scales)
        state.constraints.append(floor)
        return scales, floor

    def _parameter_groups(self, model, trained_biases, scales):
        """AdamW groups when some parameters have their own learning rate (MLP biases, activation scales)."""
        from deftcompress.training.loop import default_parameter_groups

        c = self.config
        rates: dict[int, float] = {}
        if scales is not None:
            rates.update({id(p): c.activation_scale_lr for p in scales.parameters()})
        if c.mlp_bias_lr is not None:
            rates.update({id(p): c.mlp_bias_lr for _, p in trained_biases})
        return default_parameter_groups(model, c.weight_decay, rates) if rates else None

    def _save_adapter(self, state, model, trained_biases, scale_state):
        """The adapter in its library's format under passes/NN_deft/adapter/, with the scales it was trained on."""
        from deftcompress.peft_methods.saving import save_adapter
        from deftcompress.training import distributed
        from deftcompress.training.activation_scale import SAVED_SCALES_FILE

        adapter_dir = state.pass_dir(self.name) / "adapter"
        if distributed.is_main_process():
            save_adapter(model, adapter_dir, trained_biases)
            if scale_state is not None:
                from safetensors.torch import save_file

                # Trained on scaled MLPs: these scales (already folded into the model) belong with the adapter.
                save_file(scale_state, str(adapter_dir / SAVED_SCALES_FILE))  # read by load_adapter_into
        distributed.barrier()
        return adapter_dir


__all__ = ["Deft", "DeftConfig"]
