"""`structured_prune`: remove MLP neurons and attention heads for real (smaller matrices, fewer FLOPs).

MLP neurons go through torch-pruning's dependency graph: the group of an up-projection's output
channels couples the gate projection (gated MLPs) and the down-projection's inputs, and
torch-pruning cuts them together. Every group is checked against the architecture table (exactly
up, gate and down of that layer) so a mis-traced graph fails loudly instead of pruning something
else or nothing.

Attention heads are cut with the architecture table directly (`deftcompress.architecture.layout`), because
torch-pruning's graph couples T5's self-attention heads across layers through the shared position
bias, and does not know grouped-query attention. Whole heads go (key/value groups with their
query heads for grouped-query attention), never head dimensions; head counts, all-head sizes and
T5's `pruned_heads` are updated and checked against the shapes. Heads the architecture table marks
as not prunable stay whole (T5 cross-attention: HF's T5 shares one cross-attention bias tensor
across decoder layers).

Importance: `magnitude` (L2 norm of the coupled weights) or `taylor` (|w * dL/dw| summed over a
few training batches). `scope: layer` removes the same fraction in every layer; `scope: global`
ranks neurons (and heads) across layers after normalising each layer's scores by their mean.

Frozen parameters are unfrozen while the graph is traced (torch-pruning follows autograd and finds
nothing through frozen weights) and frozen again afterwards. The new widths are recorded in the
config (`deftcompress_layout`), so the saved model reloads to the same outputs through
`deftcompress.models.formats.load_model`.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import ADAPTER, ZERO_MASK, Need, Pass
from deftcompress.core.registry import register_pass
from deftcompress.errors import DeftcompressError


class StructuredPruningError(DeftcompressError):
    """The model cannot be pruned structurally as configured."""


@dataclass
class StructuredPruneConfig(PassConfig):
    mlp_ratio: float = option(0.3, "fraction of MLP neurons removed (0 <= ratio < 1)")
    head_ratio: float = option(0.0, "fraction of attention heads removed (key/value groups for grouped-query attention; "
                                    "heads the architecture table marks as not prunable, such as T5 cross-attention, are kept)")
    importance: Literal["magnitude", "taylor"] = option(
        "magnitude", "magnitude: L2 norm of the coupled weights; taylor: |weight * gradient| over a few training batches")
    round_to: int = option(8, "kept MLP neurons per layer rounded to a multiple of this (1: no rounding)")
    scope: Literal["layer", "global"] = option(
        "layer", "layer: every layer loses the same fraction; global: rank across layers (scores normalised per layer)")
    taylor_batches: int = option(4, "training batches whose gradients feed taylor importance")
    taylor_batch_size: int = option(16, "rows per taylor batch")

    def problem(self) -> str | None:
        for field in ("mlp_ratio", "head_ratio"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                return f"{field} must be in [0, 1), got {value}"
        if self.mlp_ratio == 0 and self.head_ratio == 0:
            return "mlp_ratio and head_ratio are both 0: nothing to prune"
        if not 1 <= self.round_to <= 65_536:
            return f"round_to must be in [1, 65536], got {self.round_to}"
        if not (1 <= self.taylor_batches <= 10_000 and 1 <= self.taylor_batch_size <= 65_536):
            return "taylor_batches must be in [1, 10000] and taylor_batch_size in [1, 65536]"
        return None


@register_pass
class StructuredPrune(Pass):
    name = "structured_prune"
    Config = StructuredPruneConfig
    summary = "Remove MLP neurons (torch-pruning dependency graph) and attention heads; the saved model reloads with its new widths."

    @classmethod
    def needs_train_data(cls, config) -> bool:
        return config.importance == "taylor"

    @classmethod
    def needs(cls, config) -> list[Need]:
        return super().needs(config) + [
            Need(ADAPTER, False, "{here}: {earlier} leaves its adapter on the model, and pruning a wrapped model breaks "
                                 "it; prune before it, or set merge: true there"),
            Need(ZERO_MASK, False, "{here}: {earlier} keeps {note} that would no longer fit the smaller matrices; put "
                                   "structured_prune before it"),
        ]

    @classmethod
    def label(cls, config) -> str:
        parts = [f"mlp{round(100 * config.mlp_ratio)}" if config.mlp_ratio else "",
                 f"heads{round(100 * config.head_ratio)}" if config.head_ratio else ""]
        return "structured(" + ",".join(p for p in parts if p) + ")"

    def run(self, state) -> dict[str, Any]:
        from deftcompress.architecture import attention_blocks, mlp_blocks
        from deftcompress.peft_methods.wrapping import is_wrapped
        from deftcompress.quantization.bnb import is_quantized
        from deftcompress.quantization.torch_int8 import quantized_modules
        from deftcompress.measurement.size import count_parameters
        from deftcompress.architecture.layout import block_key, check_structure, original_heads, record_layout

        c = self.config
        model = state.model
        if is_wrapped(model):
            raise StructuredPruningError("structured_prune: the model carries a PEFT adapter; prune before training, "
                                         "or merge it first (merge: true)")
        if is_quantized(model) or quantized_modules(model):
            raise StructuredPruningError("structured_prune: the model is quantized; prune before quantizing")
        t0 = time.perf_counter()
        params_before, _ = count_parameters(model)
        was_training = model.training
        model.eval()
        mlps = mlp_blocks(model, state.arch)
        attns = attention_blocks(model, state.arch, prunable_only=True)  # the table says which heads stay whole
        widths_before = {block_key(b): b.up.out_features for b in mlps}
        heads_before = {block_key(a): original_heads(model, a) for a in attns}

        with _all_trainable(model):
            batches = _taylor_batches(state, c) if c.importance == "taylor" else []
            if batches:
                _accumulate_gradients(model, batches)
            mlp_plan = self._plan_mlp(state, model, mlps) if c.mlp_ratio > 0 else {}
            head_plan = self._plan_heads(attns) if c.head_ratio > 0 else {}
            self._prune_mlp(mlps, mlp_plan)
            new_heads = self._prune_heads(model, attns, head_plan)
            for p in model.parameters():
                p.grad = None

        mlps = mlp_blocks(model, state.arch)  # modules are the same objects; re-read for the new shapes
        heads_after = {**heads_before, **new_heads}
        layout = record_layout(model, state.arch, heads_after, widths_before)
        check_structure(model, state.arch)
        _smoke_forward(state, model)
        model.train(was_training)
        params_after, nonzero_after = count_parameters(model)

        neurons_before = sum(widths_before.values())
        neurons_after = sum(b.up.out_features for b in mlps)
        heads_total = sum(len(h) for h, _ in heads_before.values())
        heads_kept = sum(len(h) for h, _ in heads_after.values())
        warnings = []
        if c.mlp_ratio > 0 and neurons_after == neurons_before:
            widest = max(widths_before.values())
            why = (f"round_to {c.round_to} is not smaller than the MLP width ({widest})" if c.round_to >= widest else
                   "the ratio rounds to zero neurons in every layer")
            warnings.append(f"mlp_ratio {c.mlp_ratio} removed no MLP neuron: {why}")
        if c.head_ratio > 0 and heads_kept == heads_total:
            warnings.append(f"head_ratio {c.head_ratio} removed no attention head (too few heads per layer for this ratio)")
        return {
            "importance": c.importance,
            "scope": c.scope,
            "mlp_ratio_requested": c.mlp_ratio,
            "mlp_ratio_achieved": round(1 - neurons_after / neurons_before, 6),
            "mlp_neurons": {"before": neurons_before, "after": neurons_after},
            "mlp_widths": {k: v["kept"] for k, v in layout["mlp"].items()},
            "head_ratio_requested": c.head_ratio,
            "head_ratio_achieved": round(1 - heads_kept / heads_total, 6) if heads_total else 0.0,
            "attention_heads": {"before": heads_total, "after": heads_kept},
            "heads_per_layer": {k: len(v["heads"]) for k, v in layout["attention"].items()},
            "params_before": params_before,
            "params_after": params_after,
            "nonzero_params_after": nonzero_after,
            "taylor_batches": len(batches),
            "round_to": c.round_to,
            "prune_seconds": round(time.perf_counter() - t0, 3),
            **({"warnings": warnings} if warnings else {}),
            "saved_format": "stock config.json plus per-layer widths under `deftcompress_layout`; "
                            "load with deftcompress.models.formats.load_model",
            **({"notes": kept_whole} if (kept_whole := _heads_kept_whole(state.arch)) and c.head_ratio else {}),
        }

    # -- MLP: torch-pruning dependency groups -------------------------------------------------

    def _plan_mlp(self, state, model, mlps) -> dict[int, tuple[Any, list[int]]]:
        """Block index -> (dependency group over all neurons, neuron indices to remove)."""
        import torch
        import torch_pruning as tp

        graph = _dependency_graph(state, model)
        if self.config.importance == "taylor":
            scorer = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
        else:
            scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
        groups, scores = [], []
        for block in mlps:
            width = block.up.out_features
            group = graph.get_pruning_group(block.up, tp.prune_linear_out_channels, idxs=list(range(width)))
            _check_group(group, block)
            score = scorer(group)
            if score is None or len(score) != width:
                raise StructuredPruningError(f"structured_prune: torch-pruning gave no importance for {block.names['up']}")
            groups.append(group)
            scores.append(score.float())
        keep_counts = _keep_counts(scores, self.config.mlp_ratio, self.config.scope, self.config.round_to, minimum=1)
        plan = {}
        for i, (score, keep) in enumerate(zip(scores, keep_counts)):
            order = torch.argsort(score, descending=True, stable=True)
            remove = sorted(order[keep:].tolist())
            if remove:
                plan[i] = (groups[i], remove)
        return plan

    @staticmethod
    def _prune_mlp(mlps, plan) -> None:
        for i, (group, remove) in plan.items():
            block = mlps[i]
            expected = block.up.out_features - len(remove)
            group.prune(idxs=remove)  # torch-pruning re-derives the coupled group for these neurons
            widths = {block.up.weight.shape[0], block.down.weight.shape[1]} | ({block.gate.weight.shape[0]} if block.gate is not None else set())
            if widths != {expected}:
                raise StructuredPruningError(f"structured_prune: {block.names['up']} should keep {expected} neurons, "
                                             f"torch-pruning left widths {sorted(widths)}")

    # -- attention heads: the architecture table -------------------------------------------------

    def _plan_heads(self, attns) -> dict[int, list[int]]:
        """Attention index -> key/value heads to keep (current numbering)."""
        import torch

        from deftcompress.architecture.layout import head_geometry

        scores = [_head_scores(a, self.config.importance) for a in attns]
        keep_counts = _keep_counts(scores, self.config.head_ratio, self.config.scope, round_to=1, minimum=1)
        plan = {}
        for i, (score, keep) in enumerate(zip(scores, keep_counts)):
            if keep < head_geometry(attns[i]).kv_heads:
                order = torch.argsort(score, descending=True, stable=True)
                plan[i] = sorted(order[:keep].tolist())
        return plan

    @staticmethod
    def _prune_heads(model, attns, plan) -> dict[str, tuple[list[int], int]]:
        from deftcompress.architecture.layout import block_key, head_geometry, original_heads, shrink_attention

        new = {}
        for i, keep_kv in plan.items():
            block = attns[i]
            heads, count = original_heads(model, block)
            kept = shrink_attention(block, keep_kv, heads, count)
            if head_geometry(block).kv_heads != len(keep_kv):
                raise StructuredPruningError(f"structured_prune: {block.names['module']} still has "
                                             f"{head_geometry(block).kv_heads} key/value heads, expected {len(keep_kv)}")
            new[block_key(block)] = (kept, count)
        return new


# ---- helpers ------------------------------------------------------------------------------------

def _heads_kept_whole(arch) -> list[str]:
    """Why some attention heads were not pruned, from the architecture table."""
    notes = []
    for stack in arch.stacks:
        for attention, kind in ((stack.attention, "self"), (stack.cross_attention, "cross")):
            if attention is not None and not attention.heads_prunable:
                notes.append(f"{arch.family} {stack.name} {kind}-attention heads are not pruned: {attention.not_prunable_because}")
    return notes


@contextmanager
def _all_trainable(model):
    """torch-pruning traces autograd: frozen weights would hide every dependency. Restore flags by name after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for name, p in model.named_parameters():  # pruned layers hold new Parameter objects: match by name
            p.requires_grad_(flags.get(name, True))


