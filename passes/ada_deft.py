"""`ada_deft`: DEFT that also learns which whole MLP blocks to skip, and removes them for real.

Our reconstruction of the paper's ADA-DEFT ("layerwise learnable weights" to skip MLP blocks; no
formula is published): see docs/ada_deft.md. The same PEFT method, density loss and training as
`deft` (the same option groups, the same training code in `deftcompress.training.deft_run`), plus a
gate per MLP block and a budget (`deftcompress.training.block_gates`). Skipped blocks are removed
from the model (`deftcompress.architecture.skip`) and listed in the saved layout, so the saved
model holds no weights for them, reloads with them skipped and exports without their nodes.

The report lists the skipped blocks per stack and the learned weights and, with `measure_speed`,
the latency and memory of the model before and after the pass, measured in one process
(`deftcompress.measurement.speed`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from deftcompress.core.config import PassConfig
from deftcompress.core.protocol import Need, Pass, PassState
from deftcompress.core.registry import register_pass
from deftcompress.training.options import (AdaOptions, BudgetOptions, DensityOptions, PeftOptions, TrainingOptions,
                                           deft_leaves, deft_needs)


@dataclass
class AdaDeftConfig(BudgetOptions, AdaOptions, TrainingOptions, DensityOptions, PeftOptions, PassConfig):
    """DEFT's fields (PEFT method, density loss, training), the block weights and budget, the accuracy budget."""

    def problem(self) -> str | None:
        return (self.peft_problem() or self.density_problem(self.method) or self.training_problem()
                or self.ada_problem(self.method) or self.budget_problem(self.distill_from, self.max_train_samples)
                or (self.max_score_drop is not None and not self.skip_blocks
                    and "max_score_drop on ada_deft searches skip_blocks from the recipe's number down to 1: set "
                        "skip_blocks >= 1") or None)


@register_pass
class AdaDeft(Pass):
    """ADA-DEFT: DEFT plus a learned weight per MLP block; blocks pushed to 0 under the budget are removed."""

    name = "ada_deft"
    Config = AdaDeftConfig
    trains = True
    summary = ("ADA-DEFT: DEFT that learns a weight per MLP block under a budget (skip_blocks / skip_fraction / "
               "gate_penalty) and removes the skipped blocks; reports latency and memory before and after.")

    @classmethod
    def label(cls, config: AdaDeftConfig) -> str:
        budget = (f"skip{config.skip_blocks}" if config.skip_blocks is not None else
                  f"skip{config.skip_fraction:g}" if config.skip_fraction is not None else f"penalty{config.gate_penalty:g}")
        return f"ada_deft({config.method},{budget})"

    @classmethod
    def task_problem(cls, config, task) -> str | None:
        return config.budget_task_problem(task)

    @classmethod
    def leaves(cls, config: AdaDeftConfig) -> dict[str, str]:
        return deft_leaves(config)

    @classmethod
    def needs(cls, config: AdaDeftConfig) -> list[Need]:
        return deft_needs()

    def run(self, state: PassState) -> dict[str, Any]:
        from deftcompress.training.context import TrainingContext
        from deftcompress.training.deft_run import run_deft

        c = self.config
        before = copy.deepcopy(state.model) if c.measure_speed else None  # the previous step's model
        from deftcompress.training.score_budget import run_deft_within_budget

        ctx = TrainingContext.from_state(state, self.name)
        if c.max_score_drop is None:
            result = run_deft(ctx, c, c.gate_settings(), c.gate_lr)
        else:
            result = run_deft_within_budget(ctx, c, ada=True)
        state.model = result.model
        details = result.details
        if before is not None:
            details["speed"] = self._measure(state, before)
        return details

    def _measure(self, state: PassState, before) -> dict[str, Any]:
        """Latency and memory of the incoming model and of this pass's model, side by side in this process."""
        from deftcompress.measurement.speed import compare_speed
        from deftcompress.peft_methods.saving import merged_float_copy
        from deftcompress.peft_methods.wrapping import is_peft_model

        c = self.config
        after = state.model
        merged = is_peft_model(after) and not after.active_peft_config.is_prompt_learning
        if merged:  # the run's model/ holds the merged model: time what a user deploys
            after = merged_float_copy(after)
        settings = state.eval_settings()
        result = compare_speed({"previous step": before, "ada_deft": after}, state.tokenizer, state.task, state.arch,
                               state.eval_examples()[:c.speed_rows], batch_sizes=(1, settings.batch_size),
                               repeats=c.speed_repeats, max_seq_length=settings.max_seq_length,
                               max_target_length=settings.max_target_length, progress=not state.quiet)
        out = result.to_dict()
        out["timed"] = "the merged model (as saved in model/)" if merged else "the model as handed on"
        return out


__all__ = ["AdaDeft", "AdaDeftConfig"]
