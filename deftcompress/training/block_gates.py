"""ADA-DEFT's learned block weights: one gate per MLP block, a budget that pushes gates to 0, the skip decision.

Our reconstruction (the paper publishes no formula; see docs/ada_deft.md). Each MLP block's output is
multiplied by a gate g in [0, 1] (a forward hook on its down-projection, so the family's residual
add and norm stay as they are). Gates start at 1 and train with the PEFT parameters:

- budget (`skip_blocks` / `skip_fraction`, k per stack): the k lowest gates of the stack at each
  step are the candidates; their allowed sum falls from k to 0 over `ramp_ratio` of the steps, and
  a multiplier per stack rises while their sum is above it and scales `lambda * mean(candidates)`.
  The other gates feel no pressure and stay near 1, so the choice is nearly binary when it is made.
  Gates are clamped to [0, 1] and start at 1, so the first gates under 1 are those the task loss
  itself pushes down: the blocks it needs least become the first candidates;
- penalty (`penalty`): a constant L1 weight, ramped in, no budget.

At `decision_ratio` of the steps the skips are fixed: the k lowest gates of each stack (budget), or
every gate under `threshold` (penalty), are set to 0 for good; training goes on so the task loss
recovers without those blocks. `GateRange` (a `Constraint` of this training) keeps gates in [0, 1] after every
optimizer step. Afterwards `finish` folds each kept gate into its down-projection's weights and the
caller removes the skipped blocks (`deftcompress.architecture.skip`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from deftcompress.architecture import MLPBlock
from deftcompress.core.protocol import Constraint
from deftcompress.errors import DeftcompressError
from deftcompress.training.options import GateSettings


class BlockGates(nn.Module):
    """A gate per MLP block, scaling the block's output; `keep` (a buffer) is 0 for blocks decided skipped."""

    def __init__(self, blocks: list[MLPBlock], trainable: bool):
        super().__init__()
        self.labels = [b.label for b in blocks]
        self.stacks = [b.stack for b in blocks]
        self._downs = [b.down for b in blocks]
        self.values = nn.Parameter(torch.ones(len(blocks), device=_device(blocks)), requires_grad=trainable)
        self.register_buffer("keep", torch.ones(len(blocks), device=_device(blocks)))
        self._hooks: list = []

    def attach(self) -> None:
        self.detach()
        self._hooks = [down.register_forward_hook(partial(self._scale, i)) for i, down in enumerate(self._downs)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _scale(self, i: int, module, inputs, output):
        return output * (self.values[i] * self.keep[i]).to(output.dtype)

    def stack_indices(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, stack in enumerate(self.stacks):
            out.setdefault(stack, []).append(i)
        return out

    @torch.no_grad()
    def clamp_(self) -> None:
        self.values.clamp_(0.0, 1.0)

    def skipped_labels(self) -> list[str]:
        return [label for label, k in zip(self.labels, self.keep.tolist()) if k == 0]

    @torch.no_grad()
    def finish(self) -> dict[str, Any]:
        """Stop scaling; fold each kept gate into its down-projection; returns what was learned and decided."""
        from deftcompress.architecture.skip import scale_block_output_

        self.detach()
        self.clamp_()
        values = self.values.tolist()
        for down, value, keep in zip(self._downs, values, self.keep.tolist()):
            if keep and value != 1.0:
                scale_block_output_(down, value)
        learned = {label: round(v, 4) for label, v in zip(self.labels, values)}
        skipped = self.skipped_labels()
        per_stack = {stack: {"blocks": len(idx), "skipped": [self.labels[i] for i in idx if self.labels[i] in skipped]}
                     for stack, idx in self.stack_indices().items()}
        return {"learned_weights": learned, "skipped": skipped, "per_stack": per_stack,
                "folded_into": "down-projection weights and bias of each kept block"}


def _device(blocks: list[MLPBlock]) -> torch.device:
    for p in blocks[0].down.parameters():
        return p.device
    return torch.device("cpu")


class GateRange(Constraint):
    """Keeps the block gates in [0, 1] after every optimizer step (binds only the pass that trains them)."""

    name = "block_gate_range"

    def __init__(self, gates: BlockGates):
        self.gates = gates

    def enforce(self, model) -> None:
        self.gates.clamp_()


class GateBudget:
    """The term that pushes gates down (an `ExtraLoss` of the training loop), and the skip decision."""

    label = "gates"

    def __init__(self, gates: BlockGates, settings: GateSettings):
        self.gates, self.settings = gates, settings
        self.stacks = gates.stack_indices()
        self.budgets = {s: settings.budget(len(idx)) for s, idx in self.stacks.items()}
        for stack, k in self.budgets.items():
            if k is not None and k >= len(self.stacks[stack]):
                raise DeftcompressError(f"ada_deft: cannot skip {k} of the {len(self.stacks[stack])} MLP blocks of the "
                                        f"{stack} stack; keep at least one")
        self.multipliers = {s: 0.0 for s in self.stacks}
        self.decided_at: int | None = None
        self._progress = 0.0

    def begin_step(self, token_masks, step: int, total_steps: int) -> None:
        s = self.settings
        if self.decided_at is None and step >= s.decision_ratio * total_steps:
            self.decide(step)
        self._progress = 1.0 if s.ramp_ratio == 0 else min(1.0, step / (s.ramp_ratio * total_steps))

    def end_step(self) -> tuple[torch.Tensor | None, float]:
        g = self.gates.values * self.gates.keep
        mean_gate = float(g.detach().mean())
        if self.decided_at is not None or not self.gates.values.requires_grad:
            return None, mean_gate
        term = None
        for stack, idx in self.stacks.items():
            k = self.budgets[stack]
            if k is None:  # penalty mode: L1 on every gate of the stack
                pushed = g[idx]
                weight = (self.settings.penalty or 0.0) * self._progress
            elif k == 0:
                continue
            else:  # budget: only the k lowest gates (the candidates) are pushed, the others feel no pressure
                lowest = sorted(idx, key=lambda i: float(g[i].detach()))[:k]
                pushed = g[lowest]
                allowed = k * (1.0 - self._progress)
                excess = (float(pushed.detach().sum()) - allowed) / k
                weight = min(max(self.multipliers[stack] + self.settings.controller_rate * excess, 0.0),
                             self.settings.lambda_max)
                self.multipliers[stack] = weight
            if weight:
                part = pushed.mean() * weight
                term = part if term is None else term + part
        return term, mean_gate

    @torch.no_grad()
    def decide(self, step: int) -> None:
        """Fix the skipped blocks: gate 0 for good; the others keep training without pressure."""
        self.decided_at = step
        values = self.gates.values.detach().clamp(0, 1)
        for stack, idx in self.stacks.items():
            k = self.budgets[stack]
            if k is None:
                chosen = [i for i in idx if float(values[i]) < self.settings.threshold]
            else:
                chosen = sorted(idx, key=lambda i: (float(values[i]), i))[:k]
            for i in chosen:
                self.gates.keep[i] = 0.0

    def state_dict(self) -> dict[str, Any]:
        """What a step checkpoint keeps: the skip decisions, the controller's multipliers and when it decided."""
        return {"keep": self.gates.keep.clone(), "multipliers": dict(self.multipliers), "decided_at": self.decided_at}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gates.keep.copy_(state["keep"])
        self.multipliers = {s: float(state["multipliers"][s]) for s in self.stacks}
        self.decided_at = state["decided_at"]

    def describe(self) -> dict[str, Any]:
        return {"budget_per_stack": self.budgets, "multipliers": {s: round(m, 4) for s, m in self.multipliers.items()},
                "decided_at_step": self.decided_at}


class CombinedLoss:
    """Several `ExtraLoss` terms as one (the loop takes one); the progress bar shows each raw value apart."""

    def __init__(self, *losses):
        self.losses = losses
        self.label = losses[0].label
        self._raw: list[float] = []

    def begin_step(self, token_masks, step: int, total_steps: int) -> None:
        for loss in self.losses:
            loss.begin_step(token_masks, step, total_steps)

    def end_step(self) -> tuple[torch.Tensor | None, float]:
        total, self._raw = None, []
        for loss in self.losses:
            term, raw = loss.end_step()
            self._raw.append(raw)
            if term is not None:
                total = term if total is None else total + term
        return total, self._raw[0]

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}.{k}": v for i, loss in enumerate(self.losses) if hasattr(loss, "state_dict")
                for k, v in loss.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, loss in enumerate(self.losses):
            if hasattr(loss, "load_state_dict"):
                loss.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})

    def postfix(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for loss, raw in zip(self.losses, self._raw):
            out.update(loss.postfix() if hasattr(loss, "postfix") else {loss.label: f"{raw:.4f}"})
        return out
