"""Built-in generic formats: datasets in the layouts other RLHF tools already use, read from a local
json / jsonl / parquet file or directory (json and jsonl may be `.gz`), with configurable columns.

| name | columns (default names) | RawSample |
|---|---|---|
| `preference` | `prompt`, `chosen`, `rejected` | input, answer = chosen, other_answer = rejected, better = True |
| `messages` | `messages` | dialogue (when it ends with an answer) and input (up to the last user message) |
| `prompt-response` | `prompt`, `response` (optional) | input, answer |
| `prompt-completion` | `prompt`, `completion` (optional) | input, answer |

`prompt` is a string or a message list ending with a user message; `chosen`, `rejected`,
`response` and `completion` are strings or message lists ending with the assistant's answer (the
messages before it, if any, must repeat the prompt). Message lists follow OpenAI's layout (see
`ppo.data.conversation`); a leading system message becomes the row's `system`.

Columns are renamed in the spec, URL-query style (`ppo.data.specs`):
`preference?prompt=question&chosen=good&rejected=bad:1:/data/pairs.jsonl.gz`. A mapped column
that the file lacks, a required column that is missing, or a mapping naming a field the format
does not have is an error listing the file's columns.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Optional

from ppo.data.base import RawDataset, RawSample
from ppo.data.conversation import Conversation, RowLocation, answer_of, parse_messages, prompt_of
from ppo.data.loading import load_table


class TableDataset(RawDataset):
    """Rows of a table whose columns are found through a field mapping (abstract: subclasses set
    NAME, FIELDS, REQUIRED and implement `convert`).

    `FIELDS` maps each logical field to its default column; fields outside `REQUIRED` are
    optional and read only when the table has their column. Without `HUB_NAME` a path is required.
    """

    FIELDS: ClassVar[Mapping[str, str]]
    REQUIRED: ClassVar[tuple[str, ...]]
    HUB_NAME: ClassVar[Optional[str]] = None
    SPLIT: ClassVar[str] = "train"

    def __init__(self, path: Optional[str] = None, fields: Optional[Mapping[str, str]] = None) -> None:
        mapping = dict(fields or {})
        unknown = sorted(set(mapping) - set(self.FIELDS))
        if unknown:
            raise ValueError(
                f"dataset {self.NAME!r} has no field {unknown[0]!r} to map; its fields are {', '.join(self.FIELDS)} "
                f"(write '{self.NAME}?{next(iter(self.FIELDS))}=<column>')"
            )
        if path is None and self.HUB_NAME is None:
            raise ValueError(
                f"dataset {self.NAME!r} reads a local file: give its path, e.g. '{self.NAME}:1:/data/rows.jsonl' "
                "(json, jsonl or parquet; json/jsonl may be .gz)"
            )
        self.source = str(path) if path is not None else self.HUB_NAME
        self.data = load_table(self.NAME, self.HUB_NAME or self.NAME, self.SPLIT, path)
        self.columns = self._resolve_columns(mapping, list(self.data.column_names))

    def _resolve_columns(self, mapping: Mapping[str, str], present: list[str]) -> dict[str, str]:
        """logical field -> column, for the fields this table has; errors for missing required ones."""
        columns = {}
        for field, default in self.FIELDS.items():
            column = mapping.get(field, default)
            if column in present:
                columns[field] = column
            elif field in mapping:
                raise ValueError(
                    f"dataset {self.NAME!r} ({self.source}): column {column!r}, mapped to field {field!r} in the spec, "
                    f"is not in the file; its columns are {present}"
                )
            elif field in self.REQUIRED:
                raise ValueError(
                    f"dataset {self.NAME!r} ({self.source}) has no column {column!r} for field {field!r}; its columns "
                    f"are {present}. Name the column in the spec: '{self.NAME}?{field}=<column>'"
                )
        return columns

    def field_label(self, field: str) -> str:
        """How errors name a field: its column, and the logical field when they differ."""
        column = self.columns.get(field, self.FIELDS[field])
        return repr(column) if column == field else f"{column!r} (mapped to {field})"

    def value(self, row: Mapping[str, Any], field: str, where: RowLocation) -> Any:
        """The row's value of a field; None when the field is optional and absent."""
        if field not in self.columns:
            return None
        value = row[self.columns[field]]
        if value is None and field in self.REQUIRED:
            raise where.error(self.field_label(field), "is null")
        return value

    def __getitem__(self, index: int) -> RawSample:
        return self.convert(self.data[index], RowLocation(self.NAME, index, self.source))

    def __len__(self) -> int:
        return len(self.data)

    @abc.abstractmethod
    def convert(self, row: Mapping[str, Any], where: RowLocation) -> RawSample:
        """The RawSample of one table row."""

    def _prompt(self, row: Mapping[str, Any], where: RowLocation, field: str = "prompt") -> Conversation:
        return prompt_of(self.value(row, field, where), where, self.field_label(field))


