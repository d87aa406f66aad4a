// The sparse MLP kernels (what each computes: deftcompress/runtime/sparse_kernels.py), built on first use by
// torch's JIT extension builder under a name keyed by this text, the flags, torch and the CPU (`build_key`).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <tuple>
#include <vector>

namespace {

// Active rows are scattered through the weight, so the hardware prefetcher cannot guess the next one: ask for
// the rows this many places ahead while the current one is summed (with cold caches about 1.5x on one token).
constexpr int64_t kRowsAhead = 4;

inline void prefetch_bytes(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

inline void prefetch_row(const float* row, int64_t floats) { prefetch_bytes(row, floats * 4); }

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

// out[t] = bias + sum over the entries e of g with token t of g.value[e] * rows[neuron of e]: the down-projection's
// sum over active rows (rows = its weight transposed, [f, d]). Threads split the output columns: each reads its
// slice of every active row, and no two write the same place.
void add_active_rows(const ByNeuron& g, int64_t n, const float* rp, int64_t d, const float* bp, float* op) {
  const int64_t m = g.neurons.size();
  at::parallel_for(0, d, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = j0; j < j1; ++j) op[t * d + j] = bp ? bp[j] : 0.0f;
    for (int64_t i = 0; i < std::min(kRowsAhead, m); ++i) prefetch_row(rp + g.neurons[i] * d + j0, j1 - j0);
    for (int64_t i = 0; i < m; ++i) {
      if (i + kRowsAhead < m) prefetch_row(rp + g.neurons[i + kRowsAhead] * d + j0, j1 - j0);
      const float* __restrict w = rp + g.neurons[i] * d;
      for (int32_t e = g.first[i]; e < g.first[i + 1]; ++e) {
        const float v = g.value[e];
        float* __restrict o = op + g.token[e] * d;
        for (int64_t j = j0; j < j1; ++j) o[j] += v * w[j];
      }
    }
  });
}

// For every entry e of g (token t, neuron k): take(e, t, k, dot(w[k], x[t]) + bias[k]). Threads split the active
// neurons.
template <typename Take>
void active_dots(const ByNeuron& g, const float* xp, const float* wp, int64_t din, const float* bp, Take take) {
  const int64_t m = g.neurons.size();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
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
        take(e, g.token[e], k, s + (bp ? bp[k] : 0.0f));
      }
    }
  });
}

const float* bias_or_null(const torch::Tensor& bias) { return bias.numel() ? bias.data_ptr<float>() : nullptr; }

// out[t] = bias + sum over k with h[t, k] != 0 of h[t, k] * w_t[k]
torch::Tensor down_rows(const torch::Tensor& h, const torch::Tensor& w_t, const torch::Tensor& bias) {
  const int64_t n = h.size(0), f = h.size(1), d = w_t.size(1);
  auto out = torch::empty({n, d}, h.options());  // a fresh tensor: never the bias itself (one token)
  const ByNeuron g = group_by_neuron(h.data_ptr<float>(), n, f);
  add_active_rows(g, n, w_t.data_ptr<float>(), d, bias_or_null(bias), out.data_ptr<float>());
  return out;
}

// u[t, k] = dot(w[k], x[t]) + bias[k] where a[t, k] != 0, else 0
torch::Tensor gated_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w,
                         const torch::Tensor& bias) {
  const int64_t n = x.size(0), din = x.size(1), f = w.size(0);
  auto out = torch::zeros({n, f}, x.options());
  float* op = out.data_ptr<float>();
  const ByNeuron g = group_by_neuron(a.data_ptr<float>(), n, f);
  active_dots(g, x.data_ptr<float>(), w.data_ptr<float>(), din, bias_or_null(bias),
              [&](int32_t, int64_t t, int64_t k, float u) { op[t * f + k] = u; });
  return out;
}

