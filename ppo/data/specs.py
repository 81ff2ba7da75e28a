"""Dataset specs: which registered datasets to mix, how much of each, and where to read them.

Accepted forms (all equivalent ways to say the same thing):

- a dict `{'alpaca': 0.75, 'my-dataset': 0.5}`; a value may also be `(amount, path)`, an amount
  string (`'0.5'`, `'#100'`) or None (the whole dataset);
- a string `name[:amount[:path]]`, several separated by commas:
  `'alpaca:0.75:/data/alpaca,my-dataset:0.5'` (an empty amount, `'alpaca::/data/alpaca'`, means 1);
- a list of such strings (or of `DatasetSpec`s).

A name may carry a field mapping for the generic formats (`ppo.data.generic`), written like a URL
query: `'preference?prompt=question&chosen=good:0.5:/data/pairs.jsonl.gz'` reads the logical field
`prompt` from the column `question` and `chosen` from `good` (also as a dict key).

The amount is a fraction of the dataset (`0.5` = half, `2.5` = two full passes plus half of it)
or an exact sample count written `#N` (`'#100'`; above the dataset size it repeats too).
Sampling is seeded: the same specs and seed select the same rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

# Float slack so that e.g. 0.29 * 100 selects 29 rows, not 28.
_ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset in a mix: registered `name` (or alias), how much of it, and an optional local path."""

    name: str
    proportion: float = 1.0
    """Fraction of the dataset's rows; values above 1 repeat it."""
    count: Optional[int] = None
    """Exact number of samples (replaces `proportion`)."""
    path: Optional[str] = None
    """Local file or directory to read instead of the hub."""
    fields: tuple[tuple[str, str], ...] = ()
    """(logical field, column) pairs: which columns a generic format reads its fields from."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"dataset spec needs a non-empty name, got {self.name!r}")
        if isinstance(self.fields, Mapping):
            object.__setattr__(self, "fields", tuple(self.fields.items()))  # frozen: normalise once here
        for pair in self.fields:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
                raise ValueError(
                    f"dataset {self.name!r}: field mapping entries must be non-empty 'field=column' pairs, got {pair!r}"
                )
        logical = [field for field, _ in self.fields]
        repeated = sorted({field for field in logical if logical.count(field) > 1})
        if repeated:
            raise ValueError(f"dataset {self.name!r}: the field mapping names field {repeated[0]!r} twice")
        if isinstance(self.proportion, bool) or not isinstance(self.proportion, (int, float)):
            raise ValueError(f"dataset {self.name!r}: proportion must be a number, got {self.proportion!r}")
        if not math.isfinite(self.proportion) or self.proportion <= 0:
            raise ValueError(
                f"dataset {self.name!r}: proportion must be a positive number, got {self.proportion!r} "
                "(remove the dataset from the mix to skip it)"
            )
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count <= 0:
                raise ValueError(f"dataset {self.name!r}: sample count must be a positive integer, got {self.count!r}")
            if self.proportion != 1.0:
                raise ValueError(f"dataset {self.name!r}: give a proportion or a sample count, not both")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ValueError(f"dataset {self.name!r}: path must be a non-empty string, got {self.path!r}")

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)

    def num_samples(self, num_rows: int) -> int:
        """How many samples this spec draws from a dataset of `num_rows` rows."""
        if self.count is not None:
            return self.count
        return math.floor(num_rows * self.proportion + _ROUNDING_SLACK)

    def __str__(self) -> str:
        amount = f"#{self.count}" if self.count is not None else f"{self.proportion:g}"
        name = self.name + ("?" + "&".join(f"{field}={column}" for field, column in self.fields) if self.fields else "")
        return f"{name}:{amount}" + (f":{self.path}" if self.path is not None else "")


DatasetSpecs = Union[str, DatasetSpec, Mapping[str, Any], Sequence[Union[str, DatasetSpec]]]


def parse_dataset_specs(specs: DatasetSpecs) -> list[DatasetSpec]:
    """Normalise any accepted spec form (see module doc) to a non-empty list of `DatasetSpec`."""
    if isinstance(specs, DatasetSpec):
        parsed = [specs]
    elif isinstance(specs, str):
        parsed = _parse_spec_string(specs)
    elif isinstance(specs, Mapping):
        parsed = [_parse_mapping_entry(name, value) for name, value in specs.items()]
    elif isinstance(specs, Sequence):
        parsed = []
        for item in specs:
            if isinstance(item, DatasetSpec):
                parsed.append(item)
            elif isinstance(item, str):
                parsed.extend(_parse_spec_string(item))
            else:
                raise TypeError(f"dataset spec list items must be strings or DatasetSpec, got {item!r}")
    else:
        raise TypeError(
            f"datasets must be a dict, a 'name[:proportion[:path]]' string or a list of them, got {specs!r}"
        )
    if not parsed:
        raise ValueError(f"no datasets given ({specs!r}); name at least one registered dataset")
    return parsed


def _parse_spec_string(text: str) -> list[DatasetSpec]:
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        return []
    specs = []
    for item in items:
        if not item:
            raise ValueError(f"dataset spec string {text!r} has an empty entry (stray comma?)")
        # Names never contain ':' (the registry forbids it), so the path may.
        name, *rest = item.split(":", 2)
        amount = rest[0] if rest else ""
        path = rest[1] if len(rest) > 1 else None
        specs.append(_make_spec(name.strip(), amount.strip(), path.strip() if path is not None else None, item))
    return specs


def _parse_mapping_entry(name: Any, value: Any) -> DatasetSpec:
    if not isinstance(name, str):
        raise TypeError(f"dataset names (dict keys) must be strings, got {name!r}")
    path = None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"dataset {name!r}: a tuple value must be (proportion, path), got {value!r}")
        value, path = value
    return _make_spec(name, value, path, f"{name}: {value!r}")


def _split_field_mapping(name: str, source: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`'preference?prompt=question&chosen=good'` -> ('preference', (('prompt', 'question'), ('chosen', 'good')))."""
    name, marker, query = name.partition("?")
    if not marker:
        return name, ()
    pairs = []
    for item in query.split("&"):
        field, equals, column = (part.strip() for part in item.partition("="))
        if not equals or not field or not column:
            raise ValueError(
                f"dataset spec {source!r}: field mapping entry {item!r} must read 'field=column' "
                "(several joined by '&', e.g. 'preference?prompt=question&chosen=good')"
            )
        pairs.append((field, column))
    return name.strip(), tuple(pairs)


