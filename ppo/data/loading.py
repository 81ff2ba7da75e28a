"""Read a table of rows for a built-in dataset: from the hub, or from local json/jsonl/parquet files.

Local paths may be a data file or a directory (json and jsonl files may be gzip-compressed,
`train.jsonl.gz`). In a directory, files named after the split
(`train.jsonl`, `test.parquet`, `data/train-00000-of-00001.parquet`, `train/part-0.json`) are
used for that split; a directory holding exactly one data file (not named after another split)
uses it for any split.

Machines without hub access can also mirror the hub layout: when `path` is None and the
environment variable `PADDLE_RLHF_DATA_DIR` is set, `$PADDLE_RLHF_DATA_DIR/<hub name>`
(e.g. `.../tatsu-lab/alpaca`) is read instead of the hub, if it exists.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

DATA_DIR_ENV = "PADDLE_RLHF_DATA_DIR"
DATA_FILE_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# HF datasets' json builder decompresses these itself (its download manager extracts them).
COMPRESSED_EXTENSIONS = (".gz",)
# A lone file named after another split is never used for the requested one.
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")


def load_table(
    dataset_name: str,
    hub_name: str,
    split: str,
    path: Optional[str] = None,
    required_columns: Sequence[str] = (),
):
    """Rows of `split` as a `datasets.Dataset`, from `path` if given, else the local mirror or the hub.

    Raises a clear error when the source is unreachable, has no file for the split, or lacks one of
    `required_columns`.
    """
    if path is None:
        mirror = os.environ.get(DATA_DIR_ENV)
        if mirror and os.path.exists(os.path.join(mirror, hub_name)):
            path = os.path.join(mirror, hub_name)
    if path is None:
        table = _load_from_hub(dataset_name, hub_name, split)
        source = f"hub dataset {hub_name!r}"
    else:
        table = load_local_table(dataset_name, path, split)
        source = repr(str(path))
    missing = [column for column in required_columns if column not in table.column_names]
    if missing:
        raise ValueError(
            f"dataset {dataset_name!r} from {source} lacks column(s) {missing}; "
            f"expected {list(required_columns)}, found {table.column_names}"
        )
    return table


def _load_from_hub(dataset_name: str, hub_name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(hub_name, split=split)
    except OSError as error:  # connection errors and missing hub datasets are OSErrors
        raise OSError(
            f"could not load dataset {dataset_name!r} from the hub ({hub_name!r}, split {split!r}): {error}. "
            f"Offline, pass a local copy: the spec '{dataset_name}:1.0:/path/to/data' or "
            f"{{'{dataset_name}': (1.0, '/path/to/data')}}, or set {DATA_DIR_ENV} to a folder holding "
            f"{hub_name}/ (json, jsonl or parquet files)."
        ) from error


def load_local_table(dataset_name: str, path: str, split: str):
    """Rows of a local data file, or of the `split` file(s) in a directory."""
    import datasets

    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {dataset_name!r}: path {path!r} does not exist")
    files = [path] if os.path.isfile(path) else _split_files(dataset_name, path, split)
    builders = {_builder_for(dataset_name, file) for file in files}
    if len(builders) > 1:
        raise ValueError(f"dataset {dataset_name!r}: split {split!r} mixes json and parquet files: {files}")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as error:  # parse errors from pyarrow/json come in many types
        raise ValueError(f"dataset {dataset_name!r}: cannot read {files}: {_root_cause(error)}") from error


def _root_cause(error: BaseException) -> str:
    """HF datasets wraps the reader's error ("JSON parse error: Column(/prompt) changed from string
    to array in row 1") in a generic one; show what the reader said as well."""
    causes = [error]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
        if len(causes) > 10:
            break
    if len(causes) == 1:
        return str(error)
    return " <- ".join(dict.fromkeys(f"{type(cause).__name__}: {cause}" for cause in causes))


def _split_extension(name: str) -> tuple[str, str]:
    """(stem, data extension) of a file name: 'train.jsonl.gz' -> ('train', '.jsonl'); the extension
    is '' for files that are not data files (including a compressed parquet file)."""
    stem, extension = os.path.splitext(name)
    if extension.lower() in COMPRESSED_EXTENSIONS:
        stem, extension = os.path.splitext(stem)
        if DATA_FILE_EXTENSIONS.get(extension.lower()) != "json":
            return stem, ""
    extension = extension.lower()
    return stem, extension if extension in DATA_FILE_EXTENSIONS else ""


def _builder_for(dataset_name: str, file: str) -> str:
    extension = _split_extension(os.path.basename(file))[1]
    if not extension:
        raise ValueError(
            f"dataset {dataset_name!r}: unsupported file {file!r}; use one of {sorted(DATA_FILE_EXTENSIONS)} "
            "(json and jsonl files may be gzip-compressed: .jsonl.gz)"
        )
    return DATA_FILE_EXTENSIONS[extension]


def _split_files(dataset_name: str, directory: str, split: str) -> list[str]:
    data_files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        data_files += [
            os.path.join(root, name)
            for name in sorted(names)
            if not name.startswith(".") and _split_extension(name)[1]
        ]
    if not data_files:
        raise FileNotFoundError(
            f"dataset {dataset_name!r}: no {'/'.join(sorted(DATA_FILE_EXTENSIONS))} files in {directory!r}"
        )
    matching = [file for file in data_files if _names_split(os.path.relpath(file, directory), split)]
    if matching:
        return matching
    other_splits = [name for name in KNOWN_SPLITS if name != split]
    if len(data_files) == 1 and not any(
        _names_split(os.path.relpath(data_files[0], directory), name) for name in other_splits
    ):
        return data_files
    found = [os.path.relpath(file, directory) for file in data_files]
    raise FileNotFoundError(
        f"dataset {dataset_name!r}: no file for split {split!r} in {directory!r} "
        f"(expected e.g. {split}.jsonl or {split}-00000-of-00001.parquet); found {found}"
    )


def _names_split(relative_path: str, split: str) -> bool:
    """Whether a file belongs to `split`: its name starts with the split (`train.json`,
    `train-0000.parquet`, `train_part.jsonl`) or a folder on its path is named after it."""
    *folders, name = relative_path.split(os.sep)
    stem = _split_extension(name)[0]
    if split in folders or stem == split:
        return True
    return any(stem.startswith(split + separator) for separator in "-_.")
