"""`relufy`: replace the MLP activation with ReLU or a shifted ReLU, so activations can be exactly zero.

GELU's exact zeros need pre-activations below -5.54 and SiLU's below -88.7 (float32), so GELU and
SiLU models stay almost fully dense however they are trained; ReLU is zero for every negative input
("ReLU Strikes Back", ProSparse, TurboSparse). Without training, 12-26% of MiniLM's GELU inputs are
positive per layer, so the density falls at once and the task score with it: a training pass (DEFT)
afterwards recovers it. The change is recorded in the saved config (see
`deftcompress.architecture.activation`), so the model reloads with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import Pass
from deftcompress.core.registry import register_pass


@dataclass
class RelufyConfig(PassConfig):
    activation: Literal["relu", "shifted_relu"] = option(
        "relu", "relu: max(x, 0) (stock configs can name it: the model reloads with plain transformers); "
                "shifted_relu: x if x > threshold else 0 (FATReLU; reloads through deftcompress)")
    threshold: float = option(0.0, "shifted_relu: the threshold (>= 0); activations at or below it are exactly 0")

    def problem(self) -> str | None:
        if self.activation == "relu" and self.threshold != 0:
            return "threshold applies to activation: shifted_relu (relu is exactly max(x, 0))"
        if self.threshold < 0 or self.threshold > 100:
            return "threshold must be in [0, 100]"
        return None


@register_pass
class Relufy(Pass):
    name = "relufy"
    Config = RelufyConfig
    summary = "Replace every MLP activation (the gate's, in gated MLPs) with ReLU or a shifted ReLU, recorded in the config."

    @classmethod
    def label(cls, config: RelufyConfig) -> str:
        return "relu" if config.activation == "relu" else f"relu>{config.threshold:g}"

    def run(self, state) -> dict[str, Any]:
        from deftcompress.architecture.activation import replace_activations

        return replace_activations(state.model, self.config.activation, self.config.threshold, state.arch)


__all__ = ["Relufy", "RelufyConfig"]