def _with_system(sample: RawSample, conversation: Conversation) -> RawSample:
    if conversation.system is not None:
        sample["system"] = conversation.system
    return sample


def input_of(conversation: Conversation):
    # A one-turn prompt stays a plain string, as the built-in datasets give it.
    return conversation.turns[0] if len(conversation.turns) == 1 else list(conversation.turns)


class PreferencePairsDataset(TableDataset):
    """`prompt` / `chosen` / `rejected` preference pairs (TRL's and OpenRLHF's layout): the
    chosen answer is the better one."""

    NAME = "preference"
    ALIASES = ("prompt-chosen-rejected",)
    FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    REQUIRED = ("prompt", "chosen", "rejected")

    def convert(self, row, where):
        prompt = self._prompt(row, where)
        chosen = answer_of(self.value(row, "chosen", where), prompt, where, self.field_label("chosen"))
        rejected = answer_of(self.value(row, "rejected", where), prompt, where, self.field_label("rejected"))
        return _with_system(RawSample(input=input_of(prompt), answer=chosen, other_answer=rejected, better=True), prompt)


class MessagesDataset(TableDataset):
    """OpenAI-style `messages`. A conversation ending with an assistant message gives a `dialogue`
    (SFT trains on every assistant turn) and, for prompt datasets, the `input` before its last
    answer; one ending with a user message gives the `input` only."""

    NAME = "messages"
    ALIASES = ("openai-messages",)
    FIELDS = {"messages": "messages"}
    REQUIRED = ("messages",)

    def convert(self, row, where):
        conversation = parse_messages(self.value(row, "messages", where), where, self.field_label("messages"))
        turns = conversation.turns
        if conversation.ends_with_answer:
            sample = RawSample(dialogue=list(turns), input=input_of(Conversation(None, turns[:-1])))
        else:
            sample = RawSample(input=input_of(conversation))
        return _with_system(sample, conversation)


class PromptResponseDataset(TableDataset):
    """`prompt` / `response` rows: SFT pairs, or prompts alone (PPO) when there is no response column."""

    NAME = "prompt-response"
    FIELDS = {"prompt": "prompt", "response": "response"}
    REQUIRED = ("prompt",)
    ANSWER_FIELD: ClassVar[str] = "response"

    def convert(self, row, where):
        prompt = self._prompt(row, where)
        sample = RawSample(input=input_of(prompt))
        answer = self.value(row, self.ANSWER_FIELD, where)
        if answer is not None:
            sample["answer"] = answer_of(answer, prompt, where, self.field_label(self.ANSWER_FIELD))
        return _with_system(sample, prompt)


class PromptCompletionDataset(PromptResponseDataset):
    """TRL's `prompt` / `completion` layout; the same as `prompt-response` otherwise."""

    NAME = "prompt-completion"
    FIELDS = {"prompt": "prompt", "completion": "completion"}
    ANSWER_FIELD = "completion"
