"""ONNX export through optimum, with optional density outputs added to the graph.

`export_onnx(model, tokenizer, arch, folder)` writes what optimum's exporter writes for the family
(`model.onnx` for classifiers; `model.onnx` with past key values for causal language models;
`encoder_model.onnx`, `decoder_model.onnx`, ... for text-to-text models), plus `config.json` and the
tokenizer, so the folder loads in optimum's `ORTModelForSequenceClassification` / `ORTModelForCausalLM`
/ `ORTModelForSeq2SeqLM` and in plain onnxruntime.

The MLP activation is exported as the model computes it (erf-GELU as Erf, ReLU as Relu; a family
whose model uses tanh-GELU keeps tanh-GELU), so the graph produces the same exact zeros.

With `density_outputs`, the classifier graph also returns, per MLP layer (architecture-table order),
`mlp_nonzero` (int64: exactly nonzero activations over real tokens), `mlp_positions` (int64: real
tokens, the attention mask's sum) and `mlp_density` (float: nonzero / (positions x width)). The
activation's output is found by the exporter's scope names (`/bert/encoder/layer.0/intermediate/
intermediate_act_fn/...`): the last node of that scope.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftcompress.errors import DeftcompressError

CLASSIFIER_FILE = "model.onnx"
DENSITY_OUTPUTS = ("mlp_nonzero", "mlp_positions", "mlp_density")


class ExportError(DeftcompressError):
    """The model cannot be exported, or the exported graph does not compute what the model computes."""


@dataclass
class OnnxGraph:
    """An exported model: its folder (relative to the run folder when saved) and what it holds."""

    folder: str
    kind: str  # "classifier" | "causal_lm" | "text_to_text"
    files: list[str] = field(default_factory=list)
    density_outputs: bool = False
    layers: list[str] = field(default_factory=list)  # MLP block labels, in output order
    widths: list[int] = field(default_factory=list)
    quantized: str | None = None  # e.g. "ort_int8"

    def main_file(self) -> str:
        return "encoder_model.onnx" if self.kind == "text_to_text" else CLASSIFIER_FILE


def _scope(module_name: str) -> str:
    """The exporter's node-name scope of a module: `bert.encoder.layer.0.x` -> `/bert/encoder/layer.0/x/`."""
    parts: list[str] = []
    for part in module_name.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def export_onnx(model, tokenizer, arch, folder: Path, opset: int = 18, density_outputs: bool = False) -> OnnxGraph:
    """Export `model` (a plain transformers model) to `folder`; see the module docstring."""
    from optimum.exporters.onnx import onnx_export_from_model

    from deftcompress.architecture import mlp_blocks

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    kind = graph_kind(model, arch)
    task = {"text_to_text": "text2text-generation-with-past", "causal_lm": "text-generation-with-past",
            "classifier": "text-classification"}[kind]
    if density_outputs and kind != "classifier":
        raise ExportError(f"onnx_export: density_outputs is available for classifiers only, not {kind.replace('_', ' ')} "
                          f"graphs (their decoder graphs have no token mask to count over); set density_outputs: false")
    model.eval()
    try:
        # a copy: the exporter patches the model (T5's encoder comes back with use_cache=True, which its forward refuses)
        onnx_export_from_model(copy.deepcopy(model), str(folder), task=task, opset=opset, do_validation=False)
    except Exception as exc:  # the exporter raises many types; the user needs one line
        raise ExportError(f"onnx_export: optimum could not export this {arch.family} model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    tokenizer.save_pretrained(folder)
    blocks = mlp_blocks(model, arch)
    graph = OnnxGraph(folder=str(folder), kind=kind, files=sorted(p.name for p in folder.glob("*.onnx")))
    if density_outputs:
        add_density_outputs(folder / CLASSIFIER_FILE, [b.names["act"] for b in blocks],
                            [int(b.down.in_features) for b in blocks])
        graph.density_outputs = True
        graph.layers = [b.label for b in blocks]
        graph.widths = [int(b.down.in_features) for b in blocks]
    return graph


def graph_kind(model, arch) -> str:
    """What the exporter writes for this model: a text-to-text pair, a causal LM with past key values, or a classifier."""
    if arch.text_to_text:
        return "text_to_text"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "causal_lm" if type(base).__name__.endswith("ForCausalLM") else "classifier"


def add_density_outputs(path: Path, act_modules: list[str], widths: list[int]) -> None:
    """Append per-layer exact-nonzero counts over real tokens to the graph at `path` (in place)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    acts = []
    for name in act_modules:
        scope = _scope(name)
        outputs = [n.output[0] for n in graph.node if n.name.startswith(scope) and n.op_type != "Constant"]
        if not outputs:
            raise ExportError(f"onnx_export: no node of {name} in the exported graph (scope {scope}); "
                              "cannot add density outputs")
        acts.append(outputs[-1])  # nodes are in topological order: the scope's last node is its output
    nodes, counts = [], []
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["dc_mask"], to=TensorProto.INT64))
    nodes.append(helper.make_node("ReduceSum", ["dc_mask"], ["dc_positions"], keepdims=0))
    graph.initializer.append(helper.make_tensor("dc_zero", TensorProto.FLOAT, [], [0.0]))
    graph.initializer.append(helper.make_tensor("dc_last", TensorProto.INT64, [1], [-1]))
    graph.initializer.append(helper.make_tensor("dc_axis0", TensorProto.INT64, [1], [0]))
    for i, act in enumerate(acts):
        nodes += [
            helper.make_node("Equal", [act, "dc_zero"], [f"dc_{i}_eq"]),
            helper.make_node("Not", [f"dc_{i}_eq"], [f"dc_{i}_ne"]),
            helper.make_node("Cast", [f"dc_{i}_ne"], [f"dc_{i}_nz"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [f"dc_{i}_nz", "dc_last"], [f"dc_{i}_per_token"], keepdims=0),
            helper.make_node("Mul", [f"dc_{i}_per_token", "dc_mask"], [f"dc_{i}_real"]),
            helper.make_node("ReduceSum", [f"dc_{i}_real"], [f"dc_{i}_total"], keepdims=0),
            helper.make_node("Unsqueeze", [f"dc_{i}_total", "dc_axis0"], [f"dc_{i}_count"]),
        ]
        counts.append(f"dc_{i}_count")
    layers = len(acts)
    nodes.append(helper.make_node("Concat", counts, ["mlp_nonzero"], axis=0))
    nodes.append(helper.make_node("Expand", ["dc_positions", "dc_layers"], ["mlp_positions"]))
    graph.initializer.append(helper.make_tensor("dc_layers", TensorProto.INT64, [1], [layers]))
    graph.initializer.append(helper.make_tensor("dc_widths", TensorProto.FLOAT, [layers], [float(w) for w in widths]))
    nodes += [
        helper.make_node("Cast", ["mlp_nonzero"], ["dc_nz_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["mlp_positions"], ["dc_pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["dc_pos_f", "dc_widths"], ["dc_total"]),
        helper.make_node("Div", ["dc_nz_f", "dc_total"], ["mlp_density"]),
    ]
    graph.node.extend(nodes)
    graph.output.extend([
        helper.make_tensor_value_info("mlp_nonzero", TensorProto.INT64, [layers]),
        helper.make_tensor_value_info("mlp_positions", TensorProto.INT64, [layers]),
        helper.make_tensor_value_info("mlp_density", TensorProto.FLOAT, [layers]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def describe(graph: OnnxGraph) -> dict[str, Any]:
    import onnx

    from deftcompress.measurement.size import directory_bytes

    folder = Path(graph.folder)
    main = onnx.load(str(folder / graph.main_file()), load_external_data=False)
    ops = sorted({n.op_type for n in main.graph.node})
    return {"kind": graph.kind, "files": graph.files, "bytes": directory_bytes(folder), "opset": max(o.version for o in main.opset_import),
            "activation_ops": [op for op in ops if op in ("Erf", "Gelu", "FastGelu", "Relu", "Tanh", "Sigmoid", "BiasGelu")],
            "nodes": len(main.graph.node)}
