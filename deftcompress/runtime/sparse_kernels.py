"""Small C++ kernels for sparse MLP execution, compiled on first use (torch's JIT extension builder).

Eager PyTorch spends about as long dispatching the ten-odd operations of a gather-then-matmul as a
one-token MLP product takes on a small layer, so at batch 1 the gain of skipping zeros vanished in
overhead (benchmarks/results/sparse_mlp.md has both). These kernels do the skipping in one pass:

- `sparse_down(h, w_t, bias)`: out[t] = bias + sum over k with h[t, k] != 0 of h[t, k] * w_t[k]
  (w_t = the down-projection's weight transposed, rows contiguous): the nonzeros are grouped by neuron,
  so each active row is read once per call and multiplied only into the tokens that use it;
- `gate_rows(x, a, w, bias)`: u[t, k] = dot(w[k], x[t]) + bias[k] where a[t, k] != 0, else 0: a gated
  MLP's multiplied projection computed only for the (token, neuron) pairs the activation left nonzero;
- `down_auto(w_t, w, bias, max_density, tally, h)` and `gate_auto(w, bias, max_density, tally, x, a)`: the
  same, or the layer's dense product where the counted density is above `max_density`, in one call that adds
  what it did to `tally`: the runtime's choice without Python on the call (cold, the Python around a count
  took longer than a one-token sparse product).

They need a C++ compiler and ninja (`pip install ninja`) at first use; the build is cached by torch
under ~/.cache/torch_extensions. Without them (or with DEFTCOMPRESS_NO_KERNELS=1) `load()` returns
None and the runtime uses its pure-PyTorch paths.
"""

from __future__ import annotations

import os

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <tuple>
#include <vector>

namespace {

// Active rows are scattered through the weight, so the hardware prefetcher cannot guess the next one: ask for
// the rows this many places ahead while the current one is summed (with cold caches about 1.5x on one token).
constexpr int64_t kRowsAhead = 4;

inline void prefetch_row(const float* row, int64_t floats) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < floats * 4; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// The nonzeros of v [n, f] grouped by neuron (a counting sort): neurons[i] is the i-th active neuron, its
// entries are first[i] .. first[i + 1] in token[] / value[]. Grouped this way each active weight row is read
// once per call, whatever the number of tokens that use it.
struct ByNeuron {
  std::vector<int32_t> neurons, first, token;
  std::vector<float> value;
};

ByNeuron group_by_neuron(const float* v, int64_t n, int64_t f) {
  std::vector<int32_t> per(f + 1, 0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = 0; k < f; ++k) per[k + 1] += v[t * f + k] != 0.0f;
  ByNeuron g;
  g.first.push_back(0);
  std::vector<int32_t> cursor(f, 0);
  for (int64_t k = 0; k < f; ++k) {
    if (per[k + 1]) {
      cursor[k] = g.first.back();
      g.neurons.push_back(static_cast<int32_t>(k));
      g.first.push_back(g.first.back() + per[k + 1]);
    }
  }
  g.token.resize(g.first.back());
  g.value.resize(g.first.back());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = 0; k < f; ++k) {
      const float x = v[t * f + k];
      if (x != 0.0f) { g.token[cursor[k]] = static_cast<int32_t>(t); g.value[cursor[k]++] = x; }
    }
  return g;
}

int64_t nonzero_count(const torch::Tensor& t) {
  const float* p = t.data_ptr<float>();
  int64_t count = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) count += p[i] != 0.0f;
  return count;
}

// out[t] = bias + sum over k with h[t, k] != 0 of h[t, k] * w_t[k]
torch::Tensor down_rows(const torch::Tensor& h, const torch::Tensor& w_t, const torch::Tensor& bias) {
  const int64_t n = h.size(0), f = h.size(1), d = w_t.size(1);
  auto out = torch::empty({n, d}, h.options());  // a fresh tensor: never the bias itself (one token)
  const float* wp = w_t.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const ByNeuron g = group_by_neuron(h.data_ptr<float>(), n, f);
  const int64_t m = g.neurons.size();
  // threads split the output columns: each reads its slice of every active row, and no two write the same place
  at::parallel_for(0, d, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = j0; j < j1; ++j) op[t * d + j] = bp ? bp[j] : 0.0f;
    for (int64_t i = 0; i < std::min(kRowsAhead, m); ++i) prefetch_row(wp + g.neurons[i] * d + j0, j1 - j0);
    for (int64_t i = 0; i < m; ++i) {
      if (i + kRowsAhead < m) prefetch_row(wp + g.neurons[i + kRowsAhead] * d + j0, j1 - j0);
      const float* __restrict w = wp + g.neurons[i] * d;
      for (int32_t e = g.first[i]; e < g.first[i + 1]; ++e) {
        const float v = g.value[e];
        float* __restrict o = op + g.token[e] * d;
        for (int64_t j = j0; j < j1; ++j) o[j] += v * w[j];
      }
    }
  });
  return out;
}

