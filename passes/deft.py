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

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import Need, Pass, PassState
from deftcompress.core.registry import register_pass
from deftcompress.training.options import (BudgetOptions, DensityOptions, PeftOptions, TrainingOptions, deft_leaves,
                                           deft_needs)


@dataclass
class DeftConfig(BudgetOptions, TrainingOptions, DensityOptions, PeftOptions, PassConfig):
    """PEFT method, density loss, training options and the accuracy budget (fields in that order)."""

    budget_density_targets: list[float] = option(
        [0.2, 0.3, 0.38, 0.5, 0.7], "max_score_drop: the density targets searched (by bisection, lowest first; about "
                                    "log2(n) + 1 trainings besides the reference)")

    def problem(self) -> str | None:
        return (self.peft_problem() or self.density_problem(self.method) or self.training_problem()
                or self.budget_problem(self.distill_from, self.max_train_samples) or self._search_problem())

    def _search_problem(self) -> str | None:
        if self.max_score_drop is None:
            return None
        if self.density_weight == 0:
            return "max_score_drop searches density targets: density_weight must be > 0"
        if not self.budget_density_targets or not all(0 < t < 1 for t in self.budget_density_targets):
            return "budget_density_targets must be a non-empty list of densities in (0, 1)"
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
    def label(cls, config: DeftConfig) -> str:
        return f"{'deft' if config.density_weight else 'peft'}({config.method})"

    @classmethod
    def task_problem(cls, config, task) -> str | None:
        return config.budget_task_problem(task)

    @classmethod
    def leaves(cls, config: DeftConfig) -> dict[str, str]:
        return deft_leaves(config)

    @classmethod
    def needs(cls, config: DeftConfig) -> list[Need]:
        return deft_needs()

    def run(self, state: PassState) -> dict[str, Any]:
        from deftcompress.training.context import TrainingContext
        from deftcompress.training.deft_run import run_deft
        from deftcompress.training.score_budget import run_deft_within_budget

        ctx = TrainingContext.from_state(state, self.name)
        if self.config.max_score_drop is None:
            result = run_deft(ctx, self.config)
        else:
            result = run_deft_within_budget(ctx, self.config)
        state.model = result.model
        return result.details


__all__ = ["Deft", "DeftConfig"]
