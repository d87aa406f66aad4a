"""The sparse MLP kernels' build: one compiled module per source text, flags, torch and CPU (nothing compiled here)."""

import platform

from deftcompress.runtime import sparse_kernels
from deftcompress.runtime.sparse_kernels import FLAGS, SOURCE, build_key, cpu_identity, module_name

_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse sse2 avx avx2 avx512f
bogomips\t: 5200.00

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f
"""


def test_the_build_key_changes_with_source_flags_torch_and_cpu_and_only_with_them():
    base = dict(source=b"int f() { return 1; }\n", flags=("-O3", "-march=native"), torch_version="2.13.0+cpu",
                cpu="model name: A\nflags: avx2")
    key = build_key(**base)
    assert len(key) == 12 and int(key, 16) >= 0
    assert build_key(**base) == key  # the same inputs: the same module, loaded from torch's cache
    assert build_key(**{**base, "flags": list(base["flags"])}) == key  # a list or a tuple of the same flags
    changed = [{"source": b"int f() { return 2; }\n"}, {"source": base["source"] + b" "},
               {"flags": ("-O2", "-march=native")}, {"flags": ("-O3",)}, {"flags": ("-O3", "-march=native", "-g")},
               {"torch_version": "2.12.0+cpu"}, {"cpu": "model name: A\nflags: avx2 avx512f"},
               {"cpu": "model name: B\nflags: avx2"}]
    keys = {build_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)
    # the parts do not run together: moving bytes from one part to the next is another key
    assert build_key(b"ab", ("c",), "t", "u") != build_key(b"a", ("bc",), "t", "u")
    assert build_key(b"a", ("-O3", "x"), "t", "u") != build_key(b"a", ("-O3 x",), "t", "u")


def test_the_cpu_identity_is_the_first_processors_identity_and_features():
    identity = cpu_identity(_CPUINFO)
    assert identity.splitlines() == ["vendor_id: GenuineIntel", "cpu family: 6", "model: 167",
                                     "model name: Intel(R) Xeon(R) Processor", "flags: fpu sse sse2 avx avx2 avx512f"]
    assert cpu_identity(_CPUINFO.replace("cpu MHz\t\t: 2600.000", "cpu MHz\t\t: 3100.000")) == identity  # clocks vary
    assert cpu_identity(_CPUINFO.replace("avx512f\nbogomips", "\nbogomips")) != identity  # another CPU: another build
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    assert cpu_identity(arm) == "CPU implementer: 0x41\nCPU part: 0xd40\nFeatures: fp asimd sve"
    assert cpu_identity("") == (f"{platform.machine()} {platform.processor()}".strip() or "cpu")  # no /proc/cpuinfo


def test_the_module_name_is_keyed_by_the_shipped_source_on_this_machine():
    import torch

    source = SOURCE.read_bytes()
    assert module_name() == f"deftcompress_sparse_mlp_{build_key(source, FLAGS, torch.__version__, cpu_identity())}"
    assert module_name(source + b"\n// edited\n") != module_name()
    assert "-march=native" in FLAGS  # why the CPU is in the key


def test_the_source_is_a_standalone_extension_shipped_with_the_package():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    text = SOURCE.read_text()
    assert "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)" in text
    for name in ("sparse_down", "gate_rows", "down_auto", "gate_auto"):
        assert f'm.def("{name}", torch::wrap_pybind_function({name}), "{name}");' in text
    project = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = SOURCE.relative_to(project / "deftcompress" / "runtime").as_posix()
    assert any(fnmatch(relative, pattern) for pattern in package_data["deftcompress.runtime"])


def test_no_kernels_when_disabled(monkeypatch):
    monkeypatch.setattr(sparse_kernels, "_loaded", None)
    monkeypatch.setattr(sparse_kernels, "_why_not", None)
    monkeypatch.setenv("DEFTCOMPRESS_NO_KERNELS", "1")
    assert sparse_kernels.load() is None
    assert sparse_kernels.why_not() == "DEFTCOMPRESS_NO_KERNELS is set"


def test_a_missing_source_leaves_the_pytorch_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(sparse_kernels, "_loaded", None)
    monkeypatch.setattr(sparse_kernels, "_why_not", None)
    monkeypatch.delenv("DEFTCOMPRESS_NO_KERNELS", raising=False)
    monkeypatch.setattr(sparse_kernels, "SOURCE", tmp_path / "absent.cpp")
    assert sparse_kernels.load() is None
    assert sparse_kernels.why_not().startswith("the C++ kernels did not build")