// A whole gated MLP over the activation's nonzeros: out[t] = down_bias + sum over k with a[t, k] != 0 of
// a[t, k] * (dot(w[k], x[t]) + bias[k]) * down_t[k] (down_t = the down-projection's weight transposed). The same
// sums as gated_rows then down_rows, in one call and without the [tokens, width] intermediate: at one token the
// calls, the product a * u and the intermediate between them cost about as much as the sparse rows themselves.
torch::Tensor gated_mlp_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w,
                             const torch::Tensor& bias, const torch::Tensor& down_t, const torch::Tensor& down_bias) {
  const int64_t n = x.size(0), din = x.size(1), f = w.size(0), d = down_t.size(1);
  ByNeuron g = group_by_neuron(a.data_ptr<float>(), n, f);
  // each entry's activation becomes the down-projection's coefficient a[t, k] * u[t, k]
  active_dots(g, x.data_ptr<float>(), w.data_ptr<float>(), din, bias_or_null(bias),
              [&](int32_t e, int64_t, int64_t, float u) { g.value[e] *= u; });
  auto out = torch::empty({n, d}, x.options());
  add_active_rows(g, n, down_t.data_ptr<float>(), d, bias_or_null(down_bias), out.data_ptr<float>());
  return out;
}

// int8 weights with one scale per output feature (symmetric, per channel, as onnxruntime's and fbgemm's dynamic
// int8 store them): the same products as down_rows / gated_rows, reading a quarter of the bytes per active row.
// Activations stay float, so the result is exactly h @ (scale * q) in float arithmetic (no activation rounding).

// out[t, j] = bias[j] + scale[j] * sum over k with h[t, k] != 0 of h[t, k] * q_t[k, j]
torch::Tensor down_rows_int8(const torch::Tensor& h, const torch::Tensor& q_t, const torch::Tensor& scale,
                             const torch::Tensor& bias) {
  const int64_t n = h.size(0), f = h.size(1), d = q_t.size(1);
  auto out = torch::zeros({n, d}, h.options());
  const int8_t* wp = q_t.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const ByNeuron g = group_by_neuron(h.data_ptr<float>(), n, f);
  const int64_t m = g.neurons.size();
  at::parallel_for(0, d, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < std::min(kRowsAhead, m); ++i) prefetch_bytes(wp + g.neurons[i] * d + j0, j1 - j0);
    for (int64_t i = 0; i < m; ++i) {
      if (i + kRowsAhead < m) prefetch_bytes(wp + g.neurons[i + kRowsAhead] * d + j0, j1 - j0);
      const int8_t* __restrict w = wp + g.neurons[i] * d;
      for (int32_t e = g.first[i]; e < g.first[i + 1]; ++e) {
        const float v = g.value[e];
        float* __restrict o = op + g.token[e] * d;
        #pragma omp simd
        for (int64_t j = j0; j < j1; ++j) o[j] += v * static_cast<float>(w[j]);
      }
    }
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = j0; j < j1; ++j) op[t * d + j] = op[t * d + j] * sp[j] + (bp ? bp[j] : 0.0f);
  });
  return out;
}

// u[t, k] = scale[k] * dot(q[k], x[t]) + bias[k] where a[t, k] != 0, else 0
torch::Tensor gated_rows_int8(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& q,
                              const torch::Tensor& scale, const torch::Tensor& bias) {
  const int64_t n = x.size(0), din = x.size(1), f = q.size(0);
  auto out = torch::zeros({n, f}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const ByNeuron g = group_by_neuron(a.data_ptr<float>(), n, f);
  const int64_t m = g.neurons.size();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < std::min(begin + kRowsAhead, end); ++i) prefetch_bytes(wp + g.neurons[i] * din, din);
    for (int64_t i = begin; i < end; ++i) {
      if (i + kRowsAhead < end) prefetch_bytes(wp + g.neurons[i + kRowsAhead] * din, din);
      const int64_t k = g.neurons[i];
      const int8_t* __restrict wk = wp + k * din;
      for (int32_t e = g.first[i]; e < g.first[i + 1]; ++e) {
        const float* __restrict xt = xp + g.token[e] * din;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < din; ++j) s += static_cast<float>(wk[j]) * xt[j];
        op[g.token[e] * f + k] = s * sp[k] + (bp ? bp[k] : 0.0f);
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

void check_int8_weight(const torch::Tensor& q, const torch::Tensor& scale, int64_t out_features, const char* what) {
  TORCH_CHECK(q.scalar_type() == torch::kChar, what, ": int8 weight expected");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.dim() == 1 && scale.size(0) == out_features, what,
              ": one float32 scale per output feature expected");
}

torch::Tensor sparse_down_int8(torch::Tensor h, torch::Tensor q_t, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(h.dim() == 2 && q_t.dim() == 2 && h.size(1) == q_t.size(0), "sparse_down_int8: shapes");
  check_float(h, "sparse_down_int8");
  check_int8_weight(q_t, scale, q_t.size(1), "sparse_down_int8");
  return down_rows_int8(h.contiguous(), q_t.contiguous(), scale.contiguous(),
                        bias.numel() ? bias.to(torch::kFloat).contiguous() : bias);
}

torch::Tensor gate_rows_int8(torch::Tensor x, torch::Tensor a, torch::Tensor q, torch::Tensor scale,
                             torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && q.dim() == 2 && x.size(0) == a.size(0) && a.size(1) == q.size(0)
              && x.size(1) == q.size(1), "gate_rows_int8: shapes");
  check_float(x, "gate_rows_int8"); check_float(a, "gate_rows_int8");
  check_int8_weight(q, scale, q.size(0), "gate_rows_int8");
  return gated_rows_int8(x.contiguous(), a.contiguous(), q.contiguous(), scale.contiguous(),
                         bias.numel() ? bias.to(torch::kFloat).contiguous() : bias);
}

