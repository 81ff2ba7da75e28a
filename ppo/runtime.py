"""Process set-up that must happen before Paddle is imported: the CPU floor check and the math
library's kernel choice. Every entry point calls `prepare_process()` first.

Why before the import:

* Paddle's CPU wheel is compiled for AVX; some of its kernels (e.g. the fused RMSNorm) execute
  AVX-512 unconditionally. This project keeps fused kernels off the CPU path
  (`ppo.models.kernels`), so the supported floor is x86-64 with AVX2 and FMA (Paddle's MKL and
  oneDNN pick their kernels at run time). The features come from CPUID (through numpy), so the
  check also holds in containers and emulators whose /proc/cpuinfo shows the host's flags. On a
  CPU below that floor a user gets this module's error naming the missing instructions, not an
  "Illegal instruction" crash somewhere later.
* Paddle's bundled MKL reads `MKL_DEBUG_CPU_TYPE` when it loads. On AMD processors MKL otherwise
  takes a generic GEMM path (measured on an AMD EPYC, one thread: 20 GFLOP/s against 65 GFLOP/s
  with `MKL_DEBUG_CPU_TYPE=5`, which selects its AVX2 kernels). An explicit value always wins.

Nothing here imports Paddle.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

logger = logging.getLogger("paddle-rlhf")

# Instructions the CPU path needs, by their names in numpy's CPU-feature table (numpy asks CPUID
# itself, so this works on any OS and reports what the process may really execute).
REQUIRED_CPU_FEATURES = ("AVX", "AVX2", "FMA3")
# Setting this to 1 skips the floor check (to try a CPU below the floor at one's own risk).
SKIP_CHECK_VARIABLE = "PADDLE_RLHF_SKIP_CPU_CHECK"
MKL_CPU_TYPE_VARIABLE = "MKL_DEBUG_CPU_TYPE"
MKL_AVX2_CPU_TYPE = "5"


class UnsupportedCPUError(RuntimeError):
    """The processor lacks instructions Paddle's CPU kernels execute."""


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    vendor: str  # /proc/cpuinfo vendor_id: GenuineIntel, AuthenticAMD, "" when unknown
    model_name: str
    features: FrozenSet[str] = field(default_factory=frozenset)  # numpy names: AVX2, FMA3, AVX512F, ...

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "i386")

    @property
    def is_amd(self) -> bool:
        return self.vendor == "AuthenticAMD"

    @property
    def has_avx512(self) -> bool:
        return "AVX512F" in self.features

    def describe(self) -> str:
        level = "AVX-512" if self.has_avx512 else "AVX2" if "AVX2" in self.features else "below AVX2"
        return f"{self.model_name or self.machine} ({self.vendor or 'unknown vendor'}, {level})"


def parse_cpuinfo(text: str) -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo text (`vendor_id`, `model name`, ...)."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features() -> FrozenSet[str]:
    """Instruction-set extensions this process can execute, from numpy's CPUID probe."""
    try:
        from numpy.core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 2 moved the module
        from numpy._core._multiarray_umath import __cpu_features__
    return frozenset(name for name, present in __cpu_features__.items() if present)


def read_cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            fields = parse_cpuinfo(handle.read())
    except OSError:  # not Linux: vendor and model unknown, features still probed
        fields = {}
    return CpuInfo(
        machine=platform.machine(),
        vendor=fields.get("vendor_id", ""),
        model_name=fields.get("model name", ""),
        features=cpu_features(),
    )


def check_cpu(info: CpuInfo) -> None:
    """Raise UnsupportedCPUError when an x86 CPU lacks the required instructions (other
    architectures are not judged here)."""
    if not info.is_x86:
        return
    missing = [name for name in REQUIRED_CPU_FEATURES if name not in info.features]
    if missing:
        raise UnsupportedCPUError(
            f"this CPU ({info.model_name or 'unknown model'}) lacks {', '.join(missing)}: paddle-rlhf on CPU needs "
            f"x86-64 with {', '.join(REQUIRED_CPU_FEATURES)} (Paddle's CPU kernels would stop with 'Illegal "
            f"instruction'). Use a newer CPU or a GPU machine; set {SKIP_CHECK_VARIABLE}=1 to try anyway."
        )


def mkl_environment(info: CpuInfo, environ: Dict[str, str]) -> Dict[str, str]:
    """Variables to add to `environ` for fast GEMMs on this CPU: MKL's AVX2 kernels on AMD unless
    the user chose a value."""
    if info.is_amd and MKL_CPU_TYPE_VARIABLE not in environ:
        return {MKL_CPU_TYPE_VARIABLE: MKL_AVX2_CPU_TYPE}
    return {}


_prepared: Optional[dict] = None


def prepare_process(environ=None) -> dict:
    """Check the CPU and set the math-library variables, once per process, before Paddle loads.

    Returns what was decided (`cpu`, `set` variables). Raises SystemExit with the floor message on
    an unsupported CPU. Called after Paddle was imported it still checks the CPU, but cannot
    change MKL's kernel choice any more (and says so once)."""
    global _prepared
    if _prepared is not None:
        return _prepared
    environ = os.environ if environ is None else environ
    info = read_cpu_info()
    if environ.get(SKIP_CHECK_VARIABLE, "").strip() not in ("1", "true", "yes"):
        try:
            check_cpu(info)
        except UnsupportedCPUError as error:
            raise SystemExit(f"paddle-rlhf: {error}") from None
    added = mkl_environment(info, environ)
    if added and "paddle" in sys.modules:
        logger.warning(
            f"{MKL_CPU_TYPE_VARIABLE}=5 would select MKL's AVX2 GEMM kernels on this AMD CPU, but Paddle is already "
            "imported; export it before starting Python for ~3x faster matmuls"
        )
        added = {}
    environ.update(added)
    if added:
        # stderr, before any logging set-up: one line, so a user knows why matmuls are fast.
        print(
            f"paddle-rlhf: AMD CPU detected, set {MKL_CPU_TYPE_VARIABLE}=5 (MKL's AVX2 GEMM kernels; "
            "export another value to override)",
            file=sys.stderr,
            flush=True,
        )
    _prepared = {"cpu": info.describe(), "set": added}
    return _prepared
