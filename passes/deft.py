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
from deftcompress.core.protocol import Need, Pass, PassState
from deftcompress.core.registry import register_pass
from deftcompress.training.options import DensityOptions, PeftOptions, TrainingOptions, deft_leaves, deft_needs


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
    def label(cls, config: DeftConfig) -> str:
        return f"{'deft' if config.density_weight else 'peft'}({config.method})"

    @classmethod
    def leaves(cls, config: DeftConfig) -> dict[str, str]:
        return deft_leaves(config)

    @classmethod
    def needs(cls, config: DeftConfig) -> list[Need]:
        return deft_needs()

    def run(self, state: PassState) -> dict[str, Any]:
        from deftcompress.training.context import TrainingContext
        from deftcompress.training.deft_run import run_deft

        result = run_deft(TrainingContext.from_state(state, self.name), self.config)
        state.model = result.model
        return result.details


__all__ = ["Deft", "DeftConfig"]
