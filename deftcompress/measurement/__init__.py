"""Measuring a model: activation density (hooks on the MLP activations) and evaluation.

- `density`: `ActivationTap` (shared with the DEFT loss) and `DensityMeter`;
- `evaluation`: task score and density from the same forward passes;
- `size`: parameters, nonzero parameters and bytes of a model or folder;
- `speed`: latency on fixed workloads and memory (weights, peak of a forward), models side by side.
"""
