"""Device profiles: one name fans out into the ORT and loop settings for a target.

A profile is a TOML file (``devices/*.toml`` in the source tree, the package
``zoodip_edge.devices`` once installed)::

    name = "cuda"
    description = "..."
    intra_op_threads = 0          # 0 = ORT default (one per physical core)
    batch_perturbations = true    # run the n+1 perturbed passes as one batch
    resident_sessions = true      # keep text encoder + U-Net loaded (else load/release in turn)
    memory_budget_mb = 8192       # optional: personalize and generate refuse a bundle estimated over it (none: never)
    io_binding = true             # keep tensors on the device between passes
    recommended_recipe = "int8-gpu"   # optional: export recipe that suits the target
    enable_cpu_mem_arena = true   # optional (default true): ORT's CPU memory arena
    enable_mem_pattern = true     # optional (default true): ORT's memory-pattern planner
    enable_mem_reuse = true       # optional (default true): ORT's planner reuses freed buffers
    arena_shrinkage = true        # optional (needs the arena): hand the arena's free memory back after every run
    malloc_mmap_threshold_kb = 1024   # optional (glibc): blocks above this get their own mapping
    malloc_hugetlb = true         # optional (glibc >= 2.35): those mappings use transparent huge pages
    hugetlb_mmap_threshold_kb = 4096  # optional: the threshold instead, when huge pages are in effect

    [[providers]]                 # in order of preference
    name = "CUDAExecutionProvider"
    options = { arena_extend_strategy = "kSameAsRequested" }   # strings or ints, as ORT expects

    [session_config]              # optional extra ORT session config entries (quote the keys)
    "session.intra_op.allow_spinning" = "0"

Validation is strict: an unknown key, a wrong type, an unknown provider or a negative
number is refused with one line naming the file and the field.

``--device auto`` (``auto_profile``) picks, in order:

1. a Jetson (``/etc/nv_tegra_release`` exists) whose ORT offers TensorRT or CUDA EP ->
   ``jetson-orin-nano``;
2. CUDA EP offered and the GPU's memory known to be under 6 GiB -> ``cuda-lowvram``
   (memory comes from the caller or ``nvidia-smi``; unknown memory counts as enough);
3. CUDA EP offered -> ``cuda`` (``tensorrt`` is never picked automatically: its first run
   builds engines for minutes; ask for it by name);
4. otherwise ``cpu``.

This module does not import onnxruntime until ``auto_profile`` needs the provider list.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib as _toml
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

__all__ = [
    "DeviceProfile",
    "KNOWN_PROVIDERS",
    "ALIASES",
    "load_profile",
    "parse_profile",
    "builtin_profiles",
    "builtin_profile_names",
    "resolve_profile",
    "auto_profile",
    "auto_profile_name",
    "profiles_dir",
    "FORBIDDEN_SESSION_CONFIG",
]

KNOWN_PROVIDERS = frozenset({
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
})

# Short names accepted wherever a profile name is (case-insensitive, "_" same as "-").
ALIASES = {
    "gpu": "cuda",
    "trt": "tensorrt",
    "jetson": "jetson-orin-nano",
    "orin-nano": "jetson-orin-nano",
    "lowvram": "cuda-lowvram",
    "lowmem": "cpu-lowmem",
}

# Session config entries the runtime refuses, with the reason given to the user.
FORBIDDEN_SESSION_CONFIG = {
    "session.disable_quant_qdq": (
        "it makes ORT constant-fold DequantizeLinear, turning the int8 weights into fp32 "
        "copies in memory (4x the weight memory); zoodip-edge never sets it"
    ),
}

# GPUs with less memory than this (MiB) get cuda-lowvram from `auto`: the cuda profile
# batches the n+1 perturbed passes, which a 4 GB-class card cannot hold.
LOWVRAM_THRESHOLD_MB = 6144

TEGRA_RELEASE = Path("/etc/nv_tegra_release")

_REQUIRED = ("name", "providers", "intra_op_threads", "batch_perturbations", "resident_sessions", "io_binding")
_OPTIONAL = ("description", "memory_budget_mb", "session_config", "recommended_recipe", "enable_cpu_mem_arena", "enable_mem_pattern",
             "enable_mem_reuse", "malloc_mmap_threshold_kb", "malloc_hugetlb",
             "hugetlb_mmap_threshold_kb", "arena_shrinkage")
_PROVIDER_KEYS = ("name", "options")


@dataclass(frozen=True)
class DeviceProfile:
    """One target's settings. ``providers`` is ((ORT provider name, options), ...) in order."""

    name: str
    description: str
    providers: tuple[tuple[str, dict[str, str | int]], ...]
    intra_op_threads: int
    batch_perturbations: bool
    resident_sessions: bool
    memory_budget_mb: int | None  # MiB; personalize and generate refuse a bundle whose estimate is over it (runtime/memory.py)
    io_binding: bool
    session_config: dict[str, str] = field(default_factory=dict)
    recommended_recipe: str | None = None
    # ORT's CPU arena and memory-pattern planner: faster allocation, but they keep the peak
    # of every run reserved (docs/performance.md: off saves about 0.9 GB on a SD1.5 U-Net).
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    # ORT's planner hands a freed buffer to the next tensor of the same size; a buffer then lives
    # until the last tensor that reuses it (on a SD1.5 U-Net: ~0.3 GB held for no live tensor).
    enable_mem_reuse: bool = True
    # Every run shrinks the CPU arena (run option memory.enable_memory_arena_shrinkage): the arena's
    # fast reuse within a forward without holding its peak between forwards.
    arena_shrinkage: bool = False
    # glibc's mmap threshold once sessions are loaded (None: 32 MiB). Smaller returns freed
    # activations to the OS at once (lower peak), at the price of page faults on every forward.
    malloc_mmap_threshold_kb: int | None = None
    # glibc >= 2.35: back malloc's mappings with transparent huge pages (GLIBC_TUNABLES
    # glibc.malloc.hugetlb=1), which cuts the page faults a small mmap threshold costs 512-fold.
    # glibc reads it only at process start: the CLI restarts itself once with it set.
    malloc_hugetlb: bool = False
    # The mmap threshold to use instead when huge pages are in effect (the tunable set and the
    # kernel's THP not "never"): mappings then cost little, so a smaller threshold is cheap.
    hugetlb_mmap_threshold_kb: int | None = None
    source: str = field(default="", compare=False)  # file it came from, for messages

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.providers)

    def provider_options(self, name: str) -> dict[str, str | int]:
        for pname, opts in self.providers:
            if pname == name:
                return dict(opts)
        raise KeyError(name)


