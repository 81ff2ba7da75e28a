"""The `dataset_modules` key: user code that registers datasets, imported before any dataset is built.

Each entry is a module name (`my_project.datasets`, imported from `sys.path`: installed packages,
`PYTHONPATH`, the repository root) or a path to a `.py` file. A relative path is taken from the
current directory, which for a config inside this repository is the repository root
(`ppo/cli.py`), so it reads like every other path of the config. Importing a module runs its
`RawDataset` subclasses' class statements, which registers their `NAME`s for every spec key.

The argument dataclasses import in `__post_init__`, so every rank under
`paddle.distributed.launch` (each parses the config) registers the same datasets, and a broken
entry fails before any model loads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional, Sequence, Union

KEY = "dataset_modules"


class DatasetModuleError(ImportError):
    """A `dataset_modules` entry that cannot be imported."""


def parse_dataset_modules(value: Union[None, str, Sequence[str]]) -> list[str]:
    """Entries of the key: a list, or a comma-separated string (items of a list may hold commas too)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    entries = []
    for item in items:
        if not isinstance(item, str):
            raise DatasetModuleError(f"{KEY} entries must be module names or .py paths, got {item!r}")
        entries += [part.strip() for part in item.split(",") if part.strip()]
    return entries


def import_dataset_modules(value: Union[None, str, Sequence[str]]) -> list[ModuleType]:
    """Import every entry of `dataset_modules` (each once per process); errors name the entry,
    the key and the import error."""
    return [_import_entry(entry) for entry in parse_dataset_modules(value)]


def _import_entry(entry: str) -> ModuleType:
    if entry.endswith(".py") or os.sep in entry or (os.altsep and os.altsep in entry):
        return _import_file(entry)
    try:
        return importlib.import_module(entry)
    except Exception as error:  # the user's module may raise anything while it runs
        raise DatasetModuleError(_failure(entry, error, hint=_module_hint(entry, error))) from error


def _import_file(entry: str) -> ModuleType:
    path = os.path.abspath(os.path.expanduser(entry))
    if not os.path.isfile(path):
        raise DatasetModuleError(
            f"{KEY} entry {entry!r}: no such file {path!r} (relative paths are taken from {os.getcwd()!r})"
        )
    # A name of its own per file: never shadows a real module, and re-listing the file (or
    # building the arguments twice) finds it in sys.modules instead of re-running it.
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name = f"_dataset_module_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise DatasetModuleError(_failure(entry, error, hint=_where_in_file(error, path))) from error
    return module


def _failure(entry: str, error: Exception, hint: Optional[str] = None) -> str:
    message = f"{KEY} entry {entry!r} failed to import: {type(error).__name__}: {error}"
    return message + (f" ({hint})" if hint else "")


def _where_in_file(error: Exception, path: str) -> Optional[str]:
    """'raised at /x/my_datasets.py line 12', the last line of the user's file the error passed."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    frame = error.__traceback__
    while frame is not None:
        if os.path.abspath(frame.tb_frame.f_code.co_filename) == path:
            line = frame.tb_lineno
        frame = frame.tb_next
    return f"raised at {path} line {line}" if line is not None else None


def _module_hint(entry: str, error: Exception) -> Optional[str]:
    if isinstance(error, ModuleNotFoundError) and error.name == entry.split(".")[0]:
        return (
            "Module names are imported from sys.path (installed packages, PYTHONPATH, the repository root); "
            "give a path such as 'my_datasets.py' to import a file"
        )
    return None
