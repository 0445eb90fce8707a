"""What this CPU can do, read at run time (machines of one kind differ: AVX2-only, AVX-512 with or
without native bf16, AMX). Nothing in tessera assumes a feature; it asks here."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import torch

# The flags that decide which kernels and dtypes are fast; recorded beside every benchmark figure.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "bf16", "i8mm", "sve")


def _parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86: flags; Arm: Features
            flags = frozenset(value.split())
    return model, flags


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        return _parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags known, only the processor's name
        return platform.processor() or platform.machine(), frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where the OS does not list them)."""
    return _cpuinfo()[1]


def cpu_model_name() -> str:
    return _cpuinfo()[0]


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 matmuls run in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm): there bf16 GEMM is several
    times fp32's. Elsewhere torch emulates bf16, and it is slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def describe() -> dict:
    """The machine as every benchmark result records it."""
    flags = cpu_flags()
    return {"cpu": cpu_model_name(), "machine": platform.machine(), "cores": _core_count(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(f for f in RELEVANT_FLAGS if f in flags), "native_bf16": has_native_bf16(flags)}


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
