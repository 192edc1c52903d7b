"""ONNX Runtime sessions built from a device profile and a bundle's session config.

- providers come from the profile, in order, filtered to what this ORT build offers;
  CPUExecutionProvider always closes the list;
- a missing GPU provider is an error with ``strict``, else one warning and a fallback;
- before the first GPU session, pip's CUDA/cuDNN libraries are preloaded (``preload_gpu_libraries``);
- the bundle's config entries (e.g. ``session.qdq_matmulnbits_accuracy_level=0``) and the
  profile's ``session_config`` are applied; ``session.disable_quant_qdq`` is refused (it
  would fold the int8 weights to fp32 in memory).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import onnxruntime as ort

from ..bundle import Bundle, check_graph_inputs, check_runnable, compatibility
from ..cpu import slow_int8_math
from ..errors import UserError
from ..heap import LIBC, return_free_memory
from ..profiles import (
    DeviceProfile,
    auto_profile_name,
    builtin_profiles,
    check_session_config,
)

__all__ = ["available_providers", "session_options", "session_providers", "preload_gpu_libraries", "create_session",
           "devices_report", "BundleSessions", "return_free_memory", "hugetlb_restart_env", "hugepages_in_effect",
           "mmap_threshold_kb", "ShrinkingSession"]


_LIBC = LIBC
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def glibc_has_hugetlb() -> bool:
    """Linux with glibc >= 2.35, the first glibc that reads glibc.malloc.hugetlb."""
    if _LIBC is None or sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def hugetlb_restart_env(profile: DeviceProfile, environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart this process with for ``profile.malloc_hugetlb``, or None.

    glibc reads GLIBC_TUNABLES only at process start, so a profile that wants malloc's mappings
    backed by transparent huge pages needs a fresh process (the CLI re-executes itself once).
    None when the profile does not ask, this is not Linux with glibc >= 2.35 (older glibc
    ignores the tunable), or the environment already names the tunable (no restart loop).
    """
    environ = dict(os.environ if environ is None else environ)
    if not profile.malloc_hugetlb or not glibc_has_hugetlb():
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in current:
        return None
    environ["GLIBC_TUNABLES"] = f"{current}:{HUGETLB_TUNABLE}" if current else HUGETLB_TUNABLE
    return environ


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def hugepages_in_effect(environ: dict[str, str] | None = None, thp: Path = THP_ENABLED) -> bool:
    """glibc backs its mappings with huge pages: the tunable was set at start and the kernel's THP
    mode is "always" or "madvise" (glibc madvises its mappings)."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    if _LIBC is None or HUGETLB_TUNABLE not in tunables.split(":"):
        return False
    try:
        return "[never]" not in thp.read_text()
    except OSError:
        return False


def mmap_threshold_kb(profile: DeviceProfile) -> int | None:
    """The glibc mmap threshold to set once sessions are loaded (None: glibc's 32 MiB)."""
    if profile.hugetlb_mmap_threshold_kb is not None and hugepages_in_effect():
        return profile.hugetlb_mmap_threshold_kb
    return profile.malloc_mmap_threshold_kb


@contextlib.contextmanager
def _small_allocations_mapped(after_kb: int | None = None):
    """While ORT parses a graph, give every allocation over 128 KiB its own mapping.

    glibc raises its mmap threshold (up to 32 MiB) after large frees, such as an earlier
    session's; the parse buffers of a 0.9 GB U-Net then land on the heap and stay mapped.
    Measured (SD1.5 architecture, after the VAE and text encoder): U-Net load peak 1,454 ->
    1,054 MB. Afterwards the threshold is ``after_kb`` (a profile's ``malloc_mmap_threshold_kb``)
    or 32 MiB, the value it rises to anyway. This is process-wide: an app that tunes glibc's
    malloc itself should know.
    """
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, (after_kb or 32 * 1024) * 1024)


CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_preload_notes: list[str] | None = None  # None: not tried yet in this process

