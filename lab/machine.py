"""The machine a run is on: CPU model and the instruction-set flags that decide its dtype."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")

# bf16 matrix units: with one, a bf16 matmul runs at least as fast as fp32 and reads half the
# bytes (measured on an Intel Xeon with AMX: a 5-token verify costs 1.03x a decode step in bf16,
# 1.81x in fp32). Without, bf16 is emulated and slower than fp32.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# The widest matrix/vector unit, named in a CPU's label: clouds name different CPUs alike (two
# 2-core "AMD EPYC" machines here: one AVX2 only, one with AVX512-BF16) and they run lab's
# engine at different speeds and dtypes.
ISA_LABELS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
              ("avx2", "AVX2"))  # fmt: skip


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), else None."""
    if not _CPUINFO.exists():
        return None
    for line in _CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


@cache
def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


@cache
def cpu_vendor() -> str | None:
    """The CPU's vendor_id (GenuineIntel, AuthenticAMD, ...; Linux), else None."""
    return _cpuinfo_field("vendor_id")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def fast_bf16_flag(flags: frozenset[str] | None = None) -> str | None:
    """The flag that makes bf16 fast on this CPU (amx_bf16, avx512_bf16), or None."""
    have = cpu_flags() if flags is None else flags
    return next((f for f in FAST_BF16_FLAGS if f in have), None)


def cpu_label(name: str | None = None, flags: frozenset[str] | None = None) -> str:
    """'AMD EPYC (AVX2)': the CPU's model name and its widest unit of ISA_LABELS (this CPU's by
    default; a recorded name and flags give an old result's label)."""
    have = cpu_flags() if flags is None else flags
    isa = next((label for flag, label in ISA_LABELS if flag in have), None)
    name = cpu_name() if name is None else name
    return f"{name} ({isa})" if isa else name


def describe() -> dict[str, str | int | None]:
    """What a result should record of the CPU it ran on."""
    return {"cpu": cpu_name(), "vendor": cpu_vendor(), "cores": os.cpu_count(),
            "fast_bf16": fast_bf16_flag()}  # fmt: skip
