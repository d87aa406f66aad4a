"""`onnx_export`: the model as an ONNX graph for onnxruntime, checked against PyTorch on the eval rows.

The export goes through optimum's exporter (`deftcompress.export.onnx`): classifiers (BERT, RoBERTa,
Llama-style) as one `model.onnx`, text-to-text models (T5) as encoder and decoder graphs. Structurally
pruned blocks are gone from the graph because they are gone from the model. The folder
(`passes/NN_onnx_export/onnx/`) loads in plain onnxruntime and in optimum's ORTModel classes.

The parity check runs the evaluation rows through PyTorch and onnxruntime: the largest absolute
logit difference, whether every prediction is the same, and (with density outputs) the per-layer
density of both; above `check_tolerance` the pass fails. Speed in onnxruntime comes from structure
(fewer neurons and heads) and int8 (`quantize: {backend: ort_int8}`), never from zeros in a dense
MatMul: onnxruntime's dense kernels do not skip zero activations.

After this pass the step is measured in onnxruntime (what a deployment runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import ADAPTER, ONNX_GRAPH, QUANTIZED, Need, Pass
from deftcompress.core.registry import register_pass
from deftcompress.errors import DeftcompressError


class ParityError(DeftcompressError):
    """The exported graph does not compute what the PyTorch model computes."""


@dataclass
class OnnxExportConfig(PassConfig):
    opset: int = option(18, "ONNX opset (14 to 21); batch and sequence axes are always dynamic")
    density_outputs: bool = option(False, "also return per-layer MLP activation density over real tokens "
                                          "(mlp_nonzero, mlp_positions, mlp_density; classifiers)")
    check: bool = option(True, "parity check on the evaluation rows: logits, predictions, density")
    check_tolerance: float = option(1.0e-4, "largest absolute logit difference the parity check accepts")
    density_tolerance: float = option(
        1.0e-3, "largest per-layer exact-density difference the parity check accepts: torch's and onnxruntime's erf "
                "round differently within about 0.05 of GELU's zero point, so a few activations there differ")
    check_rows: int | None = option(64, "evaluation rows used by the parity check (null: all)")
    threads: int = option(0, "onnxruntime intra-op threads for checks and evaluation (0: onnxruntime decides)")
    optimization: Literal["disable", "basic", "extended", "all"] = option(
        "all", "onnxruntime graph optimisation level for checks and evaluation")

    def problem(self) -> str | None:
        if not 14 <= self.opset <= 21:
            return f"opset must be in [14, 21], got {self.opset}"
        if not 0 < self.check_tolerance <= 1 or not 0 <= self.density_tolerance <= 1:
            return "check_tolerance must be in (0, 1] and density_tolerance in [0, 1]"
        if self.check_rows is not None and not 1 <= self.check_rows <= 10**6:
            return "check_rows must be >= 1 or null"
        if not 0 <= self.threads <= 1024:
            return "threads must be in [0, 1024]"
        return None


@register_pass
class OnnxExport(Pass):
    name = "onnx_export"
    Config = OnnxExportConfig
    summary = "Export to ONNX (optimum) for onnxruntime, with optional density outputs and a parity check against PyTorch."

    @classmethod
    def leaves(cls, config) -> dict[str, str]:
        return {ONNX_GRAPH: "an ONNX graph"}

    @classmethod
    def needs(cls, config) -> list[Need]:
        return [
            Need(ADAPTER, False, "{here}: {earlier} leaves {note} on the model; export needs plain weights: set "
                                 "merge: true there (lora, qlora, ia3)"),
            Need(QUANTIZED, False, "{here}: cannot export after {earlier} ({note}); export the float model and quantize "
                                   "the graph with quantize: {{backend: ort_int8}}"),
            Need(ONNX_GRAPH, False, "{here}: {earlier} already exported the model"),
        ]

    def eval_settings(self, base):
        c = self.config
        return dataclasses.replace(base, runtime="onnxruntime", ort_threads=c.threads, ort_optimization=c.optimization)

    @classmethod
    def label(cls, config) -> str:
        return "onnx"

    def run(self, state) -> dict[str, Any]:
        from deftcompress.export.onnx import ExportError, describe, export_onnx
        from deftcompress.peft_methods.wrapping import is_wrapped

        c = self.config
        if is_wrapped(state.model):  # validation refuses this plan; kept for Python callers that bypass it
            raise ExportError("onnx_export: the model carries a PEFT adapter; merge it first (merge: true)")
        t0 = time.perf_counter()
        graph = export_onnx(state.model, state.tokenizer, state.arch, state.pass_dir(self.name) / "onnx", c.opset,
                            c.density_outputs)
        export_seconds = time.perf_counter() - t0
        state.onnx = graph
        details: dict[str, Any] = {"opset": c.opset, **describe(graph), "density_outputs": c.density_outputs,
                                   "export_seconds": round(export_seconds, 2),
                                   "session": {"threads": c.threads, "optimization": c.optimization},
                                   "speed_note": "onnxruntime's dense kernels do not skip zero activations: speed "
                                                 "comes from structure (pruned widths) and int8, not from density"}
        if c.check:
            details["parity"] = parity_check(state, graph, c)
        return details


def parity_check(state, graph, config) -> dict[str, Any]:
    """Compare PyTorch and onnxruntime on the evaluation rows; raise ParityError above the tolerance."""
    import numpy as np
    import torch

    from deftcompress.architecture import mlp_blocks
    from deftcompress.data.features import encode_inputs, pad_inputs
    from deftcompress.measurement.density import DensityMeter
    from deftcompress.runtime.onnxruntime import SessionSettings, classifier_outputs, session

    rows = state.eval_examples()[: config.check_rows] if config.check_rows else state.eval_examples()
    settings = SessionSettings(config.threads, config.optimization)
    if graph.kind == "causal_lm":
        return _causal_lm_parity(state, graph, rows, settings, config)
    if graph.kind != "classifier":
        return _text_to_text_parity(state, graph, rows, settings, config)
    sess = session(f"{graph.folder}/{graph.main_file()}", settings)
    features = encode_inputs(state.tokenizer, state.task, state.arch, rows, state.recipe.max_seq_length)
    model = state.model.eval()
    # the same meter as every PyTorch measurement, counting over real tokens as the graph's outputs do
    meter = DensityMeter(mlp_blocks(model, state.arch), "masked") if graph.density_outputs else None
    worst, same, compared, nonzero_ort = 0.0, 0, 0, 0
    for s in range(0, len(features), 16):
        batch = pad_inputs(state.tokenizer, features[s:s + 16], "longest", state.recipe.max_seq_length)
        with torch.no_grad(), meter or contextlib.nullcontext():
            if meter is not None:
                meter.set_token_mask(state.arch.stacks[0].name, batch["attention_mask"].to(state.device))
            torch_logits = model(**{k: v.to(state.device) for k, v in batch.items()}).logits.float().cpu().numpy()
        out = classifier_outputs(sess, batch)
        worst = max(worst, float(np.abs(out["logits"] - torch_logits).max()))
        same += int((out["logits"].argmax(-1) == torch_logits.argmax(-1)).sum())
        compared += len(torch_logits)
        if meter is not None:
            nonzero_ort = nonzero_ort + out["mlp_nonzero"].astype(np.int64)
    result: dict[str, Any] = {"rows": compared, "max_abs_logit_diff": worst, "same_predictions": same,
                              "tolerance": config.check_tolerance}
    density_gap = 0.0
    if meter is not None:
        counts = meter.counts()  # (nonzero, positions, width) per layer
        nonzero_torch = [nz for nz, _, _ in counts]
        density_gap = max(abs(t - int(o)) / (pos * width) for t, o, (_, pos, width) in zip(nonzero_torch, nonzero_ort, counts))
        result.update(nonzero_torch=nonzero_torch, nonzero_onnxruntime=[int(o) for o in nonzero_ort],
                      max_density_diff=density_gap, density_tolerance=config.density_tolerance)
    problems = []
    if worst > config.check_tolerance:
        problems.append(f"largest logit difference {worst:.3g} > check_tolerance {config.check_tolerance:g}")
    if same != compared:
        problems.append(f"{compared - same} of {compared} predictions differ")
    if density_gap > config.density_tolerance:
        problems.append(f"per-layer density differs by {density_gap:.3g} > density_tolerance {config.density_tolerance:g} "
                        f"(nonzero torch {result['nonzero_torch']}, onnxruntime {result['nonzero_onnxruntime']})")
    if problems:
        raise ParityError(f"onnx_export: the exported graph does not match the PyTorch model on {compared} evaluation "
                          f"rows: {'; '.join(problems)}")
    return result


def _text_to_text_parity(state, graph, rows, settings, config) -> dict[str, Any]:
    """Text-to-text: greedy answers of PyTorch and optimum's ORTModelForSeq2SeqLM on the rows, and teacher-forced logits."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    from deftcompress.data.features import encode_inputs, pad_inputs, target_batch

    ort_model = ORTModelForSeq2SeqLM.from_pretrained(graph.folder, session_options=settings.options(),
                                                     provider="CPUExecutionProvider", use_cache=False)
    features = encode_inputs(state.tokenizer, state.task, state.arch, rows, state.recipe.max_seq_length)
    worst, same, compared = 0.0, 0, 0
    model = state.model.eval()
    for s in range(0, len(features), 16):
        batch = pad_inputs(state.tokenizer, features[s:s + 16], "longest", state.recipe.max_seq_length)
        labels, _ = target_batch(state.tokenizer, state.task, rows[s:s + 16])
        decoder_input_ids = model._shift_right(labels.clamp(min=0))
        with torch.no_grad():
            torch_logits = model(**batch, decoder_input_ids=decoder_input_ids, use_cache=False).logits.float().numpy()
        ort_logits = ort_model(**batch, decoder_input_ids=decoder_input_ids).logits.float().numpy()
        worst = max(worst, float(np.abs(ort_logits - torch_logits).max()))
        same += int((ort_logits.argmax(-1) == torch_logits.argmax(-1)).all(-1).sum())
        compared += len(torch_logits)
    if worst > config.check_tolerance or same != compared:
        raise ParityError(f"onnx_export: the exported graphs do not match the PyTorch model on {compared} evaluation "
                          f"rows: largest teacher-forced logit difference {worst:.3g} (tolerance "
                          f"{config.check_tolerance:g}), {compared - same} rows with other greedy tokens")
    return {"rows": compared, "max_abs_logit_diff": worst, "same_predictions": same, "tolerance": config.check_tolerance,
            "compared": "teacher-forced decoder logits on the reference answers"}


