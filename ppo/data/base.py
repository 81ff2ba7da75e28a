"""Raw samples, the dataset registry and the conversation template."""

from __future__ import annotations

import abc
import difflib
import inspect
from typing import Any, ClassVar, Collection, Iterator, Mapping, Optional, Sequence, TypedDict, Union

import numpy as np

PROMPT_BEGIN = "BEGINNING OF CONVERSATION:"
PROMPT_USER = "USER: {input}"
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_INPUT = PROMPT_BEGIN + " " + PROMPT_USER + " " + PROMPT_ASSISTANT
IGNORE_INDEX = -100

# Characters that separate the parts of a dataset spec string (`name?field=column:proportion:path,name2`).
SPEC_SEPARATORS = (":", ",", "?")


class RawSample(TypedDict, total=False):
    """One row of a raw dataset, before tokenisation; the union of what every stage consumes.

    - `SupervisedDataset`: (input, answer) or (dialogue).
    - `PreferenceDataset`: (input, answer, other_answer, better).
    - `SafetyPreferenceDataset`: (input, answer, other_answer, safer, is_safe, is_other_safe).
    - `PromptOnlyDataset`: (input).

    When `input` is a list it is a dialogue prompt: odd length, alternating user/assistant turns,
    ending with the user turn the answer replies to.
    """

    # Texts
    input: Union[str, list[str]]
    """User input text, or a dialogue ending with a user turn."""
    answer: str
    """Assistant answer text."""
    other_answer: str
    """Another assistant answer to the same input (for preference pairs)."""
    dialogue: list[str]
    """A whole conversation for SFT: user, assistant, user, assistant, ... (even length);
    every assistant turn is trained on."""
    system: str
    """This conversation's system message. With `prompt_template` 'chat' it replaces the
    `system_prompt` key for this row; templates without a system turn drop it (counted in one
    warning)."""

    # Flags
    better: bool
    """Whether `answer` is better than `other_answer`."""
    safer: bool
    """Whether `answer` is safer than `other_answer`."""
    is_safe: bool
    """Whether `answer` is safe."""
    is_other_safe: bool
    """Whether `other_answer` is safe."""


TEXT_FIELDS = ("answer", "other_answer", "system")
FLAG_FIELDS = ("better", "safer", "is_safe", "is_other_safe")
RAW_SAMPLE_FIELDS = ("input", "dialogue") + TEXT_FIELDS + FLAG_FIELDS


class RawSampleError(ValueError):
    """A raw sample is missing a field or holds a value of the wrong type or shape."""


def _sample_error(dataset: str, index: int, field: Optional[str], problem: str) -> RawSampleError:
    where = f"dataset {dataset!r} row {index}"
    if field is not None:
        where += f": field {field!r}"
    return RawSampleError(f"{where} {problem}")


def _check_text(value: Any, dataset: str, index: int, field: str) -> str:
    if not isinstance(value, str):
        raise _sample_error(dataset, index, field, f"must be a string, got {type(value).__name__}: {value!r:.80}")
    if not value.strip():
        raise _sample_error(dataset, index, field, "is empty")
    return value


def _check_turns(value: Any, dataset: str, index: int, field: str, want_odd: bool) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _sample_error(dataset, index, field, f"must be a list of strings, got {type(value).__name__}")
    turns = [_check_text(turn, dataset, index, f"{field}[{i}]") for i, turn in enumerate(value)]
    if want_odd and len(turns) % 2 != 1:
        raise _sample_error(
            dataset,
            index,
            field,
            f"is a dialogue of even length {len(turns)}; a dialogue prompt alternates user/assistant "
            "turns and must end with a user turn (odd length)",
        )
    if not want_odd and (len(turns) == 0 or len(turns) % 2 != 0):
        raise _sample_error(
            dataset,
            index,
            field,
            f"has length {len(turns)}; a dialogue alternates user/assistant turns and must end with an "
            "assistant turn (even, non-zero length)",
        )
    return turns


