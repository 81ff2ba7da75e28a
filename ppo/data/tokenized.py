"""Shared machinery of the tokenised datasets: spec loading, validation, encoding, padding.

Encoding is the conversation template's job (`ppo.data.templates`, the `prompt_template` key):
"safe-rlhf" (default) renders

    [special prefix, e.g. BOS] "BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT:"
    {a1} EOS "USER: {u2} ASSISTANT:" ... {answer} EOS

and "chat" the tokenizer's own chat template, each answer ending with the template's end-of-turn
token. Every dataset type uses the same template, so SFT, RM and PPO see identical token ids for
the same conversation, and pieces are tokenised apart so the prompt/answer boundary is exact.

Masks are always built from sequence lengths, never from `input_ids != pad_token_id`: when a
tokenizer has no pad token we pad with EOS, and the EOS that ends each answer is a real token.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Sequence, Union

import numpy as np
import paddle

from ppo.data.base import RawDataset, RawSample, RawSampleError, check_raw_sample
from ppo.data.specs import DatasetSpecs, parse_dataset_specs, sample_indices
from ppo.data.templates import DEFAULT_TEMPLATE, EncodedTurns, PromptTemplate, as_turns, build_template
from ppo.data.truncation import (
    DEFAULT_PROMPT_TRUNCATION,
    FittedPrompt,
    PromptFitter,
    Unfit,
    check_max_prompt_length,
)


class DataWarning(UserWarning):
    """Samples were skipped or dropped while building a tokenised dataset."""


@dataclass(frozen=True)
class RowRef:
    """Where a tokenised item came from: the dataset name as given in the spec, and the row index."""

    dataset: str
    index: int

    def __str__(self) -> str:
        return f"dataset {self.dataset!r} row {self.index}"


@dataclass(frozen=True)
class Skip:
    """Returned by `preprocess` instead of an item when a sample cannot be used (with the reason)."""

    reason: str


class InvalidSample(Exception):
    """Raised by `preprocess` for a sample whose fields contradict each other; the dataset turns it
    into a `RawSampleError` naming the dataset and row."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field, self.problem = field, problem


