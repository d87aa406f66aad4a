"""Removing whole MLP blocks (ADA-DEFT), with the replacement modules each family record names.

`skip_mlp_blocks(model, ["encoder.3"])` replaces, in layer 3 of the encoder, every module listed in
the family's `MLPSpec.skip` by a module without weights, so the layer computes what it computed with
the block's output scaled by 0 and the state dict holds no MLP weights for it. The layout record
(`deftcompress.architecture.layout`) lists skipped blocks, so a saved model reloads with them
skipped and an ONNX export traces no MatMul for them.
"""

from __future__ import annotations

import torch
from torch import nn

from deftcompress.architecture.locate import _layers, skipped_mlp_labels, spec_for
from deftcompress.architecture.spec import ArchSpec, SkipStep
from deftcompress.errors import ArchitectureError


class SkippedIdentity(nn.Module):
    """Returns its first input: a pre-norm residual branch (T5) or a norm (Llama) that is no longer needed."""

    deftcompress_skipped_mlp = True

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class SkippedZero(nn.Module):
    """Returns a scalar 0 in the input's dtype; the family's residual add broadcasts it (Llama: h + 0)."""

    deftcompress_skipped_mlp = True

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(())


class SkippedNormOfResidual(nn.Module):
    """norm(residual) for post-norm blocks (BERT: LayerNorm(dense(x) + residual) with the block gone)."""

    deftcompress_skipped_mlp = True

    def __init__(self, norm_name: str, norm: nn.Module):
        super().__init__()
        self.norm_name = norm_name
        self.add_module(norm_name, norm)  # same state-dict key as before: the norm's weights load unchanged

    def forward(self, hidden_states, input_tensor, *args, **kwargs):
        return getattr(self, self.norm_name)(input_tensor)


def _replacement(step: SkipStep, original: nn.Module, where: str) -> nn.Module:
    if step.kind == "identity":
        return SkippedIdentity()
    if step.kind == "zero":
        return SkippedZero()
    if step.kind == "norm_of_residual":
        try:
            norm = original.get_submodule(step.norm or "")
        except AttributeError:
            raise ArchitectureError(f"{where}: no norm {step.norm!r} to keep; check the architecture table") from None
        return SkippedNormOfResidual(step.norm, norm)
    raise ArchitectureError(f"{where}: unknown skip kind {step.kind!r}")


def skip_mlp_blocks(model: nn.Module, labels: list[str] | tuple[str, ...], arch: ArchSpec | None = None) -> list[str]:
    """Remove the MLP blocks `labels` (`stack.index`); returns the full names of the modules removed."""
    arch = arch or spec_for(model)
    wanted = set(labels)
    already = set(skipped_mlp_labels(model, arch))
    removed: list[str] = []
    found: set[str] = set()
    for stack in arch.stacks:
        for index, layer_name, layer in _layers(model, stack):
            label = f"{stack.name}.{index}"
            if label not in wanted:
                continue
            found.add(label)
            if label in already:
                continue
            if not stack.mlp.skip:
                raise ArchitectureError(f"{arch.family}: the architecture table does not say how to skip an MLP block")
            for step in stack.mlp.skip:
                where = f"{layer_name}.{step.path}"
                try:
                    original = layer.get_submodule(step.path)
                except AttributeError:
                    raise ArchitectureError(f"{where}: not found; check the architecture table's skip steps") from None
                replacement = _replacement(step, original, where)
                kept = {id(m) for m in replacement.modules()}  # e.g. BERT's LayerNorm stays
                removed += [f"{where}.{n}" if n else where for n, m in original.named_modules() if id(m) not in kept]
                layer.set_submodule(step.path, replacement)
    missing = wanted - found
    if missing:
        raise ArchitectureError(f"cannot skip MLP blocks {sorted(missing)}: the model has no such layers")
    return removed


@torch.no_grad()
def scale_block_output_(down: nn.Module, factor: float) -> None:
    """Multiply a down-projection's output by `factor` through its weights (and LoRA B, if it has an adapter)."""
    base = down.get_base_layer() if hasattr(down, "get_base_layer") else down
    if not isinstance(getattr(base, "weight", None), torch.Tensor) or not base.weight.is_floating_point():
        raise ArchitectureError(f"{type(base).__name__}: cannot fold a block weight into non-float weights")
    base.weight.mul_(factor)
    if getattr(base, "bias", None) is not None:
        base.bias.mul_(factor)
    for adapter in getattr(down, "lora_B", {}).values():  # y = base(x) + B A x: B scales the adapter's part
        adapter.weight.mul_(factor)
