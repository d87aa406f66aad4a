"""The DEFT density loss: a differentiable stand-in for the count of nonzero MLP activations.

Built on `density.ActivationTap` (the same hooks the density meter uses), so it reads the
architecture table and works on encoders, encoder-decoders and decoder-only models alike.

Per layer, a *term* maps (pre-activation x, activation a) to a value per feature, averaged over the
features; the layer value is its mean over the counted tokens. Layer values are averaged over the layers of
each stack, and the stacks are summed (T5: encoder term + decoder term), as in the paper's code.

Terms (``density_loss`` in a recipe; add more with `register_density_term`):

- ``paper``:  a^2 / (a^2 + eps) on the activation output (the paper; eps = 1e-7). Its gradient is
  about 2 eps / a^3, so it barely moves activations that are not already near zero.
- ``preact``: sigmoid((x - theta) / T) on the pre-activation, theta = the activation function's
  exact-zero point minus a margin (GELU in float32: x <= -5.5430 gives exactly 0; ReLU: 0). It
  pushes pre-activations under the point where the output is exactly zero.
- ``hinge``:  min(relu(x - theta), cap) / cap on the pre-activation.

Counting: ``masked`` (default) counts real tokens only; ``paper`` counts every position, padding
included, as the paper's code did. Weighting: a constant ``weight``, optionally zero for a task-only
warm-up and then ramped in linearly; or, with ``target`` set, a per-layer Lagrange multiplier that
rises while the layer's exact density on the training batch is above the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deftcompress.architecture import MLPBlock
from deftcompress.measurement.density import ActivationTap, align_token_mask
from deftcompress.errors import DeftcompressError
from deftcompress.training.options import DensityLossSettings  # noqa: F401  (the settings live with the options)


@dataclass
class TermContext:
    """What a term may read for the layer at hand."""

    eps: float
    threshold: float  # pre-activation value to push below
    temperature: float
    hinge_cap: float


DensityTerm = Callable[[torch.Tensor, torch.Tensor, TermContext], torch.Tensor]


class _SmoothCount(torch.autograd.Function):
    """mean over features of a^2 / (a^2 + eps), with a hand-written backward.

    Autograd would keep a^2 and a^2 + eps alive and make about twice as many passes over the
    activations; this keeps only `a` and recomputes: d/da = 2 a eps / (a^2 + eps)^2.
    """

    @staticmethod
    def forward(ctx, act: torch.Tensor, eps: float) -> torch.Tensor:
        squared = act * act
        ctx.save_for_backward(act)
        ctx.eps = eps
        return (squared / squared.add(eps)).mean(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (act,) = ctx.saved_tensors
        denominator = (act * act).add_(ctx.eps)
        denominator.mul_(denominator)
        grad_act = act.mul(2.0 * ctx.eps / act.shape[-1]).div_(denominator).mul_(grad.unsqueeze(-1))
        return grad_act, None


class _ScaleOnlySigmoidCount(torch.autograd.Function):
    """masked mean of sigmoid((z - theta) / T) over features and counted positions, gradient to the scales only.

    z = s * u is the scaled pre-activation, so dz/ds = z / s. The same value as the `preact` term on
    z.detach() * (s / s.detach()), fused: autograd walked about ten full-size tensors per layer and
    step; this makes three passes forward and three backward (its step-time cost: benchmarks/results/deft_step_breakdown.md).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor, threshold: float,
                temperature: float) -> torch.Tensor:
        # weights [batch, positions]: each counted position's share of the mean (sums to 1)
        sig = z.float().sub(threshold)
        if temperature != 1.0:
            sig.div_(temperature)
        sig.sigmoid_()
        ctx.save_for_backward(z, sig, scale, weights)
        ctx.temperature = temperature
        return torch.einsum("bpf,bp->", sig, weights.to(sig.dtype)) / z.shape[-1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, sig, scale, weights = ctx.saved_tensors
        # sigmoid' * z per element, in place: a fresh 4-byte-per-activation tensor costs more in page faults
        # on the CPU than the arithmetic
        slope = sig.addcmul_(sig, sig, value=-1.0).mul_(z)
        per_neuron = torch.einsum("bpf,bp->f", slope, weights.to(slope.dtype))
        grad_scale = per_neuron.div_(scale.float() * (ctx.temperature * z.shape[-1])).mul_(grad)
        return None, grad_scale.to(scale.dtype), None, None, None


def _position_weights(shape: torch.Size, mask: torch.Tensor | None, device) -> torch.Tensor:
    """[batch, positions] weights of a (masked) mean over positions."""
    if mask is None:
        return torch.full(shape, 1.0 / max(shape.numel(), 1), device=device)
    return mask / mask.sum().clamp(min=1.0)


def _paper_term(pre: torch.Tensor, act: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    return _SmoothCount.apply(act.float(), ctx.eps)


def _preact_term(pre: torch.Tensor, act: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    return torch.sigmoid((pre.float() - ctx.threshold) / ctx.temperature).mean(-1)


def _hinge_term(pre: torch.Tensor, act: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    return ((pre.float() - ctx.threshold).clamp(min=0.0, max=ctx.hinge_cap) / ctx.hinge_cap).mean(-1)


DENSITY_TERMS: dict[str, DensityTerm] = {"paper": _paper_term, "preact": _preact_term, "hinge": _hinge_term}


def register_density_term(name: str, term: DensityTerm) -> None:
    """Add a loss variant: `term(pre, act, ctx)` returns the mean over features per position ([batch, positions])."""
    DENSITY_TERMS[name] = term


def exact_zero_point(act_fn: torch.nn.Module, low: float = -128.0) -> float:
    """Largest x such that act_fn(t) == 0 exactly for every t <= x (float32); `low` if none is found above it.

    GELU (erf): -5.5430; tanh-GELU: -5.158; ReLU: 0; SiLU: about -88.7 (sigmoid underflow), which
    training cannot reach, so exact density of SiLU models hardly moves.
    """
    with torch.no_grad():
        xs = torch.linspace(low, 0.0, 2**17)
        nonzero = (act_fn(xs) != 0).nonzero()
        if len(nonzero) == 0:  # zero up to 0 at least (ReLU; a shifted ReLU beyond): find where it ends
            positive = torch.linspace(0.0, -low, 2**17)
            first = (act_fn(positive) != 0).nonzero()
            return float(positive[int(first[0]) - 1]) if len(first) and int(first[0]) > 0 else 0.0
        first = int(nonzero[0])
        if first == 0:
            return low
        lo, hi = float(xs[first - 1]), float(xs[first])
        step = hi - lo
        while not _zero_in_every_kernel(act_fn, lo):  # vectorised and scalar kernels can round differently
            lo, hi = lo - step, lo
            if lo < low:
                return low
        for _ in range(40):  # bisect the step between the last zero and the first nonzero
            mid = (lo + hi) / 2
            if _zero_in_every_kernel(act_fn, mid):
                lo = mid
            else:
                hi = mid
        return lo


def _zero_in_every_kernel(act_fn: torch.nn.Module, x: float) -> bool:
    """act_fn(x) == 0 whether x arrives alone (scalar kernel) or in a long tensor (SIMD kernel)."""
    probes = (torch.tensor(x), torch.tensor([x]), torch.full((67,), x))
    return all(bool((act_fn(p) == 0).all()) for p in probes)


class DensityLoss:
    """The density loss as a training-loop extra loss (see `training.ExtraLoss`).

    Use as a context manager around training: it hooks the MLP activations of `blocks` and, between
    `begin_step` and `end_step`, turns what it sees into one loss value. Outside a step (e.g. during
    evaluation) the hooks do nothing.
    """

    label = "density"

    def __init__(self, blocks: list[MLPBlock], settings: DensityLossSettings):
        if settings.kind not in DENSITY_TERMS:
            raise DeftcompressError(f"density_loss {settings.kind!r} is unknown (known: {', '.join(DENSITY_TERMS)})")
        if settings.layer_weights is not None and len(settings.layer_weights) != len(blocks):
            raise DeftcompressError(f"density_layer_weights has {len(settings.layer_weights)} values but the model has "
                                    f"{len(blocks)} MLP layers ({', '.join(b.label for b in blocks)})")
        self.blocks = blocks
        self.settings = settings
        self.term = DENSITY_TERMS[settings.kind]
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self.stacks = sorted({b.stack for b in blocks}, key=lambda s: [b.stack for b in blocks].index(s))
        # Per-layer pre-activation threshold: the activation's own exact-zero point (cached per function type).
        zero_points: dict[type, float] = {}
        self.thresholds = []
        for b in blocks:
            if settings.zero_point is not None:
                zp = settings.zero_point
            else:
                key = type(b.act)
                if key not in zero_points:
                    zero_points[key] = exact_zero_point(b.act)
                zp = zero_points[key]
            self.thresholds.append(zp - settings.margin)
        weights = list(settings.layer_weights or [1.0] * len(blocks))
        self.layer_weights = self._normalise_per_stack(weights)
        self.lambdas = torch.zeros(len(blocks))
        self.tap = ActivationTap(blocks, self._on_activation)
        self._active = False
        self._with_grad = True
        self._eps = settings.eps
        self._values: list[torch.Tensor | None] = [None] * len(blocks)
        self._densities: list[torch.Tensor | None] = [None] * len(blocks)
        self._masks: dict[str, torch.Tensor | None] = {}
        self._weight = settings.weight
        self._raw_value, self._term_value = float("nan"), 0.0  # last step's raw loss and added term (progress bar)
        # Optional block -> its per-neuron activation scales s: the density gradient then reaches only s
        # (set by DEFT with density_grad: scale_only; the preact term takes a fused path).
        self.scale_only: Callable[[MLPBlock], torch.Tensor] | None = None

    def _normalise_per_stack(self, weights: list[float]) -> list[float]:
        out = list(weights)
        for stack in self.stacks:
            idx = [i for i, b in enumerate(self.blocks) if b.stack == stack]
            total = sum(weights[i] for i in idx)
            for i in idx:
                out[i] = weights[i] / total if total > 0 else 0.0
        return out

    def __enter__(self) -> "DensityLoss":
        self.tap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tap.__exit__(*exc)

    # -- schedule ----------------------------------------------------------------------------

    def ramp(self, step: int, total_steps: int) -> float:
        """0 during the task-only warm-up, then rising linearly to 1 over ramp_ratio of the steps."""
        s = self.settings
        frac = step / max(total_steps, 1)
        if frac < s.warmup_ratio:
            return 0.0
        if s.ramp_ratio <= 0:
            return 1.0
        return min(1.0, (frac - s.warmup_ratio) / s.ramp_ratio)

    def eps_at(self, step: int, total_steps: int) -> float:
        """eps for this step: constant, or log-linear from eps_start down to eps over the density phase."""
        s = self.settings
        if s.eps_start is None:
            return s.eps
        span = max(1e-9, 1.0 - s.warmup_ratio)
        r = min(1.0, max(0.0, (step / max(total_steps, 1) - s.warmup_ratio) / span))
        return math.exp(math.log(s.eps_start) + r * (math.log(s.eps) - math.log(s.eps_start)))

    # -- per step ----------------------------------------------------------------------------

    def begin_step(self, token_masks: dict[str, torch.Tensor], step: int, total_steps: int) -> None:
        s = self.settings
        ramp = self.ramp(step, total_steps)
        self._weight = s.weight * ramp
        self._ramp = ramp
        self._eps = self.eps_at(step, total_steps)
        controlled = s.target is not None and ramp > 0 and s.weight > 0  # weight 0 = plain PEFT, target or not
        # With weight 0 the value is still computed (for the log) but kept out of the graph: same trajectory as plain PEFT.
        self._with_grad = self._weight > 0 or controlled
        self._masks = {} if s.mode == "paper" else dict(token_masks)
        self._values = [None] * len(self.blocks)
        self._densities = [None] * len(self.blocks)
        self._active = True

    def _on_activation(self, block: MLPBlock, pre: torch.Tensor, act: torch.Tensor) -> None:
        if not self._active:
            return
        i = self._index[id(block)]
        ctx = TermContext(eps=self._eps, threshold=self.thresholds[i], temperature=self.settings.temperature,
                          hinge_cap=self.settings.hinge_cap)
        mask = self._masks.get(block.stack)
        if mask is not None:
            mask = align_token_mask(mask, act.shape[-2]).to(act.device, torch.float32)
        with torch.set_grad_enabled(self._with_grad and torch.is_grad_enabled()):
            if self.scale_only is not None and self.term is _preact_term:
                weights = _position_weights(pre.shape[:-1], mask, pre.device)
                self._values[i] = _ScaleOnlySigmoidCount.apply(pre.detach(), self.scale_only(block), weights,
                                                               ctx.threshold, ctx.temperature)
            else:
                if self.scale_only is not None:  # same value, gradient to the scales only (dz/ds = z / s)
                    s = self.scale_only(block).to(pre.dtype)
                    pre = pre.detach() * (s / s.detach())
                per_position = self.term(pre, act, ctx)  # [batch, positions]: mean over features
                self._values[i] = _masked_mean(per_position, mask)
        with torch.no_grad():  # the controller's input, and the progress bar's batch density
            nonzero = torch.count_nonzero(act, dim=-1).float().div_(act.shape[-1])
            self._densities[i] = _masked_mean(nonzero, mask)

    def end_step(self) -> tuple[torch.Tensor | None, float]:
        """(weighted loss to add to the task loss, or None; raw loss value for the log)."""
        self._active = False
        s = self.settings
        seen = [i for i, v in enumerate(self._values) if v is not None]
        if not seen:
            return None, float("nan")
        raw = sum(self._stack_mean(stack, [1.0] * len(self.blocks)) for stack in self.stacks)
        raw_value = float(raw.detach())
        self._raw_value, self._term_value = raw_value, 0.0
        if not self._with_grad:
            return None, raw_value
        if s.target is not None:
            self._update_multipliers()
            weighted = s.weight * sum(self._stack_mean(stack, self.lambdas.tolist()) for stack in self.stacks)
        else:
            weighted = self._weight * raw
        self._term_value = float(weighted.detach())
        return weighted, raw_value

    def postfix(self) -> dict[str, str]:
        """For the progress bar, apart: the batch's exact density, the raw loss, and the term added to the task loss
        (which grows while the per-layer multipliers push a layer towards its target: not a divergence)."""
        seen = [float(d) for d in self._densities if d is not None]
        out = {"density": f"{sum(seen) / len(seen):.3f}"} if seen else {}
        out.update({"dloss": f"{self._raw_value:.4f}", "dterm": f"{self._term_value:.4f}"})
        return out

    def _stack_mean(self, stack: str, factors: list[float]) -> torch.Tensor:
        total = None
        for i, b in enumerate(self.blocks):
            if b.stack != stack or self._values[i] is None:
                continue
            term = self._values[i] * (self.layer_weights[i] * factors[i])
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def _update_multipliers(self) -> None:
        """Dual ascent: a layer's multiplier grows while its batch density is above the (ramped) target."""
        s = self.settings
        dens = torch.stack([d if d is not None else torch.tensor(1.0) for d in self._densities]).float().cpu()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process must apply the same weights: average the batch densities first
            torch.distributed.all_reduce(dens)
            dens /= torch.distributed.get_world_size()
        target = 1.0 - self._ramp * (1.0 - s.target)
        self.lambdas = (self.lambdas + s.controller_rate * (dens - target)).clamp(0.0, s.lambda_max)

    def state_dict(self) -> dict[str, Any]:
        """What a step checkpoint keeps: the per-layer multipliers (the rest follows from the step number)."""
        return {"lambdas": self.lambdas.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lambdas = state["lambdas"].to(self.lambdas.dtype).clone()

    def describe(self) -> dict:
        s = self.settings
        out = {"loss": s.kind, "mode": s.mode, "weight": s.weight}
        if s.kind == "paper":
            out.update(eps=s.eps, eps_start=s.eps_start)
        else:
            out.update(temperature=s.temperature, margin=s.margin,
                       thresholds=sorted({round(t, 4) for t in self.thresholds}))
        if s.warmup_ratio or s.ramp_ratio:
            out.update(warmup_ratio=s.warmup_ratio, ramp_ratio=s.ramp_ratio)
        if s.target is not None:
            out.update(target=s.target, controller_rate=s.controller_rate, final_multipliers=[round(x, 3) for x in self.lambdas.tolist()])
        if s.layer_weights is not None:
            out["layer_weights"] = list(s.layer_weights)
        return out


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def density_loss_value(activations: list[tuple[MLPBlock, torch.Tensor, torch.Tensor]], settings: DensityLossSettings,
                       token_masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The loss for given (block, pre, act) triples, without hooks (for checks and notebooks)."""
    blocks = [b for b, _, _ in activations]
    loss = DensityLoss(blocks, settings)
    loss.begin_step(token_masks or {}, step=0, total_steps=1)
    for b, pre, act in activations:
        loss._on_activation(b, pre, act)
    loss._active = False
    return sum(loss._stack_mean(stack, [1.0] * len(blocks)) for stack in loss.stacks)
