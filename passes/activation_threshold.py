"""`activation_threshold`: per-layer cutoffs, calibrated on training rows, below which the MLP activation is exactly 0.

SiLU and GELU are (almost) never exactly zero, so a model that uses them keeps every activation however it is
trained. The training-free answer (CATS, Lee et al. 2024; TEAL, Liu et al. 2024) is a cutoff per layer: the
activation's magnitude at the quantile that leaves `density_target` of the values of a few hundred
calibration rows above it (in one forward pass, each layer calibrated on what the cutoffs before it leave);
below it the activation becomes exactly 0, with no other change. In gated MLPs the cutoff is on the activation of the gate, the factor that multiplies the other projection. A training pass
afterwards (DEFT, plain PEFT) can recover the score within the thresholded activation. The cutoffs are recorded
in config.json (`deftcompress_activation_thresholds`), so the model reloads with the same zeros through
deftcompress; stock transformers refuses the folder instead of loading a dense model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import Pass
from deftcompress.core.registry import register_pass

SAMPLED_VALUES = 2_000_000  # per layer: the quantile of a uniform sample of this many activations


@dataclass
class ActivationThresholdConfig(PassConfig):
    density_target: float = option(0.5, "fraction of each layer's MLP activations left nonzero on the calibration "
                                        "rows (0 < target < 1); the rest fall below the layer's cutoff and become 0")
    calibration_samples: int = option(256, "training rows whose activations set the cutoffs (real tokens only; they "
                                           "run as one batch, so lower this for a large model)")

    def problem(self) -> str | None:
        if not 0.0 < self.density_target < 1.0:
            return f"density_target must be in (0, 1), got {self.density_target}"
        if not 1 <= self.calibration_samples <= 100_000:
            return f"calibration_samples must be in [1, 100000], got {self.calibration_samples}"
        return None


@register_pass
class ActivationThreshold(Pass):
    name = "activation_threshold"
    Config = ActivationThresholdConfig
    summary = ("Calibrate a cutoff per MLP layer on training rows so that density_target of the activations stay "
               "nonzero; the rest become exactly 0 (recorded in config.json).")

    @classmethod
    def needs_train_data(cls, config) -> bool:
        return True  # cutoffs come from training rows, never from evaluation rows

    @classmethod
    def label(cls, config) -> str:
        return f"thresh{round(100 * config.density_target)}"

    def run(self, state) -> dict[str, Any]:
        import torch

        from deftcompress.architecture import mlp_blocks
        from deftcompress.architecture.activation import set_thresholds
        from deftcompress.data.features import calibration_inputs

        c, model = self.config, state.model
        if state.arch.kind == "encoder_decoder":
            from deftcompress.errors import DeftcompressError

            raise DeftcompressError("activation_threshold: encoder-decoder models are not supported yet (the decoder "
                                    "needs target tokens to calibrate on)")
        t0 = time.perf_counter()
        examples = state.examples("train", c.calibration_samples)
        inputs, = calibration_inputs(state.tokenizer, state.task, state.arch, examples, len(examples),
                                     state.recipe.max_seq_length, state.device)
        generator = torch.Generator().manual_seed(state.seed)
        thresholds, achieved = _calibrate(model, mlp_blocks(model, state.arch), inputs, c.density_target, generator)
        set_thresholds(model, thresholds, state.arch)
        return {
            "density_target": c.density_target,
            "thresholds": {label: round(t, 8) for label, t in thresholds.items()},
            "calibration": {"split": "train", "rows": len(examples), "tokens": int(inputs["attention_mask"].sum())},
            "calibration_density": achieved,
            "seconds": round(time.perf_counter() - t0, 3),
            "saved_format": "config.json records the cutoffs (deftcompress_activation_thresholds); load with "
                            "deftcompress.models.formats.load_model",
        }


def _calibrate(model, blocks, inputs, target: float, generator):
    """One forward pass over every calibration row: at each MLP, in layer order, the cutoff is the quantile of the
    activation magnitudes of the real tokens, and the cut output flows on, so each layer is calibrated on what the
    cutoffs before it leave (cutoffs taken from the untouched model overshoot: on MiniLM a target of 0.1 gave
    0.02-0.10 per layer). Returns (cutoffs, the fraction of calibration values above each)."""
    import torch

    from deftcompress.architecture.activation import innermost_activation

    mask = inputs["attention_mask"].bool()
    thresholds: dict[str, float] = {}
    achieved: dict[str, float] = {}

    def hook(label):
        def cut(module, args, output):
            values = output.detach().abs().float()
            values = (values[mask] if mask.shape == values.shape[:-1] else values).reshape(-1)
            sample = values
            if values.numel() > SAMPLED_VALUES:  # torch.quantile takes at most 16M values; a sample is plenty
                sample = values[torch.randint(values.numel(), (SAMPLED_VALUES,), generator=generator).to(values.device)]
            thresholds[label] = float(torch.quantile(sample, 1.0 - target))
            achieved[label] = round(float((values > thresholds[label]).float().mean()), 6)
            return output.masked_fill(output.abs() <= thresholds[label], 0.0)
        return cut

    handles = [innermost_activation(b)[0].register_forward_hook(hook(b.label)) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return thresholds, achieved


__all__ = ["ActivationThreshold", "ActivationThresholdConfig"]
