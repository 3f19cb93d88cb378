"""The machine an engine runs on: CPU model and flags (one ``/proc/cpuinfo`` reader), memory, OpenVINO's
CPU capabilities and library versions. Engines ask it which INT8/BF16 kernels the CPU has; reports
print :func:`machine_description`."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

#: CPU flags that decide which INT8/BF16 kernels a CPU engine can use.
CPU_FLAGS_OF_INTEREST = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
LIBRARIES = ("numpy", "torch", "monai", "openvino", "nncf", "onnxruntime", "onnx", "SimpleITK", "tensorrt")


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU model name and its feature flags, read once from ``/proc/cpuinfo`` (empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    names = {"SimpleITK": "SimpleITK", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
    versions: dict[str, str] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(names.get(lib, lib))
        except metadata.PackageNotFoundError:
            continue
    return versions


def openvino_cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (``BF16`` absent → BF16 runs as FP32)."""
    try:
        import openvino as ov

        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # OpenVINO missing or no CPU plugin: nothing to report
        return []


def unsupported_reason(backend: str, precision: str) -> str | None:
    """Why ``precision`` cannot run natively on this CPU with ``backend`` (``None`` when it can).

    OpenVINO silently runs a BF16/FP16 request in FP32 on a CPU without those kernels, which would
    only repeat the FP32 row under another name.
    """
    if backend != "openvino" or precision not in ("bf16", "fp16"):
        return None
    caps = openvino_cpu_capabilities()
    if caps and precision.upper() not in caps:
        return (
            f"this CPU has no native {precision.upper()} (OpenVINO CPU capabilities: {', '.join(caps)}); "
            "OpenVINO would run it as FP32"
        )
    return None


def machine_description() -> dict[str, Any]:
    """CPU model, core count, memory, the INT8/BF16-relevant CPU flags and library versions."""
    model, flags = cpu_model_and_flags()
    try:
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        memory_gib: float | None = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        memory_gib = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": usable,
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST},
        "openvino_cpu_capabilities": openvino_cpu_capabilities(),
        "libraries": _library_versions(),
    }


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI/AMX INT8 dot products (without them, u8*s8 products can saturate)."""
    return bool(cpu_model_and_flags()[1] & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_speed_note(device: str) -> str | None:
    """What to expect of INT8 on this CPU where it lacks VNNI/AMX INT8 dot products (``None`` where it
    has them, or the engine's ``device`` is not the CPU)."""
    if device != "cpu" or cpu_has_vnni():
        return None
    return (
        "this CPU has no VNNI/AMX INT8 instructions, so INT8 runs on AVX2 integer kernels: measured on "
        "such a CPU, INT8 was 1.2x to 2.2x faster than FP32 per window depending on the network "
        "(2.9x on a CPU with AMX); the build report gives the speed-up measured here"
    )


def cpu_has_bf16() -> bool:
    """Whether the CPU computes BF16 natively (AMX or AVX512-BF16)."""
    return bool(cpu_model_and_flags()[1] & {"amx_bf16", "avx512_bf16"})


def transparent_hugepage_defrag() -> str | None:
    """The kernel's active transparent-huge-page defrag setting (``madvise``, ``always``, ...), if any."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text()
    except OSError:
        return None
    active = [word[1:-1] for word in setting.split() if word.startswith("[") and word.endswith("]")]
    return active[0] if active else None


def avoid_hugepage_compaction_stalls() -> bool:
    """Stop NumPy advising transparent huge pages for its large arrays where the kernel then compacts
    memory synchronously on the first touch (defrag ``madvise`` or ``always``, the Linux default).

    A segmentation writes each large array (logits, labels) once: measured on a 2-core Intel Xeon
    with defrag ``madvise``, copying 1.2 GB of 18-class logits took 19.4 s with NumPy's advice and
    0.8 s without. Returns whether the advice was turned off.
    """
    if transparent_hugepage_defrag() not in ("madvise", "always"):
        return False
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    core.multiarray._set_madvise_hugepage(False)
    return True
