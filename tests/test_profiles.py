"""Device profiles (zoodip_edge.profiles) and ORT sessions built from them (runtime/sessions.py).

Runs on a CPU-only onnxruntime in a few seconds: the GPU profiles are checked as data and
for their fallback to the CPU.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from zoodip_edge.errors import UserError
from zoodip_edge.profiles import (
    ALIASES,
    KNOWN_PROVIDERS,
    DeviceProfile,
    auto_profile,
    auto_profile_name,
    builtin_profiles,
    load_profile,
    resolve_profile,
)

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ROOT / "devices"
EXPECTED = {"cpu", "cpu-lowmem", "cuda", "cuda-lowvram", "jetson-orin-nano", "tensorrt"}
GiB = 1024 ** 3

ort = pytest.importorskip("onnxruntime")

VALID = """\
name = "mine"
description = "a test profile"
intra_op_threads = 2
batch_perturbations = false
resident_sessions = true
memory_budget_mb = 1024
io_binding = false

[[providers]]
name = "CPUExecutionProvider"
options = {}
"""


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------ shipped profiles

def test_every_shipped_profile_loads_and_validates():
    files = sorted(DEVICES.glob("*.toml"))
    assert {f.stem for f in files} >= EXPECTED
    builtins = builtin_profiles()
    assert set(builtins) == {f.stem for f in files}
    for f in files:
        p = load_profile(f)
        assert isinstance(p, DeviceProfile)
        assert p.name == f.stem
        assert p.description
        assert p.providers and all(n in KNOWN_PROVIDERS for n in p.provider_names)
        assert p.provider_names[-1] == "CPUExecutionProvider", f"{f.name}: CPU EP must close the list"
        assert p == builtins[p.name]
        assert "session.disable_quant_qdq" not in p.session_config


def test_shipped_profiles_say_what_the_design_asks():
    b = builtin_profiles()
    cpu = b["cpu"]
    assert cpu.provider_names == ("CPUExecutionProvider",)
    # cpu batches the perturbations: the int8-cpu export with the shared prefix fits 1.5 GB batched (docs/performance.md)
    assert cpu.intra_op_threads == 0 and cpu.batch_perturbations and cpu.resident_sessions
    assert cpu.recommended_recipe == "int8-cpu"

    cuda = b["cuda"]
    assert cuda.provider_names == ("CUDAExecutionProvider", "CPUExecutionProvider")
    o = cuda.provider_options("CUDAExecutionProvider")
    assert "gpu_mem_limit" not in o
    assert o["arena_extend_strategy"] == "kSameAsRequested"
    assert o["cudnn_conv_algo_search"] == "HEURISTIC"
    assert o["cudnn_conv_use_max_workspace"] == "0"
    assert cuda.io_binding and cuda.batch_perturbations and cuda.resident_sessions

    low = b["cuda-lowvram"]
    assert low.provider_options("CUDAExecutionProvider")["gpu_mem_limit"] == int(3.5 * GiB)
    # Under a memory cap HEURISTIC chose conv workspaces over the cap (docs/results/2026-11-27-h200/cuda_ep_followups.md)
    for capped in (low, b["jetson-orin-nano"]):
        assert capped.provider_options("CUDAExecutionProvider")["cudnn_conv_algo_search"] == "DEFAULT"
    assert not low.batch_perturbations and not low.resident_sessions
    assert low.memory_budget_mb == 4096

    j = b["jetson-orin-nano"]
    assert j.provider_names == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    t = j.provider_options("TensorrtExecutionProvider")
    assert t["trt_fp16_enable"] == "True" and t["trt_int8_enable"] == "False"
    assert t["trt_engine_cache_enable"] == "True"
    assert t["trt_engine_cache_path"] == "~/.cache/zoodip-edge/trt"
    assert t["trt_max_workspace_size"] == GiB
    assert j.provider_options("CUDAExecutionProvider")["gpu_mem_limit"] == 3 * GiB
    assert not j.batch_perturbations and not j.resident_sessions
    assert j.memory_budget_mb == 6000

    trt = b["tensorrt"]
    assert trt.provider_names == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt.provider_options("TensorrtExecutionProvider")["trt_fp16_enable"] == "True"
    assert trt.provider_options("TensorrtExecutionProvider")["trt_engine_cache_enable"] == "True"

    for name in ("cuda", "cuda-lowvram", "jetson-orin-nano", "tensorrt"):
        assert b[name].recommended_recipe == "int8-gpu"


def test_recommended_recipes_exist():
    pytest.importorskip("onnx")
    from zoodip_edge.export.quantize import RECIPES

    for p in builtin_profiles().values():
        assert p.recommended_recipe in RECIPES, p.name


def test_profiles_reachable_from_installed_package():
    try:
        importlib.metadata.distribution("zoodip-edge")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("zoodip-edge is not installed as a distribution (source checkout); "
                    "install the wheel to check zoodip_edge.devices")
    import zoodip_edge

    if Path(zoodip_edge.__file__).resolve().is_relative_to(ROOT):
        # Editable install or source checkout: setuptools' editable finder cannot map the
        # namespace subpackage zoodip_edge.devices (no __init__.py) onto devices/, so the
        # code falls back to the checkout's devices/ folder, checked here instead.
        assert set(builtin_profiles()) >= EXPECTED
        pytest.skip("zoodip_edge is imported from the source tree (editable install); "
                    "the wheel layout is checked by test_profiles_found_in_wheel_layout")
    from importlib.resources import files

    names = {e.name for e in files("zoodip_edge.devices").iterdir()}
    assert {f"{n}.toml" for n in EXPECTED} <= names
    assert set(builtin_profiles()) >= EXPECTED


def test_profiles_found_in_wheel_layout(tmp_path):
    """The wheel puts devices/*.toml at zoodip_edge/devices/ (no __init__.py): the profiles are
    found there through importlib.resources, not through the source tree."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "zoodip_edge", site / "zoodip_edge",
                    ignore=shutil.ignore_patterns("__pycache__", "devices"))
    (site / "zoodip_edge" / "devices").mkdir()
    for f in DEVICES.glob("*.toml"):
        shutil.copy(f, site / "zoodip_edge" / "devices" / f.name)
    code = (
        "import sys, json\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "from importlib.resources import files\n"
        "import zoodip_edge.profiles as P\n"
        "names = sorted(e.name for e in files('zoodip_edge.devices').iterdir() if e.name.endswith('.toml'))\n"
        "print(json.dumps([P.__file__, str(P.profiles_dir()), names, sorted(P.builtin_profiles())]))\n"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    mod_file, where, names, profiles = json.loads(out.stdout)
    assert Path(mod_file).resolve().is_relative_to(site.resolve())
    assert str(ROOT / "devices") not in where
    assert {f"{n}.toml" for n in EXPECTED} <= set(names)
    assert set(profiles) >= EXPECTED


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, zoodip_edge.profiles, zoodip_edge.runtime.sessions\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("edit, field", [
    (lambda s: s + 'gpu_layers = 3\n', "gpu_layers"),                                   # unknown key
    (lambda s: s.replace("intra_op_threads = 2", 'intra_op_threads = "2"'), "intra_op_threads"),  # wrong type
    (lambda s: s.replace("intra_op_threads = 2", "intra_op_threads = true"), "intra_op_threads"),  # bool is not int
    (lambda s: s.replace("batch_perturbations = false", "batch_perturbations = 1"), "batch_perturbations"),
    (lambda s: s.replace("intra_op_threads = 2", "intra_op_threads = -1"), "intra_op_threads"),     # negative
    (lambda s: s.replace("memory_budget_mb = 1024", "memory_budget_mb = -5"), "memory_budget_mb"),
    (lambda s: s.replace("memory_budget_mb = 1024", "memory_budget_mb = 1.5"), "memory_budget_mb"),  # not an integer
    (lambda s: s.replace("memory_budget_mb = 1024", "memory_budget_mb = true"), "memory_budget_mb"),
    (lambda s: s.replace('"CPUExecutionProvider"', '"CudaExecutionProvider"'), "providers[0].name"),  # unknown EP
    (lambda s: s.replace("options = {}", "options = { gpu_mem_limit = -1 }"), "providers[0].options.gpu_mem_limit"),
    (lambda s: s.replace("options = {}", "options = { x = 1.5 }"), "providers[0].options.x"),
    (lambda s: s.replace("options = {}", "options = {}\nthreads = 2"), "providers[0]"),
    (lambda s: s + '\n[session_config]\n"session.disable_quant_qdq" = "1"\n', "session.disable_quant_qdq"),
    (lambda s: s + '\n[session_config]\nsession.foo = "1"\n', "session_config.session"),     # unquoted dotted key
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nenable_cpu_mem_arena = "no"'),
     "enable_cpu_mem_arena"),
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nenable_mem_reuse = 0'),
     "enable_mem_reuse"),
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nmalloc_mmap_threshold_kb = 16'),
     "malloc_mmap_threshold_kb"),
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nmalloc_hugetlb = "yes"'), "malloc_hugetlb"),
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nenable_cpu_mem_arena = false\n'
                                                    'arena_shrinkage = true'), "arena_shrinkage"),  # needs the arena
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nhugetlb_mmap_threshold_kb = 4096'),
     "hugetlb_mmap_threshold_kb"),                                                          # without malloc_hugetlb
    (lambda s: s.replace("memory_budget_mb = 1024", 'memory_budget_mb = 1024\nmalloc_hugetlb = true\n'
                                                    'hugetlb_mmap_threshold_kb = 64'), "hugetlb_mmap_threshold_kb"),
])
def test_invalid_profile_is_refused_naming_file_and_field(tmp_path, edit, field):
    p = write(tmp_path, edit(VALID))
    with pytest.raises(UserError) as ei:
        load_profile(p)
    msg = str(ei.value)
    assert str(p) in msg and field in msg, msg
    assert "\n" not in msg


def test_empty_providers_refused(tmp_path):
    text = VALID.split("[[providers]]")[0].replace('io_binding = false', 'io_binding = false\nproviders = []')
    p = write(tmp_path, text)
    with pytest.raises(UserError, match=r"p\.toml: field 'providers' is empty"):
        load_profile(p)


def test_disable_quant_qdq_refused_with_reason(tmp_path):
    p = write(tmp_path, VALID + '\n[session_config]\n"session.disable_quant_qdq" = 1\n')
    with pytest.raises(UserError, match="fp32"):
        load_profile(p)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(write(tmp_path, "name = \n"))
    with pytest.raises(UserError, match="not found"):
        load_profile(tmp_path / "nope.toml")


def test_valid_profile_normalizes_values(tmp_path):
    p = load_profile(write(tmp_path, VALID.replace(
        "options = {}", "options = { flag = true, n = 3, s = \"x\" }"
    ) + '\n[session_config]\n"session.intra_op.allow_spinning" = 0\n'))
    assert p.provider_options("CPUExecutionProvider") == {"flag": "True", "n": 3, "s": "x"}
    assert p.session_config == {"session.intra_op.allow_spinning": "0"}


def test_memory_budget_is_optional(tmp_path):
    """A profile without memory_budget_mb has none (personalize never refuses for memory under it)."""
    assert load_profile(write(tmp_path, VALID)).memory_budget_mb == 1024
    assert load_profile(write(tmp_path, VALID.replace("memory_budget_mb = 1024\n", ""))).memory_budget_mb is None


# -------------------------------------------------------------------------------- resolve

def test_resolve_names_aliases_paths_and_unknown(tmp_path):
    b = builtin_profiles()
    for name in EXPECTED:
        assert resolve_profile(name) == b[name]
    assert resolve_profile("CUDA") == b["cuda"]
    assert resolve_profile("cuda_lowvram") == b["cuda-lowvram"]
    for alias, target in ALIASES.items():
        assert resolve_profile(alias) == b[target]
    assert resolve_profile("auto") == auto_profile()
    assert resolve_profile(str(DEVICES / "tensorrt.toml")) == b["tensorrt"]
    mine = write(tmp_path, VALID, "mine.toml")
    assert resolve_profile(str(mine)).name == "mine"
    with pytest.raises(UserError) as ei:
        resolve_profile("quantum")
    msg = str(ei.value)
    assert "quantum" in msg and all(n in msg for n in EXPECTED) and "auto" in msg
    with pytest.raises(UserError, match="not found"):
        resolve_profile(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize("providers, mem, jetson, want", [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], None, True, "jetson-orin-nano"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 7600, True, "jetson-orin-nano"),
    (["CPUExecutionProvider"], None, True, "cpu"),          # Jetson with the CPU-only wheel
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 24576, False, "cuda"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 24576, False, "cuda"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 4096, False, "cuda-lowvram"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 6144, False, "cuda"),
    (["AzureExecutionProvider", "CPUExecutionProvider"], None, False, "cpu"),
    (["CPUExecutionProvider"], 2048, False, "cpu"),
])
def test_auto_profile_branches(providers, mem, jetson, want):
    assert auto_profile(providers, total_memory_mb=mem, is_jetson=jetson).name == want
    name, reason = auto_profile_name(providers, mem, jetson)
    assert name == want and reason


def test_auto_on_this_machine_matches_ort():
    p = auto_profile()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert p.name == "cpu"


# -------------------------------------------------------------------------------- sessions

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny") / "matmul.onnx"
    onnx.save(model, str(path))
    return path


def run(sess) -> np.ndarray:
    x = np.ones((2, 4), np.float32)
    return sess.run(None, {"x": x})[0]


EXPECTED_Y = np.ones((2, 4), np.float32) @ np.arange(12, dtype=np.float32).reshape(4, 3)


def test_cpu_session_runs(tiny_model):
    from zoodip_edge.runtime.sessions import create_session

    warnings: list[str] = []
    sess = create_session(tiny_model, builtin_profiles()["cpu"], {"session.qdq_matmulnbits_accuracy_level": "0"},
                          strict=True, warn=warnings.append)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(run(sess), EXPECTED_Y)
    assert warnings == []


def test_sessions_load_with_small_allocations_mapped_then_threshold_raised(tiny_model, monkeypatch):
    """glibc: the mmap threshold is 128 KiB while ORT parses a graph, 32 MiB after; trim returns memory."""
    import zoodip_edge.heap as heap
    import zoodip_edge.runtime.sessions as sessions

    calls: list[tuple] = []

    class FakeLibc:
        def mallopt(self, what, value):
            calls.append(("mallopt", what, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    real = sessions.ort.InferenceSession

    def spy(*a, **k):
        calls.append(("load",))
        return real(*a, **k)

    fake = FakeLibc()
    monkeypatch.setattr(sessions, "_LIBC", fake)
    monkeypatch.setattr(heap, "LIBC", fake)  # return_free_memory's, shared with the export
    monkeypatch.setattr(sessions.ort, "InferenceSession", spy)
    monkeypatch.setattr(sessions, "hugepages_in_effect", lambda: False)
    sess = sessions.create_session(tiny_model, builtin_profiles()["cpu"], {})
    sessions.return_free_memory()
    np.testing.assert_allclose(run(sess), EXPECTED_Y)
    assert calls == [("mallopt", -3, 128 * 1024), ("load",), ("mallopt", -3, 32 * 1024 * 1024), ("trim", 0)]
    calls.clear()  # cpu-lowmem keeps blocks over 1 MiB mapped after loading
    sessions.create_session(tiny_model, builtin_profiles()["cpu-lowmem"], {})
    assert calls == [("mallopt", -3, 128 * 1024), ("load",), ("mallopt", -3, 1024 * 1024)]
    calls.clear()  # with huge pages in effect the cpu profile maps blocks over 4 MiB, cpu-lowmem keeps 1 MiB
    monkeypatch.setattr(sessions, "hugepages_in_effect", lambda: True)
    sessions.create_session(tiny_model, builtin_profiles()["cpu"], {})
    sessions.create_session(tiny_model, builtin_profiles()["cpu-lowmem"], {})
    assert [c for c in calls if c[0] == "mallopt" and c[2] != 128 * 1024] == [("mallopt", -3, 4096 * 1024),
                                                                               ("mallopt", -3, 1024 * 1024)]
    monkeypatch.setattr(sessions, "_LIBC", None)  # not glibc: both are no-ops
    monkeypatch.setattr(heap, "LIBC", None)
    sessions.return_free_memory()
    np.testing.assert_allclose(run(sessions.create_session(tiny_model, builtin_profiles()["cpu"], {})), EXPECTED_Y)


needs_cpu_only = pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime build has CUDA EP")


@needs_cpu_only
def test_cuda_profile_falls_back_with_one_warning(tiny_model):
    from zoodip_edge.runtime.sessions import create_session

    warnings: list[str] = []
    sess = create_session(tiny_model, builtin_profiles()["cuda"], {}, warn=warnings.append)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "CUDAExecutionProvider" in warnings[0] and "'cuda'" in warnings[0]
    assert sess.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(run(sess), EXPECTED_Y)


@needs_cpu_only
def test_jetson_profile_warns_once_for_both_gpu_providers(tiny_model):
    from zoodip_edge.runtime.sessions import create_session

    warnings: list[str] = []
    sess = create_session(tiny_model, builtin_profiles()["jetson-orin-nano"], {}, warn=warnings.append)
    assert len(warnings) == 1
    assert "TensorrtExecutionProvider" in warnings[0] and "CUDAExecutionProvider" in warnings[0]
    np.testing.assert_allclose(run(sess), EXPECTED_Y)


def test_gpu_libraries_preloaded_once_and_named_when_the_provider_drops(tiny_model, monkeypatch):
    """onnxruntime-gpu finds pip's CUDA libraries only through preload_dlls (the runtime never
    imports torch): called once per process, only for GPU profiles, and what it could not load
    becomes the fallback warning's cause."""
    import zoodip_edge.runtime.sessions as sessions

    calls: list[int] = []

    def fake_preload():
        calls.append(1)
        print("Failed to load libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(sessions.ort, "preload_dlls", fake_preload, raising=False)
    monkeypatch.setattr(sessions, "_preload_notes", None)
    # A build that offers CUDA EP but cannot start it: ORT drops it and runs on the CPU.
    monkeypatch.setattr(sessions, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = sessions.ort.InferenceSession
    monkeypatch.setattr(sessions.ort, "InferenceSession", lambda path, sess_options, providers, provider_options:
                        real(path, sess_options=sess_options, providers=["CPUExecutionProvider"]))
    sessions.create_session(tiny_model, builtin_profiles()["cpu"], {})
    assert calls == []  # CPU profiles never touch the CUDA libraries
    warnings: list[str] = []
    for _ in range(2):
        sess = sessions.create_session(tiny_model, builtin_profiles()["cuda"], {}, warn=warnings.append)
    assert calls == [1]
    assert warnings and all("(Failed to load libcudart.so.13: cannot open shared object file)" in w for w in warnings)
    np.testing.assert_allclose(run(sess), EXPECTED_Y)


@needs_cpu_only
def test_strict_refuses_missing_provider(tiny_model):
    from zoodip_edge.runtime.sessions import create_session

    with pytest.raises(UserError, match=r"CUDAExecutionProvider requested by device profile 'cuda' is not "
                                        r"available in this onnxruntime build \(available: .*CPUExecutionProvider"):
        create_session(tiny_model, builtin_profiles()["cuda"], {}, strict=True)


def test_session_options_apply_entries():
    from zoodip_edge.runtime.sessions import session_options

    prof = builtin_profiles()["cpu"]
    so = session_options(prof, {"session.qdq_matmulnbits_accuracy_level": "0", "session.x_flag": True})
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so.get_session_config_entry("session.x_flag") == "1"
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.intra_op_num_threads == 0
    # the cpu profile: arena on but shrunk after every run, no memory pattern, no reuse (docs/performance.md)
    assert so.enable_cpu_mem_arena and not so.enable_mem_pattern and not so.enable_mem_reuse
    assert builtin_profiles()["cpu"].arena_shrinkage and not builtin_profiles()["cpu-lowmem"].enable_cpu_mem_arena
    so = session_options(builtin_profiles()["cuda"], {})
    assert so.enable_cpu_mem_arena and so.enable_mem_pattern and so.enable_mem_reuse


def test_config_entries_reach_ort(tiny_model):
    """Observable effects: ORT reads the entries at load time."""
    from zoodip_edge.runtime.sessions import create_session

    cpu = builtin_profiles()["cpu"]
    # Told the file is in ORT format, ORT refuses the .onnx file.
    with pytest.raises(UserError, match="could not load"):
        create_session(tiny_model, cpu, {"session.load_model_format": "ORT"})
    # An accuracy level that is not a number is rejected by ORT's parser.
    with pytest.raises(UserError, match="could not load"):
        create_session(tiny_model, cpu, {"session.qdq_matmulnbits_accuracy_level": "abc"})
    # The same key with a valid value loads and runs.
    np.testing.assert_allclose(run(create_session(tiny_model, cpu, {"session.qdq_matmulnbits_accuracy_level": "0"})),
                               EXPECTED_Y)


def test_profile_session_config_applied_and_conflicts_refused(tmp_path, tiny_model):
    from zoodip_edge.runtime.sessions import create_session, session_options

    prof = load_profile(write(tmp_path, VALID + '\n[session_config]\n"session.load_model_format" = "ORT"\n'))
    assert session_options(prof, {}).get_session_config_entry("session.load_model_format") == "ORT"
    with pytest.raises(UserError, match="could not load"):
        create_session(tiny_model, prof, {})
    prof2 = load_profile(write(tmp_path, VALID + '\n[session_config]\n"session.qdq_matmulnbits_accuracy_level" = "4"\n',
                               "p2.toml"))
    with pytest.raises(UserError, match="bundle needs session.qdq_matmulnbits_accuracy_level=0"):
        session_options(prof2, {"session.qdq_matmulnbits_accuracy_level": "0"})


def test_bundle_asking_disable_quant_qdq_refused(tiny_model):
    from zoodip_edge.runtime.sessions import create_session

    with pytest.raises(UserError, match="disable_quant_qdq.*fp32"):
        create_session(tiny_model, builtin_profiles()["cpu"], {"session.disable_quant_qdq": "1"})


def test_engine_cache_path_expanded_and_created(tmp_path, monkeypatch):
    from zoodip_edge.runtime.sessions import session_providers

    monkeypatch.setenv("HOME", str(tmp_path))
    names, opts = session_providers(builtin_profiles()["jetson-orin-nano"],
                                    available=["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"])
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cache = Path(opts[0]["trt_engine_cache_path"])
    assert cache == tmp_path / ".cache" / "zoodip-edge" / "trt" and cache.is_dir()
    assert opts[1]["gpu_mem_limit"] == 3 * GiB
    # the profile itself is unchanged
    assert builtin_profiles()["jetson-orin-nano"].provider_options("TensorrtExecutionProvider")[
        "trt_engine_cache_path"] == "~/.cache/zoodip-edge/trt"


def test_devices_report():
    from zoodip_edge.runtime.sessions import devices_report

    rows = devices_report()
    assert {r["name"] for r in rows} == set(builtin_profiles())
    assert sum(r["auto"] for r in rows) == 1
    cpu = next(r for r in rows if r["name"] == "cpu")
    assert cpu["usable"] and cpu["available"] == ["CPUExecutionProvider"]
    for r in rows:
        assert set(r["available"]) <= set(r["providers"]) and r["description"]
    assert [r["name"] for r in devices_report(["cuda"])] == ["cuda"]
    with pytest.raises(UserError):
        devices_report(["nope"])


# -------------------------------------------------------------------- glibc huge pages (restart)

def _glibc_has_hugetlb() -> bool:
    from zoodip_edge.runtime.sessions import glibc_has_hugetlb

    return glibc_has_hugetlb()


needs_glibc_235 = pytest.mark.skipif(not _glibc_has_hugetlb(), reason="glibc >= 2.35 only")


@needs_glibc_235
def test_hugetlb_restart_env(tmp_path):
    from zoodip_edge.runtime.sessions import hugetlb_restart_env

    plain = load_profile(write(tmp_path, VALID))
    huge = load_profile(write(tmp_path, VALID.replace("io_binding = false", "io_binding = false\nmalloc_hugetlb = true"), "h.toml"))
    assert not plain.malloc_hugetlb and huge.malloc_hugetlb
    assert hugetlb_restart_env(plain, {}) is None
    assert hugetlb_restart_env(huge, {"HOME": "/x"}) == {"HOME": "/x", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # other tunables are kept; one already naming hugetlb (the restarted process) means no restart
    assert hugetlb_restart_env(huge, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugetlb_restart_env(huge, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert hugetlb_restart_env(huge, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands


@needs_glibc_235
def test_cli_restarts_itself_once_for_hugetlb_only_as_a_real_process(tmp_path, monkeypatch):
    import zoodip_edge.cli as cli

    huge = load_profile(write(tmp_path, VALID.replace("io_binding = false", "io_binding = false\nmalloc_hugetlb = true")))
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(sys, "argv", ["zoodip-edge", "personalize", "b", "imgs", "--device", "h.toml"])
    cli._restart_for(huge)
    assert calls == []  # in-process (test runner, Python API): never
    monkeypatch.setattr(cli, "_MAIN", True)
    cli._restart_for(load_profile(write(tmp_path, VALID, "plain.toml")))
    assert calls == []  # the profile does not ask
    cli._restart_for(huge)
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "-m", "zoodip_edge.cli", "personalize", "b", "imgs",
                                               "--device", "h.toml"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    cli._restart_for(huge)
    assert len(calls) == 1  # the restarted process goes on


def test_hugepages_in_effect_needs_the_tunable_and_thp(tmp_path, monkeypatch):
    import zoodip_edge.runtime.sessions as sessions

    if sessions._LIBC is None:
        pytest.skip("glibc only")
    thp = tmp_path / "enabled"
    on = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    for mode, want in (("always [madvise] never", True), ("[always] madvise never", True), ("always madvise [never]", False)):
        thp.write_text(mode + "\n")
        assert sessions.hugepages_in_effect(on, thp) is want
    thp.write_text("always [madvise] never\n")
    assert not sessions.hugepages_in_effect({}, thp)
    assert not sessions.hugepages_in_effect({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp)
    assert not sessions.hugepages_in_effect(on, tmp_path / "missing")


def test_arena_shrinkage_goes_with_every_run(tiny_model, tmp_path, monkeypatch):
    """ORT takes arena shrinkage per run: a profile with it gets sessions whose run and
    run_with_iobinding pass the run option unless the caller brings its own."""
    import zoodip_edge.runtime.sessions as sessions

    seen: list = []
    real_run, real_iob = ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding

    def run(self, output_names, input_feed, run_options=None):
        seen.append(run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if run_options else None)
        return real_run(self, output_names, input_feed, run_options)

    def run_with_iobinding(self, iobinding, run_options=None):
        seen.append(run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if run_options else None)
        return real_iob(self, iobinding, run_options)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_with_iobinding)
    shrinking = sessions.create_session(tiny_model, builtin_profiles()["cpu"], {})
    np.testing.assert_allclose(shrinking.run(None, {"x": np.ones((2, 4), np.float32)})[0], EXPECTED_Y)
    binding = shrinking.io_binding()  # everything else is the session's
    binding.bind_cpu_input("x", np.ones((2, 4), np.float32))
    binding.bind_output("y")
    shrinking.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], EXPECTED_Y)
    assert seen == ["cpu:0", "cpu:0"] and shrinking.get_providers() == ["CPUExecutionProvider"]
    seen.clear()
    plain = sessions.create_session(tiny_model, builtin_profiles()["cpu-lowmem"], {})
    plain.run(None, {"x": np.ones((2, 4), np.float32)})
    assert seen == [None] and isinstance(plain, ort.InferenceSession)