# ---------------------------------------------------------------------------- validation

def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _option_value(src: str, fld: str, v: Any) -> str | int:
    """Provider option values as ORT expects: strings or non-negative ints (bools -> "True"/"False")."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        if v < 0:
            raise UserError(f"{src}: {fld} must not be negative (got {v})")
        return v
    if isinstance(v, str):
        return v
    raise UserError(f"{src}: {fld} must be a string or an integer, not a {_type_name(v)}")


def _config_value(src: str, fld: str, v: Any) -> str:
    """Session config values are strings to ORT; ints and bools ("1"/"0") are converted."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        if v < 0:
            raise UserError(f"{src}: {fld} must not be negative (got {v})")
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        raise UserError(f"{src}: {fld} is a table; quote dotted keys, e.g. \"session.x\" = \"1\"")
    raise UserError(f"{src}: {fld} must be a string or an integer, not a {_type_name(v)}")


def check_session_config(entries: dict[str, str], src: str) -> None:
    """Refuse session config entries that would break the int8 contract (see FORBIDDEN_SESSION_CONFIG)."""
    for key, value in entries.items():
        reason = FORBIDDEN_SESSION_CONFIG.get(key)
        if reason is not None and str(value).strip() not in ("0", "", "False", "false"):
            raise UserError(f"{src}: refusing session config {key}={value}: {reason}")


