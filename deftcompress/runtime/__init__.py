"""Runtimes other than eager PyTorch (layer 8 of docs/architecture.md: may import every package below it).

- `onnxruntime`: onnxruntime sessions over an exported graph, its evaluation as deployed (score and density from
  the graph's outputs), and `onnx_forward`, the callable `measurement.speed` times beside PyTorch models.
- The sparse MLP runtime, activation zeros turned into skipped work on a CPU, in four modules that import one
  way: `sparse_mlp` (`SparseMLPRuntime`, the entry point: swaps the MLP projections and restores them) ->
  `sparse_projections` (the swapped modules, their per-call choice and in-place checks, per-layer statistics) ->
  `cost_model` (costs timed once per machine and cached in ~/.cache/deftcompress/sparse_mlp.json, the choice they
  lead to) -> `sparse_kernels` (the products each sparse path computes, and building the C++ kernels).
- `kernels/`: the C++ sources (`sparse_mlp.cpp`), shipped as package data. `sparse_kernels.load()` compiles them
  on first use with torch's JIT extension builder (a C++ compiler and ninja needed) under the module name
  `deftcompress_sparse_mlp_<key>`, the key a short hash of the source bytes, the compile flags, the torch version
  and the CPU identity (the flags include -march=native), so torch's cache (~/.cache/torch_extensions) holds one
  build per source, flags, torch and machine and loads it again without compiling. Without a compiler, or with
  DEFTCOMPRESS_NO_KERNELS=1, `load()` returns None, `why_not()` says why, and the runtime stays in PyTorch.
"""