// u[t, k] = dot(w[k], x[t]) + bias[k] where a[t, k] != 0, else 0
torch::Tensor gated_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w,
                         const torch::Tensor& bias) {
  const int64_t n = x.size(0), din = x.size(1), f = w.size(0);
  auto out = torch::zeros({n, f}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const ByNeuron g = group_by_neuron(a.data_ptr<float>(), n, f);
  const int64_t m = g.neurons.size();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {  // threads split the active neurons
    for (int64_t i = begin; i < std::min(begin + kRowsAhead, end); ++i) prefetch_row(wp + g.neurons[i] * din, din);
    for (int64_t i = begin; i < end; ++i) {
      if (i + kRowsAhead < end) prefetch_row(wp + g.neurons[i + kRowsAhead] * din, din);
      const int64_t k = g.neurons[i];
      const float* __restrict wk = wp + k * din;
      for (int32_t e = g.first[i]; e < g.first[i + 1]; ++e) {
        const float* __restrict xt = xp + g.token[e] * din;
        float s = 0.0f;
        // without the pragma (and -fopenmp-simd) the compiler keeps this sum serial: 3-4x slower
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < din; ++j) s += wk[j] * xt[j];
        op[g.token[e] * f + k] = s + (bp ? bp[k] : 0.0f);
      }
    }
  });
  return out;
}

void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat, what, ": float32 only");
}

}  // namespace

torch::Tensor sparse_down(torch::Tensor h, torch::Tensor w_t, torch::Tensor bias) {
  TORCH_CHECK(h.dim() == 2 && w_t.dim() == 2 && h.size(1) == w_t.size(0), "sparse_down: shapes");
  check_float(h, "sparse_down"); check_float(w_t, "sparse_down");
  return down_rows(h.contiguous(), w_t.contiguous(), bias.numel() ? bias.to(torch::kFloat).contiguous() : bias);
}

torch::Tensor gate_rows(torch::Tensor x, torch::Tensor a, torch::Tensor w, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && w.dim() == 2 && x.size(0) == a.size(0) && a.size(1) == w.size(0)
              && x.size(1) == w.size(1), "gate_rows: shapes");
  check_float(x, "gate_rows"); check_float(a, "gate_rows"); check_float(w, "gate_rows");
  return gated_rows(x.contiguous(), a.contiguous(), w.contiguous(), bias.numel() ? bias.contiguous() : bias);
}

// The count and the choice in the same call as the product (the Python around a one-token call costs more than
// the sparse product itself): the layer's own dense product if the counted density is above max_density, else
// the sparse one. Inputs of any leading shape; what was done goes into `tally` (int64: calls, tokens, nonzeros
// counted, sparse calls), so the runtime keeps its statistics without Python on the call.
torch::Tensor dense_product(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  return at::linear(x, w, bias.numel() ? c10::optional<torch::Tensor>(bias) : c10::nullopt);
}

void add_to_tally(torch::Tensor& tally, int64_t tokens, int64_t count, bool sparse) {
  int64_t* t = tally.data_ptr<int64_t>();
  t[0] += 1; t[1] += tokens; t[2] += count; t[3] += sparse;
}

// What down_auto and gate_auto share once their inputs are flat: count the nonzeros of `pattern` [tokens, width],
// tally the call, and return the layer's dense product of `x` above max_density, else `sparse()` in x's leading
// shape with `out_width` features.
template <typename Sparse>
torch::Tensor counted_choice(const torch::Tensor& x, const torch::Tensor& pattern, const torch::Tensor& w,
                             const torch::Tensor& bias, double max_density, torch::Tensor& tally, int64_t out_width,
                             Sparse sparse) {
  const int64_t count = nonzero_count(pattern);
  const bool is_sparse = count <= max_density * pattern.numel();
  add_to_tally(tally, pattern.size(0), count, is_sparse);
  if (!is_sparse) return dense_product(x, w, bias);
  auto sizes = x.sizes().vec();
  sizes.back() = out_width;
  return sparse().view(sizes);
}

// Arguments in this order so that everything but the input binds once (functools.partial) per layer.
torch::Tensor down_auto(torch::Tensor w_t, torch::Tensor w, torch::Tensor bias, double max_density, torch::Tensor tally,
                        torch::Tensor h) {
  const int64_t f = w_t.size(0), d = w_t.size(1);
  if (h.scalar_type() != torch::kFloat || !h.device().is_cpu() || h.dim() < 1 || h.size(-1) != f)
    return dense_product(h, w, bias);  // not this kernel's case: exactly what the layer computes
  auto flat = h.reshape({-1, f}).contiguous();
  return counted_choice(h, flat, w, bias, max_density, tally, d, [&] { return down_rows(flat, w_t, bias); });
}

torch::Tensor gate_auto(torch::Tensor w, torch::Tensor bias, double max_density, torch::Tensor tally, torch::Tensor x,
                        torch::Tensor a) {
  const int64_t f = w.size(0), din = w.size(1);
  if (x.scalar_type() != torch::kFloat || a.scalar_type() != torch::kFloat || !x.device().is_cpu() || x.dim() < 1
      || x.size(-1) != din || a.numel() != x.numel() / din * f)
    return dense_product(x, w, bias);
  auto flat = x.reshape({-1, din}).contiguous();
  auto pattern = a.reshape({-1, f}).contiguous();
  return counted_choice(x, pattern, w, bias, max_density, tally, f,
                        [&] { return gated_rows(flat, pattern, w, bias); });
}
"""

_loaded = None
_why_not: str | None = None


def load():
    """The compiled kernels (`sparse_down`, `gate_rows`, `down_auto`, `gate_auto`), or None; see `why_not()`."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return _loaded
    if os.environ.get("DEFTCOMPRESS_NO_KERNELS"):
        _why_not = "DEFTCOMPRESS_NO_KERNELS is set"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _loaded = load_inline(name="deftcompress_sparse_mlp_v5", cpp_sources=[_SOURCE],
                              functions=["sparse_down", "gate_rows", "down_auto", "gate_auto"],
                              extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                              verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the pure-PyTorch paths still run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _why_not = f"the C++ kernels did not build ({first[:200]})"
        _loaded = None
    return _loaded


def why_not() -> str | None:
    return _why_not
