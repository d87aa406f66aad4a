"""Decoding speed: greedy generation at batch 1, tokens per second, runtimes side by side in one process.

    prompts = decode_prompts(tokenizer, examples, prompt_tokens=64, count=4)
    with_runtime = greedy(model, 64, around=lambda: runtime)          # e.g. a SparseMLPRuntime
    result = compare_decoding({"dense": greedy(model, 64), "sparse": with_runtime}, prompts, new_tokens=64)
    result.ratio("sparse")                                                   # tokens/s against the first

A "generator" is any callable that takes a prompt (`[1, prompt_tokens]` int64 ids) and returns exactly
`new_tokens` generated ids (greedy; the end of sequence is held off with `min_new_tokens`, in every runtime
alike, so that each does the same work);
runtimes other than PyTorch are built in `deftcompress.runtime` and handed in as callables.

As in `measurement.speed`, timings are only comparable within one process and one stretch of time: the
generators take turns (the order alternates every repetition) over the same prompts; each repetition's
tokens per second is all new tokens over all seconds, and the median of the repetitions is reported.
The tokens of the first repetition are kept, so each generator's output can be compared with the
first one's ("identical tokens where the model is the same").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from deftcompress.errors import DataError
from deftcompress.measurement.speed import OthersLoad, quartiles

Generator = Callable[[torch.Tensor], torch.Tensor]


def decode_prompts(tokenizer, examples: list[dict], prompt_tokens: int, count: int) -> list[torch.Tensor]:
    """The first `count` rows with at least `prompt_tokens` tokens, each cut to exactly that many ([1, n] ids)."""
    prompts = []
    for row in examples:
        ids = tokenizer(row["text_a"], truncation=True, max_length=prompt_tokens)["input_ids"]
        if len(ids) == prompt_tokens:
            prompts.append(torch.tensor([ids], dtype=torch.long))
        if len(prompts) == count:
            return prompts
    raise DataError(f"decoding speed: {len(prompts)} of the {len(examples)} evaluation rows have {prompt_tokens} "
                    f"tokens, {count} are needed; lower decode_prompt_tokens or decode_prompts, or raise max_eval_samples")


def greedy(model, new_tokens: int, around: Callable[[], Any] | None = None) -> Generator:
    """Greedy `model.generate` with the key-value cache, exactly `new_tokens` new ids, for any model with
    transformers' `generate` (a PyTorch model, optimum's ORTModelForCausalLM); `around()` gives a context entered
    for each call (e.g. the sparse MLP runtime)."""
    from contextlib import nullcontext

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    device = getattr(model, "device", torch.device("cpu"))

    def generate(prompt: torch.Tensor) -> torch.Tensor:
        prompt = prompt.to(device)
        with torch.inference_mode(), (around() if around else nullcontext()):
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                 pad_token_id=pad, num_beams=1)
        return out[0, prompt.shape[1]:].cpu()

    return generate


@dataclass
class DecodeResult:
    """Per generator: median tokens/s over the repetitions, their quartiles, and agreement with the first."""

    prompt_tokens: int
    new_tokens: int
    prompts: int
    repeats: int
    tokens_per_second: dict[str, float] = field(default_factory=dict)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    identical_prompts: dict[str, int] = field(default_factory=dict)  # prompts whose generated ids equal the first's
    first_difference: dict[str, int | None] = field(default_factory=dict)  # earliest differing position, if any
    others_load: float | None = None

    def ratio(self, name: str, reference: str | None = None) -> float:
        reference = reference or next(iter(self.tokens_per_second))
        return self.tokens_per_second[name] / self.tokens_per_second[reference]

    def to_dict(self) -> dict[str, Any]:
        first = next(iter(self.tokens_per_second))
        return {
            "workload": {"batch_size": 1, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                         "prompts": self.prompts, "repeats": self.repeats, "decoding": "greedy, key-value cache",
                         "statistic": "median tokens/s over repetitions; runtimes alternate in one process",
                         "others_load": self.others_load},
            "reference": first,
            "runtimes": {n: {"tokens_per_second": round(t, 3),
                             "iqr": [round(q, 3) for q in self.spread[n]],
                             "speedup": round(self.ratio(n), 4),
                             "identical_prompts": self.identical_prompts[n],
                             "first_difference": self.first_difference[n]}
                         for n, t in self.tokens_per_second.items()},
        }


def compare_decoding(generators: dict[str, Generator], prompts: list[torch.Tensor], new_tokens: int,
                     repeats: int = 3, progress: bool = False) -> DecodeResult:
    """Tokens per second of each generator on the same prompts, alternating; see the module docstring."""
    from tqdm.auto import tqdm

    names = list(generators)
    outputs: dict[str, list[torch.Tensor]] = {}
    for n in names:  # warm-up, and the tokens each runtime generates
        outputs[n] = [generators[n](p) for p in prompts]
        for p, out in zip(prompts, outputs[n]):
            if out.numel() != new_tokens:
                raise ValueError(f"decoding speed: {n} generated {out.numel()} tokens, not {new_tokens}")
    rates: dict[str, list[float]] = {n: [] for n in names}
    bar = tqdm(total=repeats * len(names), desc="decoding", disable=not progress, leave=False)
    with OthersLoad() as load:
        for r in range(repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                for p in prompts:
                    generators[n](p)
                rates[n].append(new_tokens * len(prompts) / (time.perf_counter() - start))
                bar.update(1)
    bar.close()
    result = DecodeResult(prompt_tokens=int(prompts[0].shape[1]), new_tokens=new_tokens, prompts=len(prompts),
                          repeats=repeats, others_load=load.share)
    reference = outputs[names[0]]
    for n in names:
        result.tokens_per_second[n] = statistics.median(rates[n])
        result.spread[n] = quartiles(rates[n])
        diffs = [_first_difference(a, b) for a, b in zip(reference, outputs[n])]
        result.identical_prompts[n] = sum(d is None for d in diffs)
        result.first_difference[n] = min((d for d in diffs if d is not None), default=None)
    return result


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else None