def _example_inputs(state, model) -> dict[str, Any]:
    import torch

    enc = state.tokenizer(["a short sentence to trace the model", "and another one"], return_tensors="pt", padding=True)
    inputs = {k: v.to(state.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if state.arch.kind == "encoder_decoder":
        start = model.config.decoder_start_token_id or 0
        inputs["decoder_input_ids"] = torch.full((inputs["input_ids"].shape[0], 3), start, dtype=torch.long, device=state.device)
    return inputs


def _dependency_graph(state, model):
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about parameters it will not touch here (embeddings, biases)
        return tp.DependencyGraph().build_dependency(model, example_inputs=_example_inputs(state, model),
                                                     output_transform=lambda out: out.logits.sum())


def _check_group(group, block) -> None:
    """The neuron group must be exactly this layer's up (+ gate) outputs and down inputs."""
    import torch_pruning as tp
    from torch import nn

    found = {(id(dep.target.module), dep.handler) for dep, _ in group if isinstance(dep.target.module, nn.Linear)}
    expected = {(id(block.up), tp.prune_linear_out_channels), (id(block.down), tp.prune_linear_in_channels)}
    if block.gate is not None:
        expected.add((id(block.gate), tp.prune_linear_out_channels))
    if found != expected:
        raise StructuredPruningError(f"structured_prune: torch-pruning coupled {len(found)} linear layers to "
                                     f"{block.names['up']}, expected {len(expected)} (up, gate, down); not pruning a "
                                     "graph it may have mis-traced")


def _head_scores(block, importance: str):
    """Per key/value head: mean over q, k, v, o of the summed |w|^2 (magnitude) or |w * grad| (taylor) of its slices."""
    import torch

    from deftcompress.architecture.layout import head_geometry

    geo = head_geometry(block)

    def per_unit(weight, grad, dim: int, heads_per_unit: int):
        values = weight.pow(2) if importance == "magnitude" else (weight * grad).abs()
        if dim == 1:
            values = values.t()
        return values.reshape(geo.kv_heads, heads_per_unit * geo.head_dim, -1).sum(dim=(1, 2))

    parts = []
    for linear, dim, per in ((block.q, 0, geo.group), (block.k, 0, 1), (block.v, 0, 1), (block.o, 1, geo.group)):
        grad = linear.weight.grad
        if importance == "taylor" and grad is None:
            raise StructuredPruningError(f"structured_prune: no gradient reached {block.names['module']} for taylor importance")
        parts.append(per_unit(linear.weight.detach().float(), None if grad is None else grad.float(), dim, per))
    return torch.stack(parts).mean(0)


def _keep_counts(scores: list, ratio: float, scope: str, round_to: int, minimum: int) -> list[int]:
    """Units kept per layer: `ratio` removed per layer, or by one global threshold on mean-normalised scores."""
    import torch

    widths = [len(s) for s in scores]
    if scope == "global" and len(scores) > 1:
        normalised = torch.cat([s / s.mean().clamp_min(1e-12) for s in scores])
        remove = round(ratio * normalised.numel())
        threshold = torch.sort(normalised).values[remove - 1] if remove > 0 else None
        raw = [int((s / s.mean().clamp_min(1e-12) > threshold).sum()) if threshold is not None else len(s) for s in scores]
    else:
        raw = [w * (1 - ratio) for w in widths]
    counts = []
    for width, keep in zip(widths, raw):
        rounded = int(math.floor(keep / round_to + 0.5)) * round_to if round_to > 1 else int(math.floor(keep + 0.5))
        counts.append(min(width, max(rounded, minimum, min(round_to, width))))
    return counts


def _taylor_batches(state, config) -> list:
    from deftcompress.training.loop import collate, encode_examples

    n = config.taylor_batches * config.taylor_batch_size
    examples = state.examples("train", n)
    features = encode_examples(state.tokenizer, state.task, state.arch, examples, max_seq_length=state.recipe.max_seq_length)
    return [collate(state.tokenizer, state.task, state.arch, features[i:i + config.taylor_batch_size]).to(state.device)
            for i in range(0, len(features), config.taylor_batch_size)]


def _accumulate_gradients(model, batches) -> None:
    for p in model.parameters():
        p.grad = None
    for batch in batches:
        loss = model(**batch.inputs).loss
        if loss is None:
            raise StructuredPruningError("structured_prune: the model returned no loss for taylor importance")
        (loss / len(batches)).backward()


def _smoke_forward(state, model) -> None:
    """One forward pass on the trace inputs: a pruned model that cannot run fails here, not in evaluation."""
    import torch

    with torch.no_grad():
        try:
            model(**_example_inputs(state, model))
        except RuntimeError as exc:
            raise StructuredPruningError(f"structured_prune: the pruned model does not run ({str(exc).splitlines()[0][:200]})") from None


__all__ = ["StructuredPrune", "StructuredPruneConfig"]
