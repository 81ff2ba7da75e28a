"""Prompts for PPO rollouts: the prompt ids only, left-padded for generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypedDict

import paddle

from ppo.data.base import RawSample
from ppo.data.tokenized import RowRef, Skip, SkippedSamples, TokenizedDataset, left_pad, length_mask, to_tensor


class PromptOnlySample(TypedDict):
    input_ids: list[int]  # [L]  the prompt, ending where the template opens the answer
    turns: list[str]  # the user/assistant turns (as shortened to fit), to re-render the prompt for another tokenizer
    system: Optional[str]  # the row's own system message, if the template shows it
    sample: RawSample  # the raw row, for rule-based reward functions (ppo.rewards)


class PromptOnlyBatch(TypedDict):
    input_ids: paddle.Tensor  # [B, L] int64, LEFT-padded with the pad id
    attention_mask: paddle.Tensor  # [B, L] int64, 1 on real tokens


class PromptOnlyDataset(TokenizedDataset):
    """Prompts from (input).

    - De-duplication: a prompt whose text already came from another row (PKU-SafeRLHF repeats a
      prompt for each answer pair) is dropped; copies made by a proportion above 1 are kept, so
      `name:2` still means two passes. `num_duplicates` counts the dropped ones.
    - Length: a prompt longer than `max_prompt_length` tokens (default: `max_length` minus
      `response_room`, the tokens PPO keeps for the response) is shortened or dropped by
      `prompt_truncation` (default "drop", see `TokenizedDataset`); one `DataWarning` gives the
      count and the first row of each, and an error is raised if no prompt is left.

    The collator LEFT-pads whatever the tokenizer's `padding_side` is, so generated tokens follow
    every prompt directly.
    """

    REQUIRED_FIELDS = (("input",),)
    ANSWER_WORD = "response"

    def __init__(self, *args, response_room: int = 0, **kwargs) -> None:
        if isinstance(response_room, bool) or not isinstance(response_room, int) or response_room < 0:
            raise ValueError(f"response_room must be a non-negative integer, got {response_room!r}")
        self.answer_room = response_room
        super().__init__(*args, **kwargs)

    def _too_long_reason(self) -> str:
        if self.max_prompt_length is not None:
            return f"prompt longer than max_prompt_length={self.max_prompt_length} tokens"
        if self.answer_room:
            return (
                f"prompt longer than {self.max_length - self.answer_room} tokens "
                f"(max_length={self.max_length} minus {self.answer_room} for the response)"
            )
        return f"prompt longer than max_length={self.max_length} tokens"

    def _build_items(self, samples: Iterator[tuple[RowRef, RawSample]]) -> None:
        first_source: dict[str, RowRef] = {}
        too_long = SkippedSamples()
        self.num_duplicates = 0
        total = 0
        for ref, sample in samples:
            total += 1
            self._pending_notes.clear()
            system = self.system_of(sample)
            text = self.template.prompt_text(sample["input"], system)
            if first_source.setdefault(text, ref) != ref:
                self.num_duplicates += 1
                continue
            fitted = self.fit_prompt(sample["input"], system)
            if isinstance(fitted, Skip):
                too_long.add(fitted.reason, ref)
                continue
            self._record_notes(ref)
            self.items.append(PromptOnlySample(input_ids=fitted.input_ids, turns=fitted.turns, system=system, sample=sample))
            self.sources.append(ref)
        self._report_skipped(too_long, total - self.num_duplicates, verb="dropped")

    def get_collator(self) -> "PromptOnlyCollator":
        return PromptOnlyCollator(pad_token_id=self.pad_token_id)


@dataclass(frozen=True)
class PromptOnlyCollator:
    """Left-pads prompts; see `PromptOnlyBatch`."""

    pad_token_id: int

    def __call__(self, samples: Sequence[PromptOnlySample]) -> PromptOnlyBatch:
        input_ids = [sample["input_ids"] for sample in samples]
        padded = left_pad(input_ids, self.pad_token_id)
        return PromptOnlyBatch(
            input_ids=to_tensor(padded),
            attention_mask=to_tensor(length_mask([len(ids) for ids in input_ids], padded.shape[1], left=True)),
        )
