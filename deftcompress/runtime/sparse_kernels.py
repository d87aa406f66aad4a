"""Small C++ kernels for sparse MLP execution, compiled on first use (torch's JIT extension builder),
and the products the runtime's sparse paths call (through the kernels where they built, PyTorch where not).

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

The source is `kernels/sparse_mlp.cpp` (shipped with the package). It is built with `FLAGS` under the module
name `deftcompress_sparse_mlp_<build_key>`: a short hash of the source bytes, the flags, the torch version and
the CPU (`cpu_identity()`; `-march=native` code must not be loaded on another CPU sharing the cache), so a
changed source, flag, torch or machine builds anew and an unchanged one loads the build torch cached under
~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR). Building needs a C++ compiler and ninja
(`pip install ninja`) at first use. Without them (or with DEFTCOMPRESS_NO_KERNELS=1) `load()` returns None,
`why_not()` says why, and the runtime uses its pure-PyTorch paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).resolve().parent / "kernels" / "sparse_mlp.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd")

# /proc/cpuinfo fields of the first processor that decide what -march=native compiles to (x86, then Arm)
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags",
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU as `-march=native` sees it: the first processor's identity and feature lines of /proc/cpuinfo
    (`cpuinfo`: its text, for tests), or platform.machine() and platform.processor() where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor only
            continue
        name, _, value = line.partition(":")
        name = name.strip()
        if name in _CPU_FIELDS and name not in fields:
            fields[name] = " ".join(value.split())
    if fields:
        return "\n".join(f"{name}: {fields[name]}" for name in _CPU_FIELDS if name in fields)
    return f"{platform.machine()} {platform.processor()}".strip() or "cpu"


def build_key(source: bytes, flags, torch_version: str, cpu: str) -> str:
    """Twelve hex digits of a SHA-256 over the source bytes, the compile flags, the torch version and the CPU
    identity (each part length-prefixed, so no two different inputs run together into the same bytes)."""
    digest = hashlib.sha256()
    for part in (source, "\0".join(flags).encode(), torch_version.encode(), cpu.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:12]


def module_name(source: bytes | None = None) -> str:
    """The extension's module name on this machine: `deftcompress_sparse_mlp_<build_key>`."""
    source = SOURCE.read_bytes() if source is None else source
    return f"deftcompress_sparse_mlp_{build_key(source, FLAGS, torch.__version__, cpu_identity())}"


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
        from torch.utils.cpp_extension import load as build

        _loaded = build(name=module_name(), sources=[str(SOURCE)], extra_cflags=list(FLAGS), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build, no source: the pure-PyTorch paths still run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _why_not = f"the C++ kernels did not build ({first[:200]})"
        _loaded = None
    return _loaded


def why_not() -> str | None:
    return _why_not


# ---- the products the sparse paths call ---------------------------------------------------------

_EMPTY = torch.empty(0)  # "no bias" for the kernels


def _down_per_token(h: torch.Tensor, weight_t: torch.Tensor, bias, nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """sum over each token's nonzero activations of value * row of W^T: the compiled kernel (one pass), or
    `embedding_bag` over the nonzero (token, neuron) pairs; either reads only the active rows."""
    kernels = load()
    if kernels is not None and h.dtype == torch.float32 and h.device.type == "cpu":
        return kernels.sparse_down(h, weight_t, bias.detach() if bias is not None else _EMPTY)
    nonzero = h != 0 if nonzero is None else nonzero
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major: grouped by token
    counts = nonzero.sum(1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    out = F.embedding_bag(cols, weight_t, offsets, mode="sum", per_sample_weights=h[rows, cols])
    return out + bias if bias is not None else out


def _down_union(h: torch.Tensor, weight_t: torch.Tensor, bias, nonzero: torch.Tensor) -> torch.Tensor:
    """One matmul over the neurons active in any token of the batch (contiguous rows of W^T)."""
    cols = nonzero.any(0).nonzero().squeeze(1)
    out = h.index_select(1, cols) @ weight_t.index_select(0, cols)
    return out + bias if bias is not None else out


def _gated_per_token(x: torch.Tensor, weight: torch.Tensor, bias, act_output: torch.Tensor) -> torch.Tensor:
    """The multiplied projection for each token's active neurons only (the compiled kernel; no PyTorch path)."""
    return load().gate_rows(x, act_output, weight, bias.detach() if bias is not None else _EMPTY)


def _gated_union(x: torch.Tensor, weight: torch.Tensor, bias, active: torch.Tensor) -> torch.Tensor:
    """The multiplied projection only for neurons the activation left nonzero in some token; zeros elsewhere."""
    cols = active.any(0).nonzero().squeeze(1)
    part = x @ weight.index_select(0, cols).t()
    if bias is not None:
        part = part + bias.index_select(0, cols)
    out = x.new_zeros(x.shape[0], weight.shape[0])
    out.index_copy_(1, cols, part)
    return out


# ---- int8 weights ----------------------------------------------------------------------------------

def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output feature (a row of an nn.Linear weight), as dynamic int8 stores
    weights: q = round(w / s) in [-127, 127], s = max |w_row| / 127. Returns (q, s)."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def down_int8(h: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h @ (q * scale)^T + bias reading only the int8 rows of active neurons (`q_t`: the down-projection's int8
    weight transposed, [d_ff, d_model]; `scale`: [d_model]). Without the kernels: the same product, dense."""
    _check_int8(q_t, scale, q_t.shape[1], "down_int8")
    kernels = load()
    if kernels is not None and h.dtype == torch.float32 and h.device.type == "cpu":
        return kernels.sparse_down_int8(h, q_t, scale, bias.detach() if bias is not None else _EMPTY)
    out = (h @ q_t.float()) * scale
    return out + bias if bias is not None else out


def gate_int8(x: torch.Tensor, active: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The multiplied projection of a gated MLP with int8 weights (`q`: [d_ff, d_model]), only where `active` is
    nonzero (zeros elsewhere). Without the kernels: dense, then masked."""
    _check_int8(q, scale, q.shape[0], "gate_int8")
    kernels = load()
    if kernels is not None and x.dtype == torch.float32 and active.dtype == torch.float32 and x.device.type == "cpu":
        return kernels.gate_rows_int8(x, active, q, scale, bias.detach() if bias is not None else _EMPTY)
    out = (x @ q.float().t()) * scale
    out = out + bias if bias is not None else out
    return out * (active != 0)


def _check_int8(q: torch.Tensor, scale: torch.Tensor, out_features: int, what: str) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"{what}: the weight must be a 2-D int8 tensor, got {q.dtype} with {q.dim()} dimensions")
    if scale.dtype != torch.float32 or scale.shape != (out_features,):
        raise ValueError(f"{what}: one float32 scale per output feature expected ({out_features}), got "
                         f"{scale.dtype} {tuple(scale.shape)}")


INT8_MAX_DENSITY = 0.2  # above it the dense int8 product wins (benchmarks/results/sparse_mlp_int8.md: crossover ~25%)


def sparse_enough(t: torch.Tensor, max_density: float = INT8_MAX_DENSITY) -> bool:
    """Whether at most `max_density` of `t` is nonzero: the compiled count (it stops at the limit), or
    torch's where the kernels did not build."""
    kernels = load()
    if kernels is not None:
        return kernels.density_at_most(t, max_density)
    return int(torch.count_nonzero(t)) <= max_density * t.numel()


def down_int8_or_dense(h: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dense,
                       max_density: float = INT8_MAX_DENSITY) -> torch.Tensor:
    """The sparse int8 down-projection where `h` is at most `max_density` nonzero, else `dense(h)`: the layer's own
    dense int8 product (one count decides; the sparse path loses above about a quarter)."""
    if sparse_enough(h, max_density):
        return down_int8(h, q_t, scale, bias)
    return dense(h)
