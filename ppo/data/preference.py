"""Preference pairs for reward-model training: (input, better answer, worse answer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, TypedDict, Union

import paddle

from ppo.data.base import RawSample
from ppo.data.tokenized import Skip, TokenizedDataset, length_mask, right_pad, to_tensor


class PreferenceSample(TypedDict):
    better_input_ids: list[int]  # [L_b]  prompt + better answer + end-of-turn token (EOS for safe-rlhf)
    worse_input_ids: list[int]  # [L_w]  prompt + worse answer + end-of-turn token


class PreferenceBatch(TypedDict):
    better_input_ids: paddle.Tensor  # [B, L] int64, right-padded with the pad id
    better_attention_mask: paddle.Tensor  # [B, L] int64, 1 on real tokens (EOS included)
    worse_input_ids: paddle.Tensor  # [B, L] int64, same L as better
    worse_attention_mask: paddle.Tensor  # [B, L] int64


class PreferenceDataset(TokenizedDataset):
    """Pairs from (input, answer, other_answer, better): `better` says whether `answer` is the
    preferred one.

    The prompt is fitted into `max_prompt_length` by `prompt_truncation` (see `TokenizedDataset`),
    then each sequence is truncated to `max_length`. A pair is skipped (one `DataWarning` counts
    them; an error if all are skipped) when its prompt is left out, or when the two sequences are
    identical after tokenisation and truncation (no preference to learn).
    """

    REQUIRED_FIELDS = (("input", "answer", "other_answer", "better"),)

    def preprocess(self, sample: RawSample) -> Union[PreferenceSample, Skip]:
        better, worse = (
            (sample["answer"], sample["other_answer"]) if sample["better"] else (sample["other_answer"], sample["answer"])
        )
        pair = encode_pair(self, sample["input"], better, worse, self.system_of(sample))
        if isinstance(pair, Skip):
            return pair
        return PreferenceSample(better_input_ids=pair[0], worse_input_ids=pair[1])

    def get_collator(self) -> "PreferenceCollator":
        return PreferenceCollator(pad_token_id=self.pad_token_id)


def encode_pair(
    dataset: TokenizedDataset, input, first: str, second: str, system: Optional[str] = None
) -> Union[tuple[list[int], list[int]], Skip]:
    """Truncated ids of prompt + `first` and prompt + `second` (the prompt fitted into the
    dataset's prompt budget), or a Skip with the reason."""
    fitted = dataset.fit_prompt(input, system)
    if isinstance(fitted, Skip):
        return fitted
    first_ids = dataset.encode_turns(fitted.turns + [first], system).input_ids[: dataset.max_length]
    second_ids = dataset.encode_turns(fitted.turns + [second], system).input_ids[: dataset.max_length]
    if first_ids == second_ids:
        return Skip("both answers give identical token ids (after truncation)")
    return first_ids, second_ids


def pad_pair(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]], pad_token_id: int):
    """Right-pad two lists of sequences to ONE common length: ids and masks, each [B, L]."""
    length = max(len(ids) for ids in list(first) + list(second))
    return (
        to_tensor(right_pad(first, pad_token_id, length)),
        to_tensor(length_mask([len(ids) for ids in first], length)),
        to_tensor(right_pad(second, pad_token_id, length)),
        to_tensor(length_mask([len(ids) for ids in second], length)),
    )


@dataclass(frozen=True)
class PreferenceCollator:
    """Right-pads better and worse sequences to one common length; see `PreferenceBatch`."""

    pad_token_id: int

    def __call__(self, samples: Sequence[PreferenceSample]) -> PreferenceBatch:
        better_ids, better_mask, worse_ids, worse_mask = pad_pair(
            [sample["better_input_ids"] for sample in samples],
            [sample["worse_input_ids"] for sample in samples],
            self.pad_token_id,
        )
        return PreferenceBatch(
            better_input_ids=better_ids,
            better_attention_mask=better_mask,
            worse_input_ids=worse_ids,
            worse_attention_mask=worse_mask,
        )
