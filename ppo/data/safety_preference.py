"""Safety preference pairs for cost-model training: (input, safer answer, unsafer answer) with
each answer's own safe/unsafe label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypedDict, Union

import numpy as np
import paddle

from ppo.data.base import RawSample
from ppo.data.preference import encode_pair, pad_pair
from ppo.data.tokenized import InvalidSample, Skip, TokenizedDataset, to_tensor


class SafetyPreferenceSample(TypedDict):
    safer_input_ids: list[int]  # [L_s]  prompt + safer answer + EOS
    safer_sign: int  # +1 if the safer answer is safe, -1 if it is unsafe
    unsafer_input_ids: list[int]  # [L_u]  prompt + less safe answer + EOS
    unsafer_sign: int  # +1 if the less safe answer is safe, -1 if it is unsafe


class SafetyPreferenceBatch(TypedDict):
    safer_input_ids: paddle.Tensor  # [B, L] int64, right-padded with the pad id
    safer_attention_mask: paddle.Tensor  # [B, L] int64, 1 on real tokens (EOS included)
    safer_safety_sign: paddle.Tensor  # [B] int64, +1 safe / -1 unsafe
    unsafer_input_ids: paddle.Tensor  # [B, L] int64, same L as safer
    unsafer_attention_mask: paddle.Tensor  # [B, L] int64
    unsafer_safety_sign: paddle.Tensor  # [B] int64, +1 safe / -1 unsafe


class SafetyPreferenceDataset(TokenizedDataset):
    """Pairs from (input, answer, other_answer, safer, is_safe, is_other_safe) (safe-rlhf layout).

    A row whose safer answer is labelled unsafe while the other one is labelled safe contradicts
    itself and raises an error naming it. Truncation and skipping work as in `PreferenceDataset`.
    """

    REQUIRED_FIELDS = (("input", "answer", "other_answer", "safer", "is_safe", "is_other_safe"),)

    def preprocess(self, sample: RawSample) -> Union[SafetyPreferenceSample, Skip]:
        answers = [(sample["answer"], sample["is_safe"]), (sample["other_answer"], sample["is_other_safe"])]
        (safer, safer_is_safe), (unsafer, unsafer_is_safe) = answers if sample["safer"] else answers[::-1]
        if unsafer_is_safe and not safer_is_safe:
            raise InvalidSample(
                "safer",
                f"is {sample['safer']}, but that answer is labelled unsafe while the other answer is labelled safe",
            )
        pair = encode_pair(self, sample["input"], safer, unsafer, self.system_of(sample))
        if isinstance(pair, Skip):
            return pair
        return SafetyPreferenceSample(
            safer_input_ids=pair[0],
            safer_sign=1 if safer_is_safe else -1,
            unsafer_input_ids=pair[1],
            unsafer_sign=1 if unsafer_is_safe else -1,
        )

    def get_collator(self) -> "SafetyPreferenceCollator":
        return SafetyPreferenceCollator(pad_token_id=self.pad_token_id)


@dataclass(frozen=True)
class SafetyPreferenceCollator:
    """Right-pads safer and unsafer sequences to one common length; see `SafetyPreferenceBatch`."""

    pad_token_id: int

    def __call__(self, samples: Sequence[SafetyPreferenceSample]) -> SafetyPreferenceBatch:
        safer_ids, safer_mask, unsafer_ids, unsafer_mask = pad_pair(
            [sample["safer_input_ids"] for sample in samples],
            [sample["unsafer_input_ids"] for sample in samples],
            self.pad_token_id,
        )
        return SafetyPreferenceBatch(
            safer_input_ids=safer_ids,
            safer_attention_mask=safer_mask,
            safer_safety_sign=to_tensor(np.array([sample["safer_sign"] for sample in samples])),
            unsafer_input_ids=unsafer_ids,
            unsafer_attention_mask=unsafer_mask,
            unsafer_safety_sign=to_tensor(np.array([sample["unsafer_sign"] for sample in samples])),
        )