class SkippedSamples:
    """Counts samples by reason (skipped, shortened, ...), to report them in one warning."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[RowRef]] = {}

    def add(self, reason: str, ref: RowRef) -> None:
        self.by_reason.setdefault(reason, []).append(ref)

    def __len__(self) -> int:
        return sum(len(refs) for refs in self.by_reason.values())

    def describe(self) -> str:
        return "; ".join(f"{len(refs)} × {reason} (first: {refs[0]})" for reason, refs in self.by_reason.items())


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def right_pad(sequences: Sequence[Sequence[int]], pad_value: int, length: Optional[int] = None) -> np.ndarray:
    """[B, L] int64 array; L = `length` or the longest sequence."""
    return _pad(sequences, pad_value, length, left=False)


def left_pad(sequences: Sequence[Sequence[int]], pad_value: int, length: Optional[int] = None) -> np.ndarray:
    """[B, L] int64 array with padding on the left (for generation)."""
    return _pad(sequences, pad_value, length, left=True)


def length_mask(lengths: Sequence[int], length: int, left: bool = False) -> np.ndarray:
    """[B, L] int64 mask with 1 on the `lengths[b]` real positions of each row."""
    positions = np.arange(length)[None, :]  # [1, L]
    lengths_column = np.asarray(lengths, dtype=np.int64)[:, None]  # [B, 1]
    if left:
        return (positions >= length - lengths_column).astype(np.int64)
    return (positions < lengths_column).astype(np.int64)


def _pad(sequences: Sequence[Sequence[int]], pad_value: int, length: Optional[int], left: bool) -> np.ndarray:
    longest = max(len(sequence) for sequence in sequences)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"cannot pad a sequence of length {longest} to {length}")
    padded = np.full((len(sequences), length), pad_value, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            if left:
                padded[row, length - len(sequence) :] = sequence
            else:
                padded[row, : len(sequence)] = sequence
    return padded


def to_tensor(array: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(array, dtype="int64")


class TokenizedDataset(paddle.io.Dataset):
    """Loads the datasets named by `datasets` (dict, `name[:proportion[:path]]` string or list; see
    `ppo.data.specs`), samples them with `seed`, validates every raw sample as it is read, and
    tokenises it with `preprocess`. `max_length` (default `tokenizer.model_max_length`) bounds every
    sequence. `prompt_template` names the conversation template ("safe-rlhf" or "chat", see
    `ppo.data.templates`); `system_prompt` opens every conversation (chat templates only; a row's
    own `system` message replaces it).

    Prompts longer than `max_prompt_length` tokens (default: `max_length - answer_room`) are
    shortened or left out by `prompt_truncation` (`ppo.data.truncation`; default "drop"); one
    `DataWarning` counts the shortened prompts with the first row, another the left-out ones.
    Subclasses set `REQUIRED_FIELDS` and implement `preprocess` and `get_collator`.
    """

    REQUIRED_FIELDS: ClassVar[tuple[tuple[str, ...], ...]]
    # Tokens a prompt must leave free within max_length for the answer (at least one to train on).
    answer_room: int = 1
    ANSWER_WORD: ClassVar[str] = "answer"  # what follows the prompt, in messages

    def __init__(
        self,
        datasets: DatasetSpecs,
        tokenizer: Any,
        max_length: Optional[int] = None,
        seed: int = 42,
        prompt_template: str = DEFAULT_TEMPLATE,
        system_prompt: Optional[str] = None,
        max_prompt_length: Optional[int] = None,
        prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = _resolve_max_length(tokenizer, max_length)
        self.seed = seed
        check_max_prompt_length(
            max_prompt_length,
            self.max_length - self.answer_room,
            f"{type(self).__name__} needs prompts to leave {self.answer_room} of max_length={self.max_length} "
            f"tokens for the {self.ANSWER_WORD}",
        )
        self.max_prompt_length = max_prompt_length
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token; every sequence must end with one")
        self.eos_token_id = int(eos)
        self.pad_token_id = resolve_pad_token_id(tokenizer)
        self.specs = parse_dataset_specs(datasets)
        self.template: PromptTemplate = build_template(prompt_template, tokenizer, system_prompt)
        self.prompt_fitter = PromptFitter(
            self.template,
            self.max_length - self.answer_room if max_prompt_length is None else max_prompt_length,
            prompt_truncation,
            too_long=self._too_long_reason(),
        )
        self.items: list[dict[str, Any]] = []
        self.sources: list[RowRef] = []  # sources[i] = where items[i] came from
        # Changes made to samples that were kept, by kind ("shortened", "system"); see `_note`.
        self.changed: dict[str, SkippedSamples] = {"shortened": SkippedSamples(), "system": SkippedSamples()}
        self._pending_notes: list[tuple[str, str]] = []
        self._num_read = 0
        self._build_items(self._raw_samples())
        if not self.items:
            raise ValueError(f"{type(self).__name__}: no samples in {[str(spec) for spec in self.specs]}")
        self._report_changes()

    # ---- building ------------------------------------------------------------------------------

    def _raw_samples(self) -> Iterator[tuple[RowRef, RawSample]]:
        """Validated raw samples of every spec, in spec order, seeded."""
        classes = [RawDataset.resolve(spec.name) for spec in self.specs]  # fail on a typo before loading
        seen: dict[tuple, str] = {}  # (class, path, field mapping) -> name as given
        for spec, dataset_class in zip(self.specs, classes):
            key = (dataset_class, spec.path, spec.fields)
            if key in seen:
                raise ValueError(
                    f"dataset {spec.name!r} is listed twice ({seen[key]!r} and {spec.name!r}, same path); "
                    "use one entry with a proportion above 1 to repeat it"
                )
            seen[key] = spec.name
        rng = np.random.default_rng(self.seed)
        for spec in self.specs:
            raw = RawDataset.load(spec.name, spec.path, fields=spec.field_map)
            for index in sample_indices(len(raw), spec, rng):
                row = raw.source_index(index)
                sample = check_raw_sample(raw[index], self.REQUIRED_FIELDS, spec.name, row)
                self._num_read += 1
                yield RowRef(spec.name, row), sample

    def _build_items(self, samples: Iterator[tuple[RowRef, RawSample]]) -> None:
        skipped = SkippedSamples()
        total = 0
        for ref, sample in samples:
            total += 1
            result = self._preprocess(ref, sample)
            if isinstance(result, Skip):
                skipped.add(result.reason, ref)
            else:
                self.items.append(result)
                self.sources.append(ref)
        self._report_skipped(skipped, total, verb="skipped")

    def _preprocess(self, ref: RowRef, sample: RawSample) -> Union[dict[str, Any], Skip]:
        self._pending_notes.clear()
        try:
            result = self.preprocess(sample)
        except InvalidSample as error:
            raise RawSampleError(f"{ref}: field {error.field!r} {error.problem}") from None
        if not isinstance(result, Skip):
            self._record_notes(ref)
        return result

    def _record_notes(self, ref: RowRef) -> None:
        """Count what `preprocess` changed in the sample at `ref` (see `_note`)."""
        for kind, note in self._pending_notes:
            self.changed[kind].add(note, ref)
        self._pending_notes.clear()

    def _note(self, kind: str, note: str) -> None:
        # preprocess does not know its row; `_record_notes` attaches the row once the item is kept.
        self._pending_notes.append((kind, note))

    def _report_changes(self) -> None:
        name, total = type(self).__name__, self._num_read
        shortened, systems = self.changed["shortened"], self.changed["system"]
        if shortened:
            warnings.warn(
                f"{name}: shortened {len(shortened)} of {total} prompts to {self.prompt_fitter.limit} tokens "
                f"({self._limit_key()}): {shortened.describe()}",
                DataWarning,
                stacklevel=3,
            )
        if systems:
            warnings.warn(
                f"{name}: dropped the system message of {len(systems)} of {total} samples: {systems.describe()}",
                DataWarning,
                stacklevel=3,
            )

    def _limit_key(self) -> str:
        if self.max_prompt_length is not None:
            return f"max_prompt_length={self.max_prompt_length}"
        room = f" minus {self.answer_room} for the {self.ANSWER_WORD}" if self.answer_room else ""
        return f"max_length={self.max_length}{room}"

    def _too_long_reason(self) -> str:
        """How a prompt over the budget is described when it is left out ("drop")."""
        if self.max_prompt_length is not None:
            return f"prompt longer than max_prompt_length={self.max_prompt_length} tokens"
        return f"prompt fills max_length={self.max_length} with no room for an answer token"

    # ---- prompts -------------------------------------------------------------------------------

    def system_of(self, sample: RawSample) -> Optional[str]:
        """The row's own system message, if the template can show it (else noted as dropped)."""
        system = sample.get("system")
        if system is not None and not self.template.HAS_SYSTEM_TURN:
            self._note("system", f"prompt_template {self.template.NAME!r} has no system turn")
            return None
        return system

    def fit_prompt(self, input: Union[str, Sequence[str]], system: Optional[str] = None) -> Union[FittedPrompt, Skip]:
        """The prompt of `input` within the prompt budget (shortened by `prompt_truncation`, and
        noted), or a Skip when it is left out."""
        fitted = self.prompt_fitter.fit(as_turns(input), system)
        if isinstance(fitted, Unfit):
            return Skip(fitted.reason)
        if fitted.shortened is not None:
            self._note("shortened", fitted.shortened)
        return fitted

    def _report_skipped(self, skipped: SkippedSamples, total: int, verb: str) -> None:
        if not skipped:
            return
        name = type(self).__name__
        if len(skipped) == total:
            raise ValueError(f"{name}: all {total} samples were {verb}: {skipped.describe()}")
        warnings.warn(f"{name}: {verb} {len(skipped)} of {total} samples: {skipped.describe()}", DataWarning, stacklevel=4)

    def preprocess(self, sample: RawSample) -> Union[dict[str, Any], Skip]:
        """Tokenise one validated raw sample into an item, or return `Skip(reason)`."""
        raise NotImplementedError

    def get_collator(self):
        """The callable that turns a list of items into a batch dict of `paddle.Tensor`s."""
        raise NotImplementedError

    # ---- encoding ------------------------------------------------------------------------------

    def encode_turns(self, turns: Union[str, Sequence[str]], system: Optional[str] = None) -> EncodedTurns:
        """Ids of a conversation (user, assistant, user, ...) and, per id, the index of the answer it
        belongs to (answer tokens and the end-of-turn token after them), -1 elsewhere."""
        return self.template.encode_turns(turns, system)

    def encode_prompt(self, input: Union[str, Sequence[str]], system: Optional[str] = None) -> list[int]:
        """Ids of the prompt for `input` (a string or a dialogue ending with a user turn), ending
        where the template opens the answer."""
        return self.template.encode_prompt(input, system)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer in this dataset's template (EOS, or e.g. `<|im_end|>` then EOS)."""
        return self.template.stop_token_ids

    # ---- dataset protocol ----------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def select(self, indices: Sequence[int]):
        """A dataset of the same type holding only `items[i]` for i in `indices` (shares the tokenizer)."""
        subset = copy.copy(self)
        subset.items = [self.items[i] for i in indices]
        subset.sources = [self.sources[i] for i in indices]
        return subset

    def split_train_test(self, test_ratio: float, seed: Optional[int] = None):
        """Split into (train, test) datasets with `ceil(test_ratio * len)` seeded random test items.

        Raises if either side would be empty; the train side always keeps at least one item.
        """
        if isinstance(test_ratio, bool) or not isinstance(test_ratio, (int, float)) or not 0 < test_ratio < 1:
            raise ValueError(f"test_ratio must be a number strictly between 0 and 1, got {test_ratio!r}")
        size = len(self)
        num_test = math.ceil(test_ratio * size)
        if num_test >= size:
            raise ValueError(
                f"test_ratio {test_ratio} of {size} samples leaves no training sample; use a smaller ratio or more data"
            )
        order = np.random.default_rng(self.seed if seed is None else seed).permutation(size)
        test_indices = sorted(int(i) for i in order[:num_test])
        train_indices = sorted(int(i) for i in order[num_test:])
        return self.select(train_indices), self.select(test_indices)


def _resolve_max_length(tokenizer: Any, max_length: Optional[int]) -> int:
    if max_length is None:
        max_length = getattr(tokenizer, "model_max_length", None)
        if max_length is None:
            raise ValueError(f"{type(tokenizer).__name__} has no model_max_length; pass max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    return int(max_length)