def parse_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    """Validate a parsed TOML document and build a DeviceProfile; ``source`` names it in errors."""
    src = source
    if not isinstance(data, dict):
        raise UserError(f"{src}: a profile is a TOML table")
    unknown = [k for k in data if k not in _REQUIRED and k not in _OPTIONAL]
    if unknown:
        raise UserError(f"{src}: unknown field {unknown[0]!r} (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{src}: missing field {missing[0]!r}")

    def want(key: str, typ: type, what: str) -> Any:
        v = data[key]
        ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if not ok:
            raise UserError(f"{src}: field {key!r} must be {what}, not a {_type_name(v)} ({v!r})")
        return v

    name = want("name", str, "a string")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{src}: field 'name' must be letters, digits, '.', '_' or '-' (got {name!r})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{src}: field 'description' must be a string, not a {_type_name(description)}")
    threads = want("intra_op_threads", int, "an integer (0 = ORT default)")
    if threads < 0:
        raise UserError(f"{src}: field 'intra_op_threads' must not be negative (got {threads})")
    budget = data.get("memory_budget_mb")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise UserError(f"{src}: field 'memory_budget_mb' must be an integer (MB), not a {_type_name(budget)} ({budget!r})")
    if budget is not None and budget <= 0:
        raise UserError(f"{src}: field 'memory_budget_mb' must be positive (got {budget})")
    batch = want("batch_perturbations", bool, "true or false")
    resident = want("resident_sessions", bool, "true or false")
    io_binding = want("io_binding", bool, "true or false")
    arena = data.get("enable_cpu_mem_arena", True)
    pattern = data.get("enable_mem_pattern", True)
    reuse = data.get("enable_mem_reuse", True)
    for key, v in (("enable_cpu_mem_arena", arena), ("enable_mem_pattern", pattern), ("enable_mem_reuse", reuse)):
        if not isinstance(v, bool):
            raise UserError(f"{src}: field {key!r} must be true or false, not a {_type_name(v)} ({v!r})")
    mmap_kb, huge_kb = data.get("malloc_mmap_threshold_kb"), data.get("hugetlb_mmap_threshold_kb")
    for key, v in (("malloc_mmap_threshold_kb", mmap_kb), ("hugetlb_mmap_threshold_kb", huge_kb)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 128 <= v <= 32 * 1024):
            raise UserError(f"{src}: field {key!r} must be an integer from 128 to 32768 (KiB), not {v!r}")
    shrink = data.get("arena_shrinkage", False)
    if not isinstance(shrink, bool):
        raise UserError(f"{src}: field 'arena_shrinkage' must be true or false, not a {_type_name(shrink)} ({shrink!r})")
    if shrink and not arena:
        raise UserError(f"{src}: field 'arena_shrinkage' needs enable_cpu_mem_arena = true")
    hugetlb = data.get("malloc_hugetlb", False)
    if not isinstance(hugetlb, bool):
        raise UserError(f"{src}: field 'malloc_hugetlb' must be true or false, not a {_type_name(hugetlb)} ({hugetlb!r})")
    if huge_kb is not None and not hugetlb:
        raise UserError(f"{src}: field 'hugetlb_mmap_threshold_kb' needs malloc_hugetlb = true")
    recipe = data.get("recommended_recipe")
    if recipe is not None and (not isinstance(recipe, str) or not recipe):
        raise UserError(f"{src}: field 'recommended_recipe' must be a non-empty string")

    raw_providers = data["providers"]
    if not isinstance(raw_providers, list):
        raise UserError(f"{src}: field 'providers' must be an array of tables ([[providers]]), "
                        f"not a {_type_name(raw_providers)}")
    if not raw_providers:
        raise UserError(f"{src}: field 'providers' is empty; name at least one execution provider")
    providers: list[tuple[str, dict[str, str | int]]] = []
    for i, entry in enumerate(raw_providers):
        where = f"providers[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{src}: {where} must be a table with 'name' and 'options', not a {_type_name(entry)}")
        bad = [k for k in entry if k not in _PROVIDER_KEYS]
        if bad:
            raise UserError(f"{src}: unknown field {where}.{bad[0]!r} (known: name, options)")
        pname = entry.get("name")
        if not isinstance(pname, str):
            raise UserError(f"{src}: {where}.name must be a string naming an ORT execution provider")
        if pname not in KNOWN_PROVIDERS:
            raise UserError(f"{src}: {where}.name {pname!r} is not a known execution provider "
                            f"(known: {', '.join(sorted(KNOWN_PROVIDERS))})")
        if any(p == pname for p, _ in providers):
            raise UserError(f"{src}: {where}.name {pname!r} is listed twice")
        opts = entry.get("options", {})
        if not isinstance(opts, dict):
            raise UserError(f"{src}: {where}.options must be a table, not a {_type_name(opts)}")
        clean = {str(k): _option_value(src, f"{where}.options.{k}", v) for k, v in opts.items()}
        providers.append((pname, clean))

    raw_cfg = data.get("session_config", {})
    if not isinstance(raw_cfg, dict):
        raise UserError(f"{src}: field 'session_config' must be a table, not a {_type_name(raw_cfg)}")
    cfg = {str(k): _config_value(src, f"session_config.{k}", v) for k, v in raw_cfg.items()}
    check_session_config(cfg, f"{src}: session_config")

    return DeviceProfile(
        name=name, description=description, providers=tuple(providers), intra_op_threads=threads,
        batch_perturbations=batch, resident_sessions=resident, memory_budget_mb=budget,
        io_binding=io_binding, session_config=cfg, recommended_recipe=recipe, source=src,
        enable_cpu_mem_arena=arena, enable_mem_pattern=pattern, enable_mem_reuse=reuse,
        malloc_mmap_threshold_kb=mmap_kb, malloc_hugetlb=hugetlb, hugetlb_mmap_threshold_kb=huge_kb,
        arena_shrinkage=shrink,
    )


def _parse_toml(text: str, src: str) -> dict[str, Any]:
    try:
        return _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        raise UserError(f"{src}: not valid TOML ({e})") from None


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read and validate one profile file. Raises UserError naming the file and field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"device profile file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read device profile ({e})") from None
    return parse_profile(_parse_toml(text, str(p)), str(p))


# ------------------------------------------------------------------------------ builtins

