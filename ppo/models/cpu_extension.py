"""The C++ CPU extension (`csrc/*.cc`): compiled on first use, cached, optional.

Paddle's CPU build has no fused decoder kernels, and in eager mode each small op costs ~20 us of
dispatch: a decode step of the toy model is ~120 such ops. The extension does the step in one
call (`csrc/cpu_decode.cc`, used by `cpu_decode.py`), and RMSNorm, the rotary embedding and
SwiGLU each in one forward and one backward op (`csrc/cpu_train_ops.cc`, used by
`cpu_fused.py`). It is compiled with `paddle.utils.cpp_extension` against the installed Paddle
and its bundled MKL the first time a process asks for it (~15 s), into
`$PADDLE_RLHF_CACHE/extensions/<hash>` (hash of the sources, Paddle, Python and machine), under a
lock and renamed into place when complete, so concurrent ranks build it once. Later processes
load the cached library in well under a second.

Everything works without it: when it is disabled (`PADDLE_RLHF_CPU_EXTENSION=0`), there is no C++
compiler, or the build fails, one warning says why and callers keep their eager path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from types import ModuleType
from typing import Optional

from ppo.shared_cache import cache_base, directory_lock, publish_directory, staging_directory

SWITCH_ENV = "PADDLE_RLHF_CPU_EXTENSION"  # "0" disables the extension
MODULE_NAME = "paddle_rlhf_cpu_ops"
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("cpu_decode.cc", "cpu_train_ops.cc")

_unavailable_reason: Optional[str] = None


def disabled_by_environment() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def build_key() -> str:
    import paddle

    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(SOURCE_DIR) if n.endswith((".cc", ".h"))):  # headers too
        with open(os.path.join(SOURCE_DIR, name), "rb") as handle:
            digest.update(name.encode() + b"\0" + handle.read())
    digest.update(f"\0{paddle.__version__}\0{paddle.version.commit}\0{sys.version}\0{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def extension_dir() -> str:
    return os.path.join(cache_base(), "extensions", f"{MODULE_NAME}-{build_key()}")


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _build(final_dir: str) -> ModuleType:
    """Compile into a staging directory, import from there, then publish it as `final_dir`
    (renaming does not disturb the library already mapped into this process)."""
    import paddle
    from paddle.utils import cpp_extension

    staging = staging_directory(final_dir)
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No ccache found" and similar build chatter
            module = cpp_extension.load(
                name=MODULE_NAME,
                sources=[os.path.join(SOURCE_DIR, name) for name in SOURCES],
                # -fopenmp-simd vectorises the loops' reductions without an OpenMP runtime; no
                # -march, so the library runs on any x86-64 CPU sharing the cache directory.
                extra_cxx_cflags=["-O3", "-fopenmp-simd"],
                # cblas_sgemm and vmsExp from the MKL that Paddle ships and already loads.
                extra_ldflags=[f"-L{libs}", "-l:libmklml_intel.so", f"-Wl,-rpath,{libs}"],
                build_directory=staging,
                verbose=False,
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final_dir)
    return module


def _import(final_dir: str) -> ModuleType:
    from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

    return _import_module_from_library(MODULE_NAME, os.path.join(final_dir, MODULE_NAME), verbose=False)


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    """The extension's op module, or None (the reason is logged once, and kept in
    `unavailable_reason()`)."""
    global _unavailable_reason
    from paddlenlp.utils.log import logger

    _unavailable_reason = None
    if disabled_by_environment():
        _unavailable_reason = f"disabled by {SWITCH_ENV}={os.environ[SWITCH_ENV]}"
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        _unavailable_reason = f"built for Linux x86-64 only, not {sys.platform} {platform.machine()}"
    elif _compiler() is None:
        _unavailable_reason = "no C++ compiler found (install g++, or set CXX)"
    if _unavailable_reason is not None:
        logger.warning(f"CPU extension unavailable: {_unavailable_reason}; using eager Paddle ops")
        return None
    final_dir = extension_dir()
    started = time.time()
    try:
        if not os.path.isdir(final_dir):
            os.makedirs(os.path.dirname(final_dir), exist_ok=True)
            with directory_lock(final_dir):
                if not os.path.isdir(final_dir):  # not built by another process while we waited
                    module = _build(final_dir)
                    logger.info(f"CPU extension: compiled into {final_dir} in {time.time() - started:.1f}s (reused from now on)")
                    return module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _import(final_dir)
    except Exception as error:  # a failed build must never stop training: the eager path stays
        _unavailable_reason = f"build or load failed ({type(error).__name__}: {str(error).strip()[-500:]})"
        logger.warning(f"CPU extension unavailable: {_unavailable_reason}; using eager Paddle ops")
        return None


def unavailable_reason() -> Optional[str]:
    return _unavailable_reason