def _causal_lm_parity(state, graph, rows, settings, config) -> dict[str, Any]:
    """Causal LMs: next-token logits of PyTorch and optimum's ORTModelForCausalLM over the real tokens of the rows."""
    import numpy as np
    import torch

    from deftcompress.data.features import encode_inputs, pad_inputs
    from deftcompress.runtime.onnxruntime import causal_lm

    ort_model = causal_lm(graph.folder, settings)
    features = encode_inputs(state.tokenizer, state.task, state.arch, rows, state.recipe.max_seq_length)
    worst, same, compared = 0.0, 0, 0
    model = state.model.eval()
    for s in range(0, len(features), 16):
        batch = pad_inputs(state.tokenizer, features[s:s + 16], "longest", state.recipe.max_seq_length)
        real = batch["attention_mask"].bool().numpy()
        with torch.no_grad():
            torch_logits = model(**{k: v.to(state.device) for k, v in batch.items()},
                                 use_cache=False).logits.float().cpu().numpy()[real]
        ort_logits = np.asarray(ort_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).logits, dtype=np.float32)[real]
        worst = max(worst, float(np.abs(ort_logits - torch_logits).max()))
        same += int((ort_logits.argmax(-1) == torch_logits.argmax(-1)).sum())
        compared += len(torch_logits)
    if worst > config.check_tolerance:
        raise ParityError(f"onnx_export: the exported graph does not match the PyTorch model on {len(rows)} evaluation "
                          f"rows: largest next-token logit difference {worst:.3g} > check_tolerance "
                          f"{config.check_tolerance:g} ({compared - same} of {compared} tokens predict another token)")
    return {"rows": len(rows), "tokens": compared, "max_abs_logit_diff": worst, "same_next_token": same,
            "tolerance": config.check_tolerance, "compared": "next-token logits over real tokens"}


__all__ = ["OnnxExport", "OnnxExportConfig", "ParityError"]
