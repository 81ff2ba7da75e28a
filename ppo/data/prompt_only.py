"""Prompts for PPO rollouts: the prompt ids only, left-padded for generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, TypedDict

import paddle

from ppo.data.base import RawSample
from ppo.data.tokenized import RowRef, SkippedSamples, TokenizedDataset, left_pad, length_mask, to_tensor


class PromptOnlySample(TypedDict):
    input_ids: list[int]  # [L]  the prompt, ending where the template opens the answer
    turns: list[str]  # the raw user/assistant turns, to re-render the prompt for another tokenizer


class PromptOnlyBatch(TypedDict):
    input_ids: paddle.Tensor  # [B, L] int64, LEFT-padded with the pad id
    attention_mask: paddle.Tensor  # [B, L] int64, 1 on real tokens


class PromptOnlyDataset(TokenizedDataset):
    """Prompts from (input).

    - De-duplication: a prompt whose text already came from another row (PKU-SafeRLHF repeats a
      prompt for each answer pair) is dropped; copies made by a proportion above 1 are kept, so
      `name:2` still means two passes. `num_duplicates` counts the dropped ones.
    - Length: a prompt longer than `max_length` tokens is dropped; one `DataWarning` gives the
      count and the first dropped row, and an error is raised if no prompt is left.

    The collator LEFT-pads whatever the tokenizer's `padding_side` is, so generated tokens follow
    every prompt directly.
    """

    REQUIRED_FIELDS = (("input",),)

    def _build_items(self, samples: Iterator[tuple[RowRef, RawSample]]) -> None:
        first_source: dict[str, RowRef] = {}
        too_long = SkippedSamples()
        self.num_duplicates = 0
        total = 0
        for ref, sample in samples:
            total += 1
            text = self.template.prompt_text(sample["input"])
            if first_source.setdefault(text, ref) != ref:
                self.num_duplicates += 1
                continue
            input_ids = self.encode_prompt(sample["input"])
            if len(input_ids) > self.max_length:
                too_long.add(f"prompt longer than max_length={self.max_length} tokens", ref)
                continue
            turns = [sample["input"]] if isinstance(sample["input"], str) else list(sample["input"])
            self.items.append(PromptOnlySample(input_ids=input_ids, turns=turns))
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