def _check_flag(value: Any, dataset: str, index: int, field: str) -> bool:
    # numpy/arrow readers hand back numpy.bool_; 0/1 or "true" are not accepted: they hide schema bugs.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _sample_error(dataset, index, field, f"must be a bool, got {type(value).__name__}: {value!r:.80}")


def check_raw_sample(
    sample: Any,
    required: Sequence[Sequence[str]],
    dataset: str,
    index: int,
) -> RawSample:
    """Validate one raw sample and return a clean copy (numpy bools become bool, `None` = absent).

    `required` lists alternative field sets, e.g. `[("input", "answer"), ("dialogue",)]`: exactly one
    of them must be fully present. Errors name the dataset, the row index and the field.
    """
    if not isinstance(sample, Mapping):
        raise _sample_error(dataset, index, None, f"is a {type(sample).__name__}, expected a RawSample (dict)")
    unknown = sorted(set(sample) - set(RAW_SAMPLE_FIELDS))
    if unknown:
        raise _sample_error(
            dataset, index, unknown[0], f"is not a RawSample field; valid fields: {', '.join(RAW_SAMPLE_FIELDS)}"
        )
    clean: dict[str, Any] = {}
    for field, value in sample.items():
        if value is None:
            continue
        if field == "input" and isinstance(value, str):
            clean[field] = _check_text(value, dataset, index, field)
        elif field == "input":
            clean[field] = _check_turns(value, dataset, index, field, want_odd=True)
        elif field == "dialogue":
            clean[field] = _check_turns(value, dataset, index, field, want_odd=False)
        elif field in TEXT_FIELDS:
            clean[field] = _check_text(value, dataset, index, field)
        else:
            clean[field] = _check_flag(value, dataset, index, field)

    complete = [fields for fields in required if all(field in clean for field in fields)]
    if not complete:
        options = " or ".join("(" + ", ".join(fields) + ")" for fields in required)
        # Name the first missing field of the alternative that is closest to complete.
        closest = max(required, key=lambda fields: sum(field in clean for field in fields))
        missing = next(field for field in closest if field not in clean)
        raise _sample_error(dataset, index, missing, f"is missing; this dataset type needs {options}")
    if len(complete) > 1:
        options = " and ".join("(" + ", ".join(fields) + ")" for fields in complete)
        raise _sample_error(dataset, index, None, f"provides both {options}; give only one of them")
    return RawSample(**clean)


def format_prompt(input: Union[str, Sequence[str]], eos_token: str) -> str:
    """The prompt text of an input: `PROMPT_INPUT` for one turn; for a dialogue prompt each earlier
    assistant turn is followed by the EOS string (safe-rlhf / PaddleNLP compatible layout)."""
    turns = [input] if isinstance(input, str) else list(input)
    if len(turns) % 2 != 1:
        raise ValueError(f"a dialogue prompt must have odd length (end with a user turn), got {len(turns)} turns")
    text = PROMPT_BEGIN + " "
    for i, turn in enumerate(turns):
        if i % 2 == 0:
            text += PROMPT_USER.format(input=turn) + " " + PROMPT_ASSISTANT
        else:
            text += " " + turn + eos_token
    return text


