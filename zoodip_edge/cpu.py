"""What this CPU offers that decides which CPU recipe is faster.

``int8-cpu-fast`` makes the U-Net's MatMuls compute in int8. That pays only where the CPU has
int8 dot-product instructions: on an AVX2-only AMD EPYC (Zen 3) its step took 1.15x as long as
``int8-cpu``'s, on an AVX-512 VNNI one 0.77-0.91x (docs/recipes.md).
"""

from __future__ import annotations

from pathlib import Path

# x86: AVX512-VNNI, AVX-VNNI, AMX; Arm: the dot-product and int8 matrix-multiply extensions
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
CPUINFO = Path("/proc/cpuinfo")


def int8_dot_product(cpuinfo: Path | None = None) -> bool | None:
    """Whether the CPU has int8 dot-product instructions; None where that cannot be read (not Linux)."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 says flags, Arm says Features
            flags.update(value.split())
    return bool(flags & INT8_DOT_FLAGS) if flags else None


def slow_int8_math() -> str | None:
    """Why int8 MatMuls do not pay on this CPU, or None where they may (or the CPU is unknown)."""
    if int8_dot_product() is not False:
        return None
    return ("this CPU has no int8 dot-product instructions (AVX-VNNI, AVX512-VNNI, Arm dot product), so int8 "
            "MatMuls run no faster than float here: an int8-cpu bundle was faster on such a CPU (docs/recipes.md)")


def cpu_description(cpuinfo: Path | None = None) -> str:
    """CPU model, cores and vector ISA (e.g. "AMD EPYC, 2 cores, AVX-512 VNNI"): what a figure was measured on."""
    import os
    import platform

    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        for line in (cpuinfo or CPUINFO).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("cpu family", "model") and key.strip() not in ids:
                ids[key.strip()] = value.strip()
            elif key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    if len(ids) == 2:  # virtual machines often name only the vendor: family and model say which CPU
        model += f" (family {ids['cpu family']}, model {ids['model']})"
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "")
    isa += " VNNI" if flags & {"avx512_vnni", "avx_vnni"} else " dot product" if "asimddp" in flags else ""
    return ", ".join(p for p in (model, f"{os.cpu_count()} cores", isa.strip()) if p)
