"""Anthropic HH-RLHF transcripts (`Anthropic/hh-rlhf`, or a local copy of its jsonl.gz files).

Each row holds two whole transcripts, `chosen` and `rejected`:
`"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <reply>"`. The turns before the
last assistant reply are the prompt dialogue (the same in both), the last replies are the answers:
input = the shared turns, answer = chosen reply, other_answer = rejected reply, better = True.

Consecutive turns of one speaker (the data has a few "Assistant: ... Assistant: ...") are joined
into one turn with a blank line. Two known flaws of the published data are left out with one
counted `DataWarning` naming the first row of each: an empty last reply, and a pair whose
transcripts differ before the last reply (there is no single prompt to compare the answers on).
A transcript that is not a Human/Assistant transcript at all is an error naming the row and field.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping, Optional

from ppo.data.base import RawSample
from ppo.data.conversation import Conversation, RowLocation
from ppo.data.generic import TableDataset, input_of
from ppo.data.tokenized import DataWarning

_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class TranscriptFlaw(Exception):
    """A row that parses but cannot be used (see the module doc); it is left out and counted."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field, self.reason = field, reason


def parse_transcript(text: Any, where: RowLocation, field: str) -> Conversation:
    """The user/assistant turns of one transcript, ending with the assistant's reply (which may be
    empty: callers decide). Raises a RawSampleError naming `field` when it is not a transcript."""
    if not isinstance(text, str):
        raise where.error(field, f"must be a transcript string, got {type(text).__name__}")
    pieces = _TURN_MARKER.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise where.error(
            field, f"does not parse as an HH-RLHF transcript: it must start with '\\n\\nHuman:', got {text[:60]!r}"
        )
    turns: list[tuple[str, str]] = []
    for speaker, body in zip(pieces[1::2], pieces[2::2]):
        role, body = _ROLES[speaker], body.strip()
        if turns and turns[-1][0] == role:
            turns[-1] = (role, (turns[-1][1] + "\n\n" + body).strip())
        else:
            turns.append((role, body))
    if turns[0][0] != "user" or turns[-1][0] != "assistant":
        raise where.error(field, "does not parse as an HH-RLHF transcript: it must end with an '\\n\\nAssistant:' reply")
    for position, (_, body) in enumerate(turns[:-1]):
        if not body:
            raise where.error(field, f"has an empty turn {position} before the last reply")
    return Conversation(None, [body for _, body in turns])


class HHRLHFDataset(TableDataset):
    """HH-RLHF preference pairs (train split of the hub dataset, or any file/folder in its layout)."""

    NAME = "hh-rlhf"
    ALIASES = ("Anthropic/hh-rlhf",)
    HUB_NAME = "Anthropic/hh-rlhf"
    SPLIT = "train"
    FIELDS = {"chosen": "chosen", "rejected": "rejected"}
    REQUIRED = ("chosen", "rejected")

    def __init__(self, path: Optional[str] = None, fields: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(path, fields)
        # Parse every row once to find the flawed ones, so that indices only reach usable rows.
        self.rows: list[int] = []
        flaws: dict[str, list] = {}  # reason -> [count, first row, its field]
        chosen_column, rejected_column = self.data[self.columns["chosen"]], self.data[self.columns["rejected"]]
        for index, (chosen, rejected) in enumerate(zip(chosen_column, rejected_column)):
            try:
                self._pair(chosen, rejected, RowLocation(self.NAME, index, self.source))
            except TranscriptFlaw as flaw:
                flaws.setdefault(flaw.reason, [0, index, flaw.field])[0] += 1
                continue
            self.rows.append(index)
        if flaws:
            described = "; ".join(
                f"{count} × {reason} (first: row {first}, field {field})" for reason, (count, first, field) in flaws.items()
            )
            left_out = sum(count for count, _, _ in flaws.values())
            message = f"dataset {self.NAME!r} ({self.source}): left out {left_out} of {len(chosen_column)} rows: {described}"
            if not self.rows:
                raise ValueError(message)
            warnings.warn(message, DataWarning, stacklevel=2)

    def _pair(self, chosen_text: Any, rejected_text: Any, where: RowLocation) -> RawSample:
        chosen_label, rejected_label = self.field_label("chosen"), self.field_label("rejected")
        chosen = parse_transcript(chosen_text, where, chosen_label)
        rejected = parse_transcript(rejected_text, where, rejected_label)
        for label, conversation in ((chosen_label, chosen), (rejected_label, rejected)):
            if not conversation.turns[-1]:
                raise TranscriptFlaw(label, "empty last reply")
        if chosen.turns[:-1] != rejected.turns[:-1]:
            raise TranscriptFlaw(rejected_label, "transcripts differ before the last reply")
        prompt = Conversation(None, chosen.turns[:-1])
        return RawSample(input=input_of(prompt), answer=chosen.turns[-1], other_answer=rejected.turns[-1], better=True)

    def convert(self, row, where):
        return self._pair(row[self.columns["chosen"]], row[self.columns["rejected"]], where)

    def __getitem__(self, index: int) -> RawSample:
        source = self.rows[index]
        return self.convert(self.data[source], RowLocation(self.NAME, source, self.source))

    def __len__(self) -> int:
        return len(self.rows)

    def source_index(self, index: int) -> int:
        return self.rows[index]


class HHRLHFTestDataset(HHRLHFDataset):
    NAME = "hh-rlhf/test"
    ALIASES = ("Anthropic/hh-rlhf/test",)
    SPLIT = "test"

