"""`evaluate`: measure task score and activation density of the current model.

The pipeline measures after every pass anyway; this pass exists to measure with other settings
(paper-mode density, another tau, more rows) or to mark a point in the recipe. When the model did
not change and the settings are the same, the previous measurement is reused, not repeated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from deftcompress.core.config import EVAL_BATCH_SIZE, PassConfig, option, out_of_range
from deftcompress.core.protocol import ONNX_GRAPH, Need, Pass
from deftcompress.core.registry import register_pass


@dataclass
class EvaluateConfig(PassConfig):
    density_mode: Literal["masked", "paper"] | None = option(None, "override the recipe's density_mode for this measurement")
    density_tau: float | None = option(None, "override the recipe's density_tau")
    eval_batch_size: int | None = option(None, "override the recipe's eval_batch_size")
    runtime: Literal["torch", "onnxruntime", "sparse"] = option(
        "torch", "torch: the PyTorch model; onnxruntime: the graph an onnx_export pass wrote (as deployed; masked "
                 "density needs density_outputs: true on the export); sparse: the PyTorch model with sparse MLP "
                 "execution (down-projection over nonzero activations only, chosen per layer and call against a "
                 "crossover calibrated once on this machine; deftcompress.runtime.sparse_mlp)")
    sparse_timed_calls: int = option(8, "runtime sparse: per layer, this many calls are also run dense, so the report "
                                        "shows each layer's dense and sparse MLP time")
    threads: int = option(0, "onnxruntime: intra-op threads (0: onnxruntime decides)")
    optimization: Literal["disable", "basic", "extended", "all"] = option("all", "onnxruntime: graph optimisation level")
    decode_speed: bool = option(
        False, "causal language models: also time greedy decoding at batch 1 (key-value cache, end of sequence "
               "ignored) as tokens/s, the dense PyTorch model and this step's runtime (sparse or onnxruntime) side by "
               "side in one process, and say whether they generate the same tokens (report: details.decoding)",
        timing_only=True)
    decode_prompts: int = option(4, "decode_speed: prompts, the first evaluation rows with decode_prompt_tokens tokens",
                                 timing_only=True)
    decode_prompt_tokens: int = option(64, "decode_speed: tokens per prompt", timing_only=True)
    decode_new_tokens: int = option(64, "decode_speed: tokens generated per prompt", timing_only=True)
    decode_repeats: int = option(3, "decode_speed: repetitions (runtimes alternate; the median is reported)",
                                 timing_only=True)

    def problem(self) -> str | None:
        bounded = out_of_range("eval_batch_size", self.eval_batch_size, EVAL_BATCH_SIZE, nullable=True)
        if bounded:
            return bounded
        if self.density_tau is not None and self.density_tau < 0:
            return "density_tau must be >= 0"
        if not 0 <= self.threads <= 1024:
            return "threads must be in [0, 1024]"
        if not 0 <= self.sparse_timed_calls <= 10_000:
            return "sparse_timed_calls must be in [0, 10000]"
        for field, low, high in (("decode_prompts", 1, 1000), ("decode_prompt_tokens", 1, 8192),
                                 ("decode_new_tokens", 1, 8192), ("decode_repeats", 1, 1000)):
            if not low <= getattr(self, field) <= high:
                return f"{field} must be in [{low}, {high}]"
        return None


@register_pass
class Evaluate(Pass):
    name = "evaluate"
    Config = EvaluateConfig
    changes_model = False
    summary = "Measure task score and MLP activation density (per layer, encoder/decoder) of the current model."

    @classmethod
    def needs(cls, config) -> list[Need]:
        if config.runtime != "onnxruntime":
            return []
        return [Need(ONNX_GRAPH, True, "{here}.runtime: onnxruntime evaluates an exported graph: put an onnx_export "
                                       "pass before it")]

    @classmethod
    def task_problem(cls, config, task) -> str | None:
        if config.decode_speed and task.kind != "language_modeling":
            return (f"decode_speed times greedy generation of a causal language model; task {task.name} is "
                    f"{task.kind.replace('_', ' ')} (use a language-modelling task such as squad/contexts)")
        return None

    def eval_settings(self, base):
        c = self.config
        changes = {k: v for k, v in (("density_mode", c.density_mode), ("density_tau", c.density_tau),
                                      ("batch_size", c.eval_batch_size)) if v is not None}
        changes.update(runtime=c.runtime, ort_threads=c.threads, ort_optimization=c.optimization,
                       sparse_timed_calls=c.sparse_timed_calls, decode_prompts=c.decode_prompts if c.decode_speed else 0,
                       decode_prompt_tokens=c.decode_prompt_tokens, decode_new_tokens=c.decode_new_tokens,
                       decode_repeats=c.decode_repeats)
        return dataclasses.replace(base, **changes)

    @classmethod
    def label(cls, config) -> str:
        return "eval" + {"onnxruntime": "(ort)", "sparse": "(sparse)"}.get(config.runtime, "")

    def run(self, state) -> dict:
        return {}
