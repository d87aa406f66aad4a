"""`evaluate`: measure task score and activation density of the current model.

The pipeline measures after every pass anyway; this pass exists to measure with other settings
(paper-mode density, another tau, more rows) or to mark a point in the recipe. When the model did
not change and the settings are the same, the previous measurement is reused, not repeated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import Pass
from deftcompress.core.registry import register_pass


@dataclass
class EvaluateConfig(PassConfig):
    density_mode: Literal["masked", "paper"] | None = option(None, "override the recipe's density_mode for this measurement")
    density_tau: float | None = option(None, "override the recipe's density_tau")
    eval_batch_size: int | None = option(None, "override the recipe's eval_batch_size")


@register_pass
class Evaluate(Pass):
    name = "evaluate"
    Config = EvaluateConfig
    changes_model = False
    summary = "Measure task score and MLP activation density (per layer, encoder/decoder) of the current model."

    def eval_settings(self, base):
        c = self.config
        changes = {k: v for k, v in (("density_mode", c.density_mode), ("density_tau", c.density_tau),
                                      ("batch_size", c.eval_batch_size)) if v is not None}
        return dataclasses.replace(base, **changes)

    def run(self, state) -> dict:
        return {}
