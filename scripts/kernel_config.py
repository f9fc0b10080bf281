"""Print environment settings that make this machine's float kernels compute like another CPU's.

Usage: python scripts/kernel_config.py          -> e.g. "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ..."

The portability pass of CI (`make test-portable`) runs the notebooks and tests once more under these
settings: float32 results of library kernels (oneDNN convolutions, MKL matmuls, ATen's vectorized
loops) differ in their last bits between instruction sets, so a notebook whose checked outputs or
exact asserts depend on them fails here as it would on a learner's machine. The choice steps down
from what this CPU has: AVX-512 -> AVX2; AVX2 only -> SSE4.1 (ATen's default, scalar-width code).
On a CPU without AVX2 (or not x86) it prints nothing: there is no lower configuration to step to,
and the pass then repeats the native one (said on stderr).
"""

from __future__ import annotations

import pathlib
import platform
import sys


def cpu_flags() -> set[str]:
    path = pathlib.Path("/proc/cpuinfo")
    return set(path.read_text().split()) if path.exists() else set()


def other_config(flags: set[str], machine: str) -> dict[str, str]:
    """Environment variables for a kernel configuration below this CPU's native one."""
    if machine not in ("x86_64", "AMD64", "i686"):
        return {}
    if "avx512f" in flags:
        return {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    if "avx2" in flags:
        return {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    return {}


def main() -> int:
    config = other_config(cpu_flags(), platform.machine())
    if not config:
        print(f"kernel_config: no lower kernel configuration for this CPU ({platform.machine()}); "
              "the portability pass repeats the native one", file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
