"""Supervised fine-tuning data: prompt + answer, loss on the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypedDict, Union

import paddle

from ppo.data.base import IGNORE_INDEX, RawSample
from ppo.data.tokenized import Skip, TokenizedDataset, length_mask, right_pad, to_tensor


class SupervisedSample(TypedDict):
    input_ids: list[int]  # [L]  prompt + answer + end-of-turn token (EOS for safe-rlhf)
    labels: list[int]  # [L]  = input_ids on answer tokens (and their end-of-turn token), IGNORE_INDEX elsewhere


class SupervisedBatch(TypedDict):
    input_ids: paddle.Tensor  # [B, L] int64, right-padded with the pad id
    attention_mask: paddle.Tensor  # [B, L] int64, 1 on real tokens (EOS included)
    labels: paddle.Tensor  # [B, L] int64, right-padded with IGNORE_INDEX


class SupervisedDataset(TokenizedDataset):
    """SFT samples from (input, answer) or (dialogue).

    `labels` are aligned with `input_ids` (not shifted): position t holds the token at t, or
    IGNORE_INDEX for prompt/user tokens. Predicting token t+1 from position t is the loss's job.
    For a `dialogue`, every assistant turn (and its end-of-turn token) is labelled; for a dialogue
    `input`, only the final `answer`.

    The prompt (the input; for a `dialogue`, its first user turn) is fitted into
    `max_prompt_length` by `prompt_truncation` (see `TokenizedDataset`); then sequences longer
    than `max_length` are truncated (the final EOS may be cut). A sample whose prompt is left out,
    or leaves no room for a single answer token, is skipped; skipped samples are reported in one
    `DataWarning`, and an error is raised if every sample is skipped.
    """

    REQUIRED_FIELDS = (("input", "answer"), ("dialogue",))

    def preprocess(self, sample: RawSample) -> Union[SupervisedSample, Skip]:
        system = self.system_of(sample)
        if "dialogue" in sample:
            # Every answer is trained on, so there are no earlier turns to give up: only the
            # opening user turn can be cut.
            fitted = self.fit_prompt(sample["dialogue"][:1], system)
            if isinstance(fitted, Skip):
                return fitted
            encoded = self.encode_turns(fitted.turns + list(sample["dialogue"][1:]), system)
            is_answer = encoded.is_answer
        else:
            # Earlier answers of a dialogue prompt are context; only the final answer is trained on.
            fitted = self.fit_prompt(sample["input"], system)
            if isinstance(fitted, Skip):
                return fitted
            turns = fitted.turns
            encoded = self.encode_turns(turns + [sample["answer"]], system)
            is_answer = [index == len(turns) // 2 for index in encoded.answer_index]
        input_ids, is_answer = encoded.input_ids[: self.max_length], is_answer[: self.max_length]
        if not any(is_answer):
            return Skip(f"prompt fills max_length={self.max_length} with no room for an answer token")
        labels = [token if answer else IGNORE_INDEX for token, answer in zip(input_ids, is_answer)]
        return SupervisedSample(input_ids=input_ids, labels=labels)

    def get_collator(self) -> "SupervisedCollator":
        return SupervisedCollator(pad_token_id=self.pad_token_id)


@dataclass(frozen=True)
class SupervisedCollator:
    """Right-pads `input_ids` (pad id) and `labels` (IGNORE_INDEX); see `SupervisedBatch`."""

    pad_token_id: int

    def __call__(self, samples: Sequence[SupervisedSample]) -> SupervisedBatch:
        input_ids = [sample["input_ids"] for sample in samples]
        padded = right_pad(input_ids, self.pad_token_id)
        return SupervisedBatch(
            input_ids=to_tensor(padded),
            attention_mask=to_tensor(length_mask([len(ids) for ids in input_ids], padded.shape[1])),
            labels=to_tensor(right_pad([sample["labels"] for sample in samples], IGNORE_INDEX)),
        )
