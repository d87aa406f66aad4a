"""Runtimes other than eager PyTorch: `onnxruntime` (evaluating an exported graph as deployed)."""
