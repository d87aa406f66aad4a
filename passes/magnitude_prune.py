"""`magnitude_prune`: zero the smallest-magnitude weights, and keep them zero through later passes.

Unstructured pruning: each targeted module's `weight` keeps its shape; the chosen entries become
exact zeros. `scope: global` ranks all targeted weights together (one threshold), `scope: layer`
prunes the same fraction of every weight matrix. Exactly round(sparsity * n) entries are zeroed
(ties at the threshold are broken by position), so the achieved sparsity is the requested one.

The pass leaves a `ZeroMaskConstraint` in `state.constraints`. A later training pass binds it
after wrapping the model, enforces it after every optimizer step and releases it at the end:

- trainable (full fine-tuning) weights are re-masked after every step; every masked weight is
  re-masked at bind and at release (so a merge done before the release is caught);
- LoRA (peft) on a masked layer: the effective weight is W + s*B@A, and B@A is dense, so during
  training the masked part of the delta is subtracted in the layer's forward (hooks on the LoRA
  layer and its `lora_A`), and at release the masked delta is folded into the base weight and B
  zeroed. A LoRA delta restricted to a sparsity pattern is no longer low-rank, so it cannot stay a
  separate adapter; an adapter a training pass saved before the release holds the unmasked delta.
  The masked delta costs one extra dense matmul per adapted layer (about 1.3x step time for
  MiniLM with query, value and intermediate.dense adapted);
- IA3, bottleneck adapters, prompt and prefix tuning never change masked entries (IA3 scales whole
  rows or columns); a merge after training is re-masked by `enforce`/`release` as well.

Storage stays dense: the report's size on disk does not shrink, only the nonzero count does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import ADAPTER, ZERO_MASK, Constraint, Need, Pass
from deftcompress.core.registry import register_constraint, register_pass
from deftcompress.core.selectors import kept_module_patterns, patterns_problem
from deftcompress.errors import DeftcompressError


class PruningError(DeftcompressError):
    """The model cannot be pruned as configured, or a pruning mask no longer fits the model."""


@dataclass
class MagnitudePruneConfig(PassConfig):
    sparsity: float = option(0.5, "fraction of the targeted weights set to zero (0 <= sparsity < 1)")
    scope: Literal["global", "layer"] = option(
        "global", "global: one magnitude threshold over all targeted weights; layer: every weight matrix loses `sparsity` of its entries")
    targets: list[str] = option(["Linear"], "modules whose `weight` is pruned: selectors (class names such as Linear, "
                                            "module-name components, or 're:<regex>' on full module names)")
    ignore: list[str] = option(kept_module_patterns(), "modules never pruned, same syntax (default: every family's "
                                                       "task heads, pooler and LM head)")

    def problem(self) -> str | None:
        if not 0.0 <= self.sparsity < 1.0:
            return f"sparsity must be in [0, 1), got {self.sparsity}"
        if not self.targets:
            return "targets: give at least one class name or 're:<regex>'"
        return patterns_problem(self.targets, "targets") or patterns_problem(self.ignore, "ignore")


@register_pass
class MagnitudePrune(Pass):
    name = "magnitude_prune"
    Config = MagnitudePruneConfig
    summary = "Unstructured magnitude pruning (global or per layer); pruned weights stay zero through later training."

    @classmethod
    def leaves(cls, config) -> dict[str, str]:
        return {ZERO_MASK: "a mask of zeroed weights"}

    @classmethod
    def needs(cls, config) -> list[Need]:
        return super().needs(config) + [
            Need(ADAPTER, False, "{here}: {earlier} leaves its adapter on the model, so the pruned weights would not be "
                                 "the ones the model computes with; prune before it, or set merge: true there"),
        ]

    @classmethod
    def label(cls, config) -> str:
        return f"prune{round(100 * config.sparsity)}"

    def run(self, state) -> dict[str, Any]:
        import torch

        c = self.config
        model = state.model
        from deftcompress.peft_methods.wrapping import is_wrapped

        if is_wrapped(model):
            raise PruningError("magnitude_prune: the model carries a PEFT adapter; merge it first (merge: true on the training pass)")
        t0 = time.perf_counter()
        weights = targeted_weights(model, c.targets, c.ignore)
        if not weights:
            raise PruningError(f"magnitude_prune: targets {c.targets} (minus ignore {c.ignore}) matched no module with a weight")
        already_zero = sum(_zeros(w) for w in weights.values())
        with torch.no_grad():
            keep = magnitude_masks(weights, c.sparsity, c.scope)
            for name, w in weights.items():
                w.mul_(keep[name])
        constraint = _merge_into_existing(state, keep)
        targeted = sum(w.numel() for w in weights.values())
        zeros = sum(_zeros(w) for w in weights.values())
        per_module = {name: round(_zeros(keep[name]) / w.numel(), 6) for name, w in weights.items()}
        return {
            "sparsity_requested": c.sparsity,
            "sparsity_achieved": round(zeros / targeted, 6),
            "scope": c.scope,
            "targeted_modules": len(weights),
            "targeted_params": targeted,
            "zero_params": zeros,
            "already_zero_before": already_zero,
            "per_module_sparsity": per_module,
            "constraint": constraint.describe(),
            "prune_seconds": round(time.perf_counter() - t0, 3),
            "note": "weights are stored dense: size on disk is unchanged; later passes keep the zeros (see constraint)",
        }


def targeted_weights(model, targets: list[str], ignore: list[str]) -> dict[str, Any]:
    """Module name -> `weight` tensor of every matching module; a tied weight is listed once (first name)."""
    import torch

    from deftcompress.core.selectors import select_modules
    from deftcompress.quantization.bnb import is_bnb_weight

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in select_modules(model, targets, ignore):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or id(weight) in seen:
            continue
        if is_bnb_weight(weight):
            raise PruningError(f"magnitude_prune: {name} is bitsandbytes-quantized; prune before quantizing")
        seen.add(id(weight))
        out[name] = weight.data
    return out


def magnitude_masks(weights: dict[str, Any], sparsity: float, scope: str) -> dict[str, Any]:
    """Keep-masks (bool, same shapes) zeroing exactly round(sparsity * n) smallest |w| per scope."""
    import torch

    if scope == "layer":
        return {name: _keep_all_but_lowest(w.abs().flatten().float(), round(sparsity * w.numel())).view_as(w)
                for name, w in weights.items()}
    scores = torch.cat([w.abs().flatten().float() for w in weights.values()])
    keep_flat = _keep_all_but_lowest(scores, round(sparsity * scores.numel()))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep_flat[start:start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def _keep_all_but_lowest(scores, k: int):
    """Bool mask, False at exactly `k` lowest scores (ties at the k-th value broken by position)."""
    import torch

    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    threshold = torch.kthvalue(scores, k).values
    below = scores < threshold
    keep &= ~below
    missing = k - int(torch.count_nonzero(below))
    if missing > 0:
        ties = (scores == threshold).nonzero().flatten()[:missing]
        keep[ties] = False
    return keep


def _zeros(t) -> int:
    """Entries equal to zero (False for bool masks); count_nonzero is far faster than summing a comparison."""
    import torch

    return t.numel() - int(torch.count_nonzero(t))


def _merge_into_existing(state, keep: dict[str, Any]) -> "ZeroMaskConstraint":
    """A second magnitude_prune tightens the masks of the first instead of stacking another constraint."""
    for existing in state.constraints:
        if isinstance(existing, ZeroMaskConstraint):
            existing.add_masks(keep)
            return existing
    constraint = ZeroMaskConstraint(keep)
    state.constraints.append(constraint)
    return constraint


@register_constraint
class ZeroMaskConstraint(Constraint):
    """Pruned weights stay exactly zero: re-masked after every step, LoRA deltas masked in the forward and folded at release.

    Masks are keyed by the module names of the plain model; a wrapped model (peft's
    ``base_model.model.`` prefix, DDP's ``module.``) is matched by name suffix.
    """

    name = "zero_mask"

    def __init__(self, keep_masks: dict[str, Any]):
        self.masks = dict(keep_masks)  # module name -> bool keep-mask of its weight
        self._hooks: list = []
        self._captured: dict[int, dict[str, Any]] = {}  # id(lora layer) -> adapter -> input of lora_A
        self.folded_lora_layers: list[str] = []
        self.remasked_after_merge: list[str] = []
        self._bnb_weight_ids: dict[str, int] = {}
        self.forgotten = 0  # masks of modules a later pass removed (ADA-DEFT's skipped blocks)

    def state_tensors(self) -> dict[str, Any]:
        return {name: mask.to("cpu").contiguous() for name, mask in self.masks.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, Any]) -> "ZeroMaskConstraint":
        return cls({name: mask.bool() for name, mask in tensors.items()})

    def add_masks(self, keep_masks: dict[str, Any]) -> None:
        for name, mask in keep_masks.items():
            self.masks[name] = self.masks[name] & mask if name in self.masks else mask

    # -- locating the masked layers in a (possibly wrapped) model --------------------------------

    def _resolve(self, model) -> dict[str, Any]:
        found: dict[str, list[tuple[str, Any]]] = {key: [] for key in self.masks}
        for name, module in model.named_modules():
            parts = name.split(".")
            for i in range(len(parts)):
                suffix = ".".join(parts[i:])
                if suffix in found:
                    found[suffix].append((name, module))
                    break
        resolved = {}
        for key, hits in found.items():
            if len(hits) != 1:
                what = "no module" if not hits else f"{len(hits)} modules ({', '.join(n for n, _ in hits[:3])})"
                raise PruningError(f"zero_mask constraint: {what} named like {key!r} in {type(model).__name__}; "
                                   "the model was restructured after magnitude pruning")
            resolved[key] = hits[0][1]
        return resolved

    @staticmethod
    def _lora_layer(module) -> bool:
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:
            return False
        return isinstance(module, LoraLayer)

    def _base_layers(self, module) -> list:
        """The layers holding the weight itself (inside LoRA and modules_to_save wrappers)."""
        if self._lora_layer(module):
            return [module.get_base_layer()]
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            return [module.original_module, *module.modules_to_save.values()]
        return [module]

    # -- Constraint protocol -------------------------------------------------------------------

    def bind(self, model) -> None:
        self._remove_hooks()
        for key, module in self._resolve(model).items():
            if self._lora_layer(module):
                self._hook_lora(key, module)
        self._mask_weights(model)

    def enforce(self, model) -> None:
        # After an optimizer step only trainable weights can have moved (LoRA keeps its delta masked in the
        # forward); frozen ones are re-masked by `release`, which also catches a merge done before it.
        self._mask_weights(model, trainable_only=True)

    def release(self, model) -> None:
        self._remove_hooks()
        for key, module in self._resolve(model).items():
            if self._lora_layer(module) and not module.merged:
                self._fold_lora(key, module)
        self._mask_weights(model)

    def forget_modules(self, names: list[str]) -> None:
        # Keys are plain-model names; removed names may carry a wrapper's prefix ("base_model.model.").
        gone = [k for k in self.masks if any(n == k or n.endswith("." + k) for n in names)]
        for key in gone:
            del self.masks[key]
            self._bnb_weight_ids.pop(key, None)
        self.forgotten += len(gone)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "masked_weights": len(self.masks),
                "masked_entries": sum(_zeros(m) for m in self.masks.values()),
                "lora_layers_folded_at_release": len(self.folded_lora_layers),
                "quantized_layers_remasked": len(self.remasked_after_merge),
                "masks_dropped_with_removed_modules": self.forgotten}

    # -- masking ----------------------------------------------------------------------------------

    def _mask_weights(self, model, trainable_only: bool = False) -> None:
        import torch

        with torch.no_grad():
            for key, module in self._resolve(model).items():
                for layer in self._base_layers(module):
                    if trainable_only and not layer.weight.requires_grad:
                        continue
                    self._mask_layer(key, layer)

    def _mask_layer(self, key: str, layer) -> None:
        mask = self.masks[key]
        from deftcompress.quantization.bnb import is_bnb_weight

        weight = layer.weight
        if is_bnb_weight(weight):
            # Quantized weights only change when replaced (a merge); re-quantize then, never per step.
            if self._bnb_weight_ids.get(key) != id(weight):
                self._remask_quantized(key, layer)
                self._bnb_weight_ids[key] = id(layer.weight)
            return
        if weight.shape != mask.shape:
            raise PruningError(f"zero_mask constraint: {key} has shape {tuple(weight.shape)}, its mask {tuple(mask.shape)}")
        if mask.device != weight.device:
            mask = self.masks[key] = mask.to(weight.device)
        weight.data.mul_(mask)

    def _remask_quantized(self, key: str, layer) -> None:
        from deftcompress.quantization.bnb import dequantized_weight

        weight = dequantized_weight(layer)
        mask = self.masks[key].to(weight.device)
        if not bool(weight[~mask].any()):
            return  # zeros quantize to exact zeros: nothing regrew
        self._replace_quantized_weight(layer, weight * mask)
        self.remasked_after_merge.append(key)

    @staticmethod
    def _replace_quantized_weight(layer, weight) -> None:
        """Re-quantize `layer` (bitsandbytes 4/8-bit) in place from a float weight, with its own settings."""
        from torch import nn

        from deftcompress.quantization.bnb import quantize_linear_layers, to_float_linear

        holder = nn.Module()
        holder.layer = to_float_linear(layer, weight)
        four_bit = type(layer).__name__ == "Linear4bit"
        quantize_linear_layers(holder, bits=4 if four_bit else 8, skip=(),
                               quant_type=getattr(layer.weight, "quant_type", "nf4") if four_bit else "nf4",
                               double_quant=bool(getattr(layer.weight, "compress_statistics", True)),
                               compute_dtype=getattr(layer, "compute_dtype", None) or weight.dtype,
                               device=weight.device)
        layer.weight = holder.layer.weight
        if four_bit:
            layer.quant_state = getattr(holder.layer, "quant_state", None)
        else:
            layer.state = holder.layer.state

    # -- LoRA ------------------------------------------------------------------------------------

    def _hook_lora(self, key: str, layer) -> None:
        """Make a LoRA layer compute with (W + delta) * mask: subtract delta * ~mask from its output."""
        import torch.nn.functional as F

        unsupported = [a for a in layer.active_adapters if a in getattr(layer, "lora_variant", {})]
        if unsupported:
            raise PruningError(f"zero_mask constraint: {key} uses a LoRA variant (e.g. DoRA) for adapter(s) "
                               f"{unsupported}; only plain LoRA can be kept masked")
        captured = self._captured.setdefault(id(layer), {})

        def capture(adapter: str):
            def hook(module, args, output):
                captured[adapter] = args[0]  # the (dropped-out) input peft fed to lora_A
            return hook

        for adapter in layer.lora_A.keys():
            self._hooks.append(layer.lora_A[adapter].register_forward_hook(capture(adapter)))

        def correct(module, args, output):
            if not captured:
                return output
            outside = ~self.masks[key].to(output.device)
            for adapter, x in list(captured.items()):
                delta = module.get_delta_weight(adapter)
                output = output - F.linear(x.to(delta.dtype), delta * outside).to(output.dtype)
            captured.clear()
            return output

        self._hooks.append(layer.register_forward_hook(correct))

    def _fold_lora(self, key: str, layer) -> None:
        """Base weight <- (W + sum of deltas) * mask; lora_B <- 0, so the adapter adds nothing more."""
        import torch

        base = layer.get_base_layer()
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters:
            return
        with torch.no_grad():
            from deftcompress.quantization.bnb import dequantized_weight, is_bnb_weight

            quantized = is_bnb_weight(base.weight)
            if quantized:
                weight = dequantized_weight(base)
            else:
                weight = base.weight.data
            merged = weight.float() + sum(layer.get_delta_weight(a).float() for a in adapters)
            merged = merged * self.masks[key].to(merged.device)
            if quantized:
                self._replace_quantized_weight(base, merged)
                self._bnb_weight_ids[key] = id(base.weight)
            else:
                base.weight.data.copy_(merged.to(base.weight.dtype))
            for a in adapters:
                layer.lora_B[a].weight.zero_()
                if getattr(layer.lora_B[a], "bias", None) is not None:
                    # a LoRA bias is outside the weight: keep its contribution in the base bias
                    if base.bias is None:
                        raise PruningError(f"zero_mask constraint: {key} has a LoRA bias but no base bias to fold it into")
                    base.bias.data += layer.lora_B[a].bias.data * layer.scaling[a]
                    layer.lora_B[a].bias.zero_()
        self.folded_lora_layers.append(key)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured.clear()


__all__ = ["MagnitudePrune", "MagnitudePruneConfig", "ZeroMaskConstraint", "magnitude_masks", "targeted_weights"]
