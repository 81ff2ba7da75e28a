"""Command-line configuration shared by every entry point (`run_sft.py`, `run_reward.py`,
`run_ppo.py`).

    python rm/run_reward.py config/llama/rm_argument.json [--flag value ...]
    python rm/run_reward.py --model_name_or_path ... --output_dir ... [--flag value ...]

A JSON file gives the arguments as an object whose keys are dataclass field names; flags after it
override single keys. Parsing goes through PaddleNLP's `PdArgumentParser`, so the types, defaults
and `--help` are those of the dataclasses.

Relative paths: when the JSON file lies inside this repository (e.g. `config/tiny/...`), relative
paths in the run (in the file and in flags) are relative to the repository root, whatever
directory the command is started from — the process switches to the root and logs it. Otherwise
they are relative to the current directory, as usual.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from paddlenlp.trainer import PdArgumentParser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """A configuration file or flag that cannot be turned into arguments."""


class _RaisingArgumentParser(PdArgumentParser):
    """argparse reports problems through `error()`, which exits; raise instead so that callers
    (and tests) see a `ConfigError` carrying the message."""

    def error(self, message):
        raise ConfigError(message)


def load_json_config(path: str) -> Dict[str, Any]:
    """Read a JSON object from `path`; errors name the file and, for bad JSON, the position."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"config file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of arguments, got {type(data).__name__}")
    return data


def known_fields(dataclass_types: Sequence[type]) -> List[str]:
    return [field.name for dtype in dataclass_types for field in dataclasses.fields(dtype) if field.init]


def check_unknown_keys(keys, dataclass_types: Sequence[type], source: str) -> None:
    """Raise ConfigError listing every key that no dataclass declares (with close matches)."""
    known = known_fields(dataclass_types)
    unknown = [key for key in keys if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    names = ", ".join(dtype.__name__ for dtype in dataclass_types)
    raise ConfigError(f"unknown keys in {source}: {', '.join(hints)}; they are not fields of {names}")


def _json_to_flags(config: Dict[str, Any]) -> Tuple[List[str], Dict[str, Any]]:
    """JSON values -> argparse flags, plus the values argparse cannot carry faithfully
    (null, empty lists, objects) to be put back after parsing."""
    flags: List[str] = []
    direct: Dict[str, Any] = {}
    for key, value in config.items():
        if value is None or (isinstance(value, list) and not value):
            direct[key] = value
        elif isinstance(value, dict):
            # The flag keeps required-argument checks happy; the object itself is restored later
            # (e.g. `"train_datasets": {"alpaca": 0.75}` reaches the dataset loader as a dict).
            flags += [f"--{key}", json.dumps(value)]
            direct[key] = value
        elif isinstance(value, list):
            items = (json.dumps(item) if isinstance(item, (dict, list)) else str(item) for item in value)
            flags += [f"--{key}", *items]
        else:
            flags += [f"--{key}", str(value)]
    return flags, direct


def _flag_names(argv: Sequence[str]) -> set:
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            names.add(name)
            if name.startswith("no_"):
                names.add(name[3:])
    return names


def enter_repo_root_for(config_path: str) -> str:
    """Switch to the repository root when `config_path` lies inside it (see module doc).
    Returns the absolute config path."""
    config_path = os.path.abspath(config_path)
    if os.path.commonpath([os.path.realpath(config_path), os.path.realpath(REPO_ROOT)]) == os.path.realpath(
        REPO_ROOT
    ):
        if os.path.realpath(os.getcwd()) != os.path.realpath(REPO_ROOT):
            from paddlenlp.utils.log import logger

            logger.info(f"{config_path} is a repository config: relative paths are taken from {REPO_ROOT}")
            os.chdir(REPO_ROOT)
    return config_path


def parse_config(argv: Sequence[str], *dataclass_types: type) -> Tuple[Any, ...]:
    """Parse `argv` (a JSON file path then flags, or flags only) into one instance per dataclass.

    Errors: a missing or malformed JSON file (with the JSON error position), a key or flag that no
    dataclass declares (listing them), a value of the wrong type.
    """
    if not dataclass_types:
        raise TypeError("parse_config needs at least one dataclass type")
    argv = list(argv)
    flags: List[str] = []
    direct: Dict[str, Any] = {}
    if argv and argv[0].endswith(".json"):
        config_path = enter_repo_root_for(argv[0])
        config = load_json_config(config_path)
        check_unknown_keys(config, dataclass_types, f"config file {config_path}")
        flags, direct = _json_to_flags(config)
        argv = argv[1:]

    parser = _RaisingArgumentParser(dataclass_types, allow_abbrev=False)
    required = {
        field.name
        for dtype in dataclass_types
        for field in dataclasses.fields(dtype)
        if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    null_required = sorted(key for key, value in direct.items() if value is None and key in required)
    if null_required:
        raise ConfigError(f"required arguments {null_required} are null in {config_path}; give them a value")
    namespace, remaining = parser.parse_known_args(flags + argv)
    if remaining:
        unknown = [token[2:].split("=", 1)[0] for token in remaining if token.startswith("--")]
        if unknown:
            check_unknown_keys(unknown, dataclass_types, "command-line flags")
        raise ConfigError(f"unexpected command-line arguments {remaining}")

    overridden = _flag_names(argv)
    for key, value in direct.items():
        if key not in overridden:
            setattr(namespace, key, value)

    instances = []
    for dtype in dataclass_types:
        values = {field.name: getattr(namespace, field.name) for field in dataclasses.fields(dtype) if field.init}
        instances.append(dtype(**values))
    return tuple(instances)