// Whether at most max_density of t's entries are nonzero, counted in the compiled code (a Python count around a
// one-token int8 block costs 3% of it) and stopped once the limit is passed. Anything but a float CPU
// tensor answers false: the caller then runs its dense layer, which handles every case.
bool density_at_most(torch::Tensor t, double max_density) {
  if (t.scalar_type() != torch::kFloat || !t.device().is_cpu() || !t.is_contiguous()) return false;
  const float* p = t.data_ptr<float>();
  const int64_t n = t.numel(), limit = static_cast<int64_t>(max_density * n);
  int64_t count = 0;
  for (int64_t start = 0; start < n; start += 1024) {  // branch-free blocks (they vectorise), the limit between them
    const int64_t end = std::min(start + 1024, n);
    int32_t block = 0;
    #pragma omp simd reduction(+:block)
    for (int64_t i = start; i < end; ++i) block += p[i] != 0.0f;
    count += block;
    if (count > limit) return false;
  }
  return true;
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

// The fused gated MLP with its count and choice: the dense block (down(a * gate(x))) above max_density. Both
// swapped projections' tallies get the call, so the per-layer report stays whole.
torch::Tensor gated_mlp_auto(torch::Tensor w, torch::Tensor bias, torch::Tensor down_t, torch::Tensor down_w,
                             torch::Tensor down_bias, double max_density, torch::Tensor gate_tally,
                             torch::Tensor down_tally, torch::Tensor x, torch::Tensor a) {
  const int64_t f = w.size(0), din = w.size(1), d = down_t.size(1);
  auto dense = [&] { return dense_product(a * dense_product(x, w, bias), down_w, down_bias); };
  if (x.scalar_type() != torch::kFloat || a.scalar_type() != torch::kFloat || !x.device().is_cpu() || x.dim() < 1
      || x.size(-1) != din || a.numel() != x.numel() / din * f || down_t.size(0) != f)
    return dense();
  auto flat = x.reshape({-1, din}).contiguous();
  auto pattern = a.reshape({-1, f}).contiguous();
  const int64_t count = nonzero_count(pattern);
  const bool is_sparse = count <= max_density * pattern.numel();
  add_to_tally(gate_tally, pattern.size(0), count, is_sparse);
  add_to_tally(down_tally, pattern.size(0), count, is_sparse);
  if (!is_sparse) return dense();
  auto sizes = x.sizes().vec();
  sizes.back() = d;
  return gated_mlp_rows(flat, pattern, w, bias, down_t, down_bias).view(sizes);
}

// The Python bindings (what torch's load_inline generates for a list of functions)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_down", torch::wrap_pybind_function(sparse_down), "sparse_down");
  m.def("gate_rows", torch::wrap_pybind_function(gate_rows), "gate_rows");
  m.def("down_auto", torch::wrap_pybind_function(down_auto), "down_auto");
  m.def("gate_auto", torch::wrap_pybind_function(gate_auto), "gate_auto");
  m.def("gated_mlp_auto", torch::wrap_pybind_function(gated_mlp_auto), "gated_mlp_auto");
  m.def("sparse_down_int8", torch::wrap_pybind_function(sparse_down_int8), "sparse_down_int8");
  m.def("gate_rows_int8", torch::wrap_pybind_function(gate_rows_int8), "gate_rows_int8");
  m.def("density_at_most", torch::wrap_pybind_function(density_at_most), "density_at_most");
}