def profiles_dir():
    """Where the builtin profiles live: the installed package ``zoodip_edge.devices``, else the
    source checkout's ``devices/`` folder. Returns a Traversable (a Path in a checkout)."""
    try:
        from importlib.resources import files

        d = files("zoodip_edge.devices")
        if any(e.name.endswith(".toml") for e in d.iterdir()):
            return d
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "devices"


def _builtin_entries() -> dict[str, Any]:
    d = profiles_dir()
    try:
        entries = {e.name[: -len(".toml")]: e for e in d.iterdir() if e.name.endswith(".toml")}
    except (FileNotFoundError, NotADirectoryError):
        entries = {}
    if not entries:
        raise UserError(f"no builtin device profiles found (looked in {d}); is zoodip-edge installed correctly?")
    return dict(sorted(entries.items()))


def builtin_profile_names() -> list[str]:
    return list(_builtin_entries())


def builtin_profiles() -> dict[str, DeviceProfile]:
    """Every shipped profile by name, validated. A file whose ``name`` differs from its stem is refused."""
    out: dict[str, DeviceProfile] = {}
    for stem, entry in _builtin_entries().items():
        src = f"devices/{entry.name}"
        prof = parse_profile(_parse_toml(entry.read_text(encoding="utf-8"), src), src)
        if prof.name != stem:
            raise UserError(f"{src}: field 'name' is {prof.name!r} but the file is {entry.name}")
        out[stem] = prof
    return out


def _normalize(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    return ALIASES.get(n, n)


def resolve_profile(spec: str) -> DeviceProfile:
    """``spec`` is "auto", a builtin name or alias, or a path to a .toml profile."""
    s = str(spec).strip()
    if not s:
        raise UserError("empty device profile; use 'auto', a profile name or a .toml file")
    if s.lower() == "auto":
        return auto_profile()
    looks_like_path = s.lower().endswith(".toml") or os.sep in s or "/" in s or (os.altsep and os.altsep in s)
    if looks_like_path:
        return load_profile(s)
    builtins = builtin_profiles()
    key = _normalize(s)
    if key in builtins:
        return builtins[key]
    if Path(s).is_file():  # a profile file without the .toml suffix in the working folder
        return load_profile(s)
    choices = ["auto", *builtins, *(f"{a} (= {t})" for a, t in ALIASES.items())]
    raise UserError(f"unknown device profile {spec!r}; choose one of: {', '.join(choices)}, or a path to a .toml file")


# ---------------------------------------------------------------------------------- auto

def _gpu_memory_mb() -> int | None:
    """Total memory of the first NVIDIA GPU via nvidia-smi, or None when it can't be told."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return int(out.strip().splitlines()[0].strip())
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def auto_profile_name(
    available_providers: Iterable[str] | None = None,
    total_memory_mb: int | None = None,
    is_jetson: bool | None = None,
) -> tuple[str, str]:
    """The builtin profile `auto` picks and why (one phrase). Inputs are injectable for tests:

    - ``available_providers``: ORT's provider list (default: ``onnxruntime.get_available_providers()``);
    - ``total_memory_mb``: the GPU's memory in MiB (default: nvidia-smi when CUDA EP is offered;
      unknown counts as enough for ``cuda``);
    - ``is_jetson``: default: ``/etc/nv_tegra_release`` exists.
    """
    if available_providers is None:
        import onnxruntime

        available_providers = onnxruntime.get_available_providers()
    avail = set(available_providers)
    if is_jetson is None:
        is_jetson = TEGRA_RELEASE.exists()
    gpu_eps = avail & {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    if is_jetson and gpu_eps:
        return "jetson-orin-nano", f"Jetson ({TEGRA_RELEASE} present) with {', '.join(sorted(gpu_eps))}"
    if "CUDAExecutionProvider" in avail:
        mem = total_memory_mb if total_memory_mb is not None else _gpu_memory_mb()
        if mem is not None and mem < LOWVRAM_THRESHOLD_MB:
            return "cuda-lowvram", f"CUDA EP available, GPU memory {mem} MB < {LOWVRAM_THRESHOLD_MB} MB"
        known = f"GPU memory {mem} MB" if mem is not None else "GPU memory unknown"
        return "cuda", f"CUDA EP available, {known}"
    if is_jetson:
        return "cpu", "Jetson, but this onnxruntime build has no CUDA/TensorRT EP (install NVIDIA's onnxruntime-gpu wheel)"
    return "cpu", "no GPU execution provider in this onnxruntime build"


def auto_profile(
    available_providers: Iterable[str] | None = None,
    total_memory_mb: int | None = None,
    is_jetson: bool | None = None,
) -> DeviceProfile:
    """The builtin profile for this machine; see ``auto_profile_name`` for the rules."""
    name, _ = auto_profile_name(available_providers, total_memory_mb, is_jetson)
    return builtin_profiles()[name]
