"""Two small C++ kernels for sparse MLP execution, compiled on first use (torch's JIT extension builder).

Eager PyTorch spends about as long dispatching the ten-odd operations of a gather-then-matmul as a
one-token MLP product takes on a small layer, so at batch 1 the gain of skipping zeros vanished in
overhead (benchmarks/results/sparse_mlp.md has both). These kernels do the skipping in one pass:

- `sparse_down(h, w_t, bias)`: out[t] = bias + sum over k with h[t, k] != 0 of h[t, k] * w_t[k]
  (w_t = the down-projection's weight transposed, rows contiguous), so each token reads only the
  rows of its active neurons;
- `gate_rows(x, a, w, bias)`: u[t, k] = dot(w[k], x[t]) + bias[k] where a[t, k] != 0, else 0: a gated
  MLP's multiplied projection computed only for the neurons the activation left nonzero.

They need a C++ compiler and ninja (`pip install ninja`) at first use; the build is cached by torch
under ~/.cache/torch_extensions. Without them (or with DEFTCOMPRESS_NO_KERNELS=1) `load()` returns
None and the runtime uses its pure-PyTorch paths.
"""

from __future__ import annotations

import os

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

torch::Tensor sparse_down(torch::Tensor h, torch::Tensor w_t, torch::Tensor bias) {
  TORCH_CHECK(h.dim() == 2 && w_t.dim() == 2 && h.size(1) == w_t.size(0), "sparse_down: shapes");
  TORCH_CHECK(h.scalar_type() == torch::kFloat && w_t.scalar_type() == torch::kFloat, "sparse_down: float32 only");
  h = h.contiguous(); w_t = w_t.contiguous();
  const int64_t n = h.size(0), f = h.size(1), d = w_t.size(1);
  // a fresh tensor: for one token, expand(...).contiguous() would be the bias itself, and the sums below would
  // accumulate into the layer's bias
  auto out = torch::zeros({n, d}, h.options());
  if (bias.numel()) out.add_(bias.to(torch::kFloat).unsqueeze(0));
  const float* hp = h.data_ptr<float>();
  const float* wp = w_t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict row = hp + t * f;
      float* __restrict o = op + t * d;
      for (int64_t k = 0; k < f; ++k) {
        const float v = row[k];
        if (v != 0.0f) {
          const float* __restrict w = wp + k * d;
          for (int64_t j = 0; j < d; ++j) o[j] += v * w[j];
        }
      }
    }
  });
  return out;
}

torch::Tensor gate_rows(torch::Tensor x, torch::Tensor a, torch::Tensor w, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && w.dim() == 2 && x.size(0) == a.size(0) && a.size(1) == w.size(0)
              && x.size(1) == w.size(1), "gate_rows: shapes");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && a.scalar_type() == torch::kFloat,
              "gate_rows: float32 only");
  x = x.contiguous(); a = a.contiguous(); w = w.contiguous();
  const int64_t n = x.size(0), din = x.size(1), f = w.size(0);
  auto out = torch::zeros({n, f}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict xt = xp + t * din;
      for (int64_t k = 0; k < f; ++k) {
        if (ap[t * f + k] != 0.0f) {
          const float* __restrict wk = wp + k * din;
          float s = 0.0f;
          // without the pragma (and -fopenmp-simd) the compiler keeps this sum serial: 3-4x slower
          #pragma omp simd reduction(+:s)
          for (int64_t j = 0; j < din; ++j) s += wk[j] * xt[j];
          op[t * f + k] = s + (bp ? bp[k] : 0.0f);
        }
      }
    }
  });
  return out;
}
"""

_loaded = None
_why_not: str | None = None


def load():
    """The compiled kernels (a module with `sparse_down` and `gate_rows`), or None; see `why_not()`."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return _loaded
    if os.environ.get("DEFTCOMPRESS_NO_KERNELS"):
        _why_not = "DEFTCOMPRESS_NO_KERNELS is set"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _loaded = load_inline(name="deftcompress_sparse_mlp_v3", cpp_sources=[_SOURCE],
                              functions=["sparse_down", "gate_rows"],
                              extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                              verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the pure-PyTorch paths still run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _why_not = f"the C++ kernels did not build ({first[:200]})"
        _loaded = None
    return _loaded


def why_not() -> str | None:
    return _why_not