# Provider options that name a folder: "~" is expanded and the folder created.
_PATH_OPTIONS = {
    "TensorrtExecutionProvider": ("trt_engine_cache_path", "trt_timing_cache_path"),
}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (they may still fail to load)."""
    return list(ort.get_available_providers())


def session_options(profile: DeviceProfile, config_entries: dict | None = None) -> ort.SessionOptions:
    """SessionOptions for ``profile`` with the bundle's ``config_entries`` applied.

    Threads (0 = ORT default), ORT_ENABLE_ALL, then the bundle's entries and the profile's
    ``session_config``. A key set by both to different values is refused: the bundle's
    entries are what its graphs need to stay faithful. ``session.disable_quant_qdq`` is refused.
    """
    bundle_cfg = {str(k): _cfg_str(v) for k, v in (config_entries or {}).items()}
    check_session_config(bundle_cfg, "bundle session config")
    check_session_config(profile.session_config, f"device profile {profile.name!r}: session_config")
    for key, value in profile.session_config.items():
        if key in bundle_cfg and bundle_cfg[key] != value:
            raise UserError(f"device profile {profile.name!r} sets session config {key}={value} but the bundle "
                            f"needs {key}={bundle_cfg[key]}; remove it from the profile")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(profile.intra_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = profile.enable_cpu_mem_arena
    so.enable_mem_pattern = profile.enable_mem_pattern
    so.enable_mem_reuse = profile.enable_mem_reuse
    for key, value in {**bundle_cfg, **profile.session_config}.items():
        try:
            so.add_session_config_entry(key, value)
        except Exception as e:  # ORT validates a few keys when they are added
            raise UserError(f"onnxruntime refused session config {key}={value}: {e}") from None
    return so


def _cfg_str(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _prepare_options(name: str, options: dict) -> dict:
    opts = dict(options)
    for key in _PATH_OPTIONS.get(name, ()):
        if key in opts and isinstance(opts[key], str) and opts[key]:
            folder = Path(os.path.expandvars(opts[key])).expanduser()
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {key} folder {folder} for {name}: {e}") from None
            opts[key] = str(folder)
    return opts


def session_providers(
    profile: DeviceProfile,
    strict: bool = False,
    warn: Callable[[str], None] | None = None,
    available: Iterable[str] | None = None,
) -> tuple[list[str], list[dict]]:
    """The (providers, provider_options) lists to hand to ORT for ``profile``.

    Requested providers this build lacks: UserError with ``strict``, else one ``warn`` line
    naming all of them. CPUExecutionProvider is always last.
    """
    avail = list(available) if available is not None else available_providers()
    names: list[str] = []
    options: list[dict] = []
    missing: list[str] = []
    for name, opts in profile.providers:
        if name == CPU:
            continue
        if name not in avail:
            missing.append(name)
            continue
        names.append(name)
        options.append(_prepare_options(name, opts))
    if missing:
        what = ", ".join(missing)
        have = ", ".join(avail) or "none"
        verb = "is" if len(missing) == 1 else "are"
        if strict:
            raise UserError(f"{what} requested by device profile {profile.name!r} {verb} not available in this "
                            f"onnxruntime build (available: {have}); install onnxruntime-gpu or choose another --device")
        if warn is not None:
            rest = ", ".join(names + [CPU])
            warn(f"{what} requested by device profile {profile.name!r} {verb} not available in this onnxruntime "
                 f"build (available: {have}); falling back to {rest}")
    names.append(CPU)
    options.append(dict(profile.provider_options(CPU)) if CPU in profile.provider_names else {})
    return names, options


def preload_gpu_libraries() -> list[str]:
    """Load the CUDA and cuDNN libraries of pip's ``nvidia-*`` packages, once per process.

    onnxruntime-gpu's CUDA EP dlopens them by name and finds them only on the loader's path
    (system CUDA, LD_LIBRARY_PATH) or when torch loaded them first; the device never imports
    torch. ``onnxruntime.preload_dlls`` (onnxruntime-gpu >= 1.21) loads them from the nvidia
    packages next to onnxruntime. It prints what it could not load; those lines are returned
    (and kept) so a dropped provider's warning can name the cause instead of printing them.
    """
    global _preload_notes
    if _preload_notes is None:
        _preload_notes = []
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    preload()
            except Exception as e:  # noqa: BLE001 - a failed preload only means the EP may not start
                buf.write(f"preload_dlls failed: {e}\n")
            _preload_notes = [x.strip() for x in buf.getvalue().splitlines() if x.strip()]
    return _preload_notes


class ShrinkingSession:
    """An InferenceSession whose runs shrink the CPU arena afterwards (``arena_shrinkage``).

    ORT takes arena shrinkage as a run option, so every ``run`` and ``run_with_iobinding`` gets it
    unless the caller passes its own RunOptions; everything else is the session's.
    """

    def __init__(self, sess: ort.InferenceSession):
        self._sess = sess
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, input_feed, run_options=None):
        return self._sess.run(output_names, input_feed, run_options or self._run_options)

    def run_with_iobinding(self, iobinding, run_options=None):
        return self._sess.run_with_iobinding(iobinding, run_options or self._run_options)

    def __getattr__(self, name: str):
        return getattr(self._sess, name)


def create_session(
    path: str | os.PathLike,
    profile: DeviceProfile,
    config_entries: dict | None = None,
    strict: bool = False,
    warn: Callable[[str], None] | None = None,
) -> ort.InferenceSession | ShrinkingSession:
    """An InferenceSession for the graph at ``path`` on the profile's providers.

    With ``strict``, a requested GPU provider that this build lacks, or that ORT could not
    start (missing CUDA/TensorRT libraries), is a UserError; otherwise ``warn`` gets one line
    and the session falls back down the profile's list to the CPU.
    """
    so = session_options(profile, config_entries)
    names, opts = session_providers(profile, strict=strict, warn=warn)
    notes = preload_gpu_libraries() if any(n in GPU_PROVIDERS for n in names) else []
    try:
        with _small_allocations_mapped(mmap_threshold_kb(profile)):
            sess = ort.InferenceSession(str(path), sess_options=so, providers=names, provider_options=opts)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime could not load {path} with device profile {profile.name!r}: {msg}") from None
    # ORT silently drops a provider it offers but cannot start (e.g. CUDA libraries absent).
    got = set(sess.get_providers())
    dropped = [n for n in names if n != CPU and n not in got]
    if dropped:
        cause = f"({notes[0]})" if notes else "(missing CUDA/cuDNN/TensorRT libraries?)"
        line = (f"{', '.join(dropped)} from device profile {profile.name!r} could not be started by onnxruntime "
                f"{cause}; running on {', '.join(sess.get_providers())}")
        if strict:
            raise UserError(line)
        if warn is not None:
            warn(line)
    return ShrinkingSession(sess) if profile.arena_shrinkage else sess


def devices_report(profile_names: Iterable[str] | None = None) -> list[dict]:
    """One dict per builtin profile for ``zoodip-edge devices``.

    Keys: name, description, providers (requested, in order), available (those this ORT
    offers), usable (its first provider is offered, so it runs as intended), auto (True
    for the profile ``--device auto`` picks), auto_reason, memory_budget_mb,
    batch_perturbations, resident_sessions, recommended_recipe.
    """
    avail = available_providers()
    auto_name, reason = auto_profile_name(avail)
    profiles = builtin_profiles()
    names = list(profiles) if profile_names is None else list(profile_names)
    unknown = [n for n in names if n not in profiles]
    if unknown:
        raise UserError(f"unknown device profile {unknown[0]!r}; choose from {', '.join(profiles)}")
    rows = []
    for n in names:
        p = profiles[n]
        offered = [q for q in p.provider_names if q in avail]
        rows.append({
            "name": p.name,
            "description": p.description,
            "providers": list(p.provider_names),
            "available": offered,
            "usable": bool(p.providers) and p.providers[0][0] in avail,
            "auto": p.name == auto_name,
            "auto_reason": reason if p.name == auto_name else "",
            "memory_budget_mb": p.memory_budget_mb,
            "batch_perturbations": p.batch_perturbations,
            "resident_sessions": p.resident_sessions,
            "recommended_recipe": p.recommended_recipe,
        })
    return rows


class BundleSessions:
    """ORT sessions of one bundle; resident, or loaded and released in turn (low-memory profiles)."""

    def __init__(self, bundle: Bundle, profile: DeviceProfile, strict: bool = False,
                 warn: Callable[[str], None] | None = None):
        check_runnable(bundle)  # a Bundle read with load_bundle(run=False) may come here too
        self.bundle, self.profile, self.strict = bundle, profile, strict
        self.open: dict[str, Any] = {}
        seen: set[str] = set()

        def warn_once(msg: str) -> None:  # sessions reloaded in turn would repeat the same fallback warning
            if warn is not None and msg not in seen:
                seen.add(msg)
                warn(msg)

        self.warn = warn_once
        for msg in compatibility(bundle):  # exported before a feature its recipe has now
            self.warn(msg)

    def get(self, name: str):
        if name not in self.open:
            if not self.profile.resident_sessions:
                self.release_all()
            self.open[name] = create_session(self.bundle.path(name), self.profile,
                                             self.bundle.manifest["session"]["config_entries"], self.strict, self.warn)
            check_graph_inputs(self.bundle, name, [(i.name, i.shape) for i in self.open[name].get_inputs()])
            return_free_memory()
            if self.open[name].get_providers()[0] == "CPUExecutionProvider":
                matmuls = self.bundle.manifest["recipe"].get("graphs", {}).get(name, {}).get("int8_matmul", 0)
                reason = slow_int8_math() if matmuls else None
                if reason:
                    self.warn(f"{name}: {matmuls} MatMuls of this bundle compute in int8, but {reason}")
        return self.open[name]

    def run(self, name: str, feed: dict, outputs: list[str]) -> list:
        """``outputs`` of graph ``name`` on ``feed`` (its session opened as ``get`` does)."""
        return self.get(name).run(outputs, feed)

    def release(self, name: str) -> None:
        if self.open.pop(name, None) is not None:
            gc.collect()
            return_free_memory()

    def release_all(self) -> None:
        for name in list(self.open):
            self.release(name)