def _make_spec(name: str, amount: Any, path: Any, source: str) -> DatasetSpec:
    name, fields = _split_field_mapping(name, source)
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(amount, str):
        amount = amount.strip()
        if amount.startswith("#"):
            digits = amount[1:]
            if not digits.isdigit():
                raise ValueError(f"dataset spec {source!r}: sample count {amount!r} must be '#' followed by digits")
            return DatasetSpec(name, count=int(digits), path=path, fields=fields)
        if amount == "":
            amount = None
        else:
            try:
                amount = float(amount)
            except ValueError:
                raise ValueError(
                    f"dataset spec {source!r}: proportion {amount!r} is not a number; use a fraction such as 0.5 "
                    "(values above 1 repeat the dataset) or an exact count such as #100"
                ) from None
    if amount is None:
        amount = 1.0
    if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise ValueError(f"dataset spec {source!r}: proportion {amount!r} is not a number")
    return DatasetSpec(name, proportion=float(amount), path=path, fields=fields)


def sample_indices(num_rows: int, spec: DatasetSpec, rng: np.random.Generator) -> list[int]:
    """Row indices a spec selects: whole passes over the dataset, then a seeded sample of the rest
    (without replacement, in row order)."""
    wanted = spec.num_samples(num_rows)
    if wanted <= 0:
        raise ValueError(
            f"dataset {spec.name!r}: proportion {spec.proportion:g} of {num_rows} rows selects no sample; "
            "use a larger proportion or an exact count such as #1"
        )
    passes, remainder = divmod(wanted, num_rows)
    indices = list(range(num_rows)) * passes
    if remainder:
        indices += sorted(int(i) for i in rng.choice(num_rows, size=remainder, replace=False))
    return indices
