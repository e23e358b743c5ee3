"""bf16 on a CPU: whether this one multiplies bf16 natively, and what precision the trainer and the local backend
then use.

On a CPU with native bf16 matmuls (avx512_bf16 or AMX: AMD Zen 4, Intel Sapphire Rapids and later) bf16 is the fast
path: on this project's 2-core AMD EPYC, a 1024² matmul ran 3.0x fp32's FLOP/s, SmolLM2's masked-SFT steps 1.5x and
its batched ReAct generation 1.4x (benchmarks/smollm2_speed.py --only bf16). Without them torch emulates bf16, and
it ran ~90x slower than fp32 on another machine kind (../shared/FACTS.md), hence the warning below.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_has_native_bf16() -> bool | None:
    """From /proc/cpuinfo's flags; None where they cannot be read (not Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def warn_if_bf16_is_emulated(what: str) -> None:
    if cpu_has_native_bf16() is False:
        warnings.warn(f"{what}: bf16 on a CPU without native bf16 matmuls ({' or '.join(NATIVE_BF16_FLAGS)}) is "
                      "emulated and can be far slower than fp32; set bf16 off (fp32)", stacklevel=3)