class RawDataset(abc.ABC):
    """A source of `RawSample`s, registered under its class attribute `NAME`.

    Subclasses set `NAME` (and optionally `ALIASES`, which are not inherited) and implement
    `__init__(self, path=None)`, `__getitem__(index) -> RawSample` and `__len__`. A subclass
    without its own `NAME` is an abstract helper and is not registered.

    Load a registered dataset by name or alias with `RawDataset.load(name, path)`.
    """

    NAME: ClassVar[str]
    ALIASES: ClassVar[Collection[str]] = ()

    # name or alias -> class; shared by the whole hierarchy.
    _registry: ClassVar[dict[str, type["RawDataset"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "NAME" not in own:
            if "ALIASES" in own:
                raise TypeError(f"{cls.__qualname__} defines ALIASES but no NAME")
            return
        names = [own["NAME"]] + _aliases_of(cls)
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{cls.__qualname__}: dataset NAME/ALIASES entries must be non-empty strings, got {name!r}")
            if name != name.strip() or any(sep in name for sep in SPEC_SEPARATORS):
                raise ValueError(
                    f"{cls.__qualname__}: dataset name {name!r} may not contain {' or '.join(map(repr, SPEC_SEPARATORS))} "
                    "or surrounding spaces (they separate dataset specs)"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"{cls.__qualname__}: NAME and ALIASES repeat a name: {names}")
        for name in names:
            existing = RawDataset._registry.get(name)
            if existing is not None and not _is_redefinition(existing, cls):
                raise ValueError(
                    f"dataset name {name!r} of {_class_path(cls)} is already registered by {_class_path(existing)}"
                )
        # Re-running the same class definition (a notebook cell, a reloaded module) replaces it.
        for name, registered in list(RawDataset._registry.items()):
            if _is_redefinition(registered, cls):
                del RawDataset._registry[name]
        for name in names:
            RawDataset._registry[name] = cls

    @classmethod
    def names(cls) -> list[str]:
        """Registered dataset NAMEs (aliases excluded), sorted."""
        return sorted({registered.NAME for registered in RawDataset._registry.values()})

    @classmethod
    def resolve(cls, name: str) -> type["RawDataset"]:
        """The registered class for a NAME or alias; a clear error listing the names otherwise."""
        if isinstance(name, str) and name in RawDataset._registry:
            return RawDataset._registry[name]
        available = ", ".join(cls.names())
        message = f"unknown dataset {name!r}; available: {available}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, list(RawDataset._registry), n=1, cutoff=0.6)
            lowered = [known for known in RawDataset._registry if known.lower() == name.lower()]
            if lowered or close:
                message += f" (did you mean {(lowered or close)[0]!r}?)"
        raise ValueError(message)

    @classmethod
    def load(
        cls, name: str, path: Optional[str] = None, *args: Any, fields: Optional[Mapping[str, str]] = None, **kwargs: Any
    ) -> "RawDataset":
        """Instantiate the dataset registered as `name` (NAME or alias), reading from `path` if given.
        `fields` (logical field -> column, the `name?field=column` part of a spec) is passed on to
        datasets that take a field mapping (the generic formats of `ppo.data.generic`)."""
        dataset_class = cls.resolve(name)
        if fields:
            if not _accepts_keyword(dataset_class, "fields"):
                raise TypeError(
                    f"dataset {name!r} ({_class_path(dataset_class)}) takes no field mapping "
                    f"('{name}?{'&'.join(f'{k}={v}' for k, v in fields.items())}'); its columns are fixed"
                )
            kwargs["fields"] = dict(fields)
        if path is not None:
            if not _accepts_keyword(dataset_class, "path"):
                raise TypeError(f"dataset {name!r} ({_class_path(dataset_class)}) does not take a path argument")
            dataset = dataset_class(*args, path=path, **kwargs)
        else:
            dataset = dataset_class(*args, **kwargs)
        size = len(dataset)
        if size == 0:
            where = f" at {path!r}" if path is not None else ""
            raise ValueError(f"dataset {name!r}{where} is empty (0 rows)")
        return dataset

    @abc.abstractmethod
    def __getitem__(self, index: int) -> RawSample:
        """The sample at `index`."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    def __iter__(self) -> Iterator[RawSample]:
        for index in range(len(self)):
            yield self[index]

    def source_index(self, index: int) -> int:
        """The row of the source file that sample `index` comes from, for messages. The same
        index unless the dataset leaves out rows it cannot use (see `ppo.data.hh_rlhf`)."""
        return index


def _aliases_of(cls: type) -> list[Any]:
    aliases = cls.__dict__.get("ALIASES", ())
    if isinstance(aliases, str) or not isinstance(aliases, Collection):
        raise TypeError(f"{cls.__qualname__}.ALIASES must be a tuple/list of strings, got {aliases!r}")
    return list(aliases)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_redefinition(existing: type, new: type) -> bool:
    return existing is new or _class_path(existing) == _class_path(new)


def _accepts_keyword(dataset_class: type, keyword: str) -> bool:
    try:
        parameters = inspect.signature(dataset_class.__init__).parameters
    except (TypeError, ValueError):
        return True
    return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

