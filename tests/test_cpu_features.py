"""CPU features are read at run time, and dtype="auto" follows them."""

from __future__ import annotations

import pytest
import torch

from tessera import cpu_features
from tessera.config import EngineConfig
from tessera.errors import InvalidRequestError

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx avx2 fma f16c\n"
XEON_AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\n"
            "flags\t\t: avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16\n")
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\nCPU part\t: 0xd40\n"


def test_parse_cpuinfo_x86_and_arm():
    name, flags = cpu_features._parse_cpuinfo(EPYC_AVX2)
    assert name == "AMD EPYC 7B12" and "avx2" in flags and not cpu_features.has_native_bf16(flags)
    _, flags = cpu_features._parse_cpuinfo(XEON_AMX)
    assert cpu_features.has_native_bf16(flags)
    _, flags = cpu_features._parse_cpuinfo(GRAVITON)
    assert "asimd" in flags and cpu_features.has_native_bf16(flags)


def test_describe_names_the_relevant_flags():
    info = cpu_features.describe()
    assert set(info["flags"]) <= set(cpu_features.RELEVANT_FLAGS)
    assert info["native_bf16"] == cpu_features.has_native_bf16()
    assert info["cores"] >= 1


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.delenv("TESSERA_AUTO_CPU_DTYPE", raising=False)
    monkeypatch.setattr(cpu_features, "has_native_bf16", lambda flags=None: native)
    assert EngineConfig().resolve_dtype(torch.device("cpu")) == expected
    assert EngineConfig(dtype="float32").resolve_dtype(torch.device("cpu")) == torch.float32


def test_auto_dtype_can_be_pinned(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_native_bf16", lambda flags=None: True)
    monkeypatch.setenv("TESSERA_AUTO_CPU_DTYPE", "float32")
    assert EngineConfig().resolve_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("TESSERA_AUTO_CPU_DTYPE", "int3")
    with pytest.raises(InvalidRequestError, match="TESSERA_AUTO_CPU_DTYPE"):
        EngineConfig().resolve_dtype(torch.device("cpu"))
