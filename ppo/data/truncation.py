"""Fitting a prompt into a token budget (`max_prompt_length`, `prompt_truncation`).

A prompt is shortened from the left, because the end of a conversation is what the answer replies
to. The template's framing — the BOS or other special prefix, the system message, the role tags —
is never cut: only the conversation's own text is. Three policies (`PromptTruncation`):

- "left_turns": drop the oldest (user, assistant) turn pairs until the prompt fits; if the last
  user turn alone is still too long, cut tokens from its start.
- "left_tokens": cut tokens from the start of the conversation: from the first user turn, and a
  pair whose user turn is used up goes with its answer (a conversation must open with a user turn).
- "drop": leave the sample out (the behaviour without these keys).

A prompt that does not fit even so (the framing alone is over the budget) is left out; the
datasets count what was shortened and what was left out and warn once with the first row of each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ppo.data.templates import PromptTemplate
from ppo.tokenizer_io import decode

_REPLACEMENT_CHARACTER = "\ufffd"  # what decoding half of a multi-byte character gives


class PromptTruncation(str, enum.Enum):
    LEFT_TURNS = "left_turns"
    LEFT_TOKENS = "left_tokens"
    DROP = "drop"


DEFAULT_PROMPT_TRUNCATION = PromptTruncation.DROP.value


def check_prompt_truncation(value) -> PromptTruncation:
    """The policy named by the `prompt_truncation` key, or an error listing the valid names."""
    try:
        return PromptTruncation(value)
    except ValueError:
        valid = ", ".join(repr(policy.value) for policy in PromptTruncation)
        raise ValueError(f"prompt_truncation must be one of {valid}, got {value!r}") from None


def check_max_prompt_length(max_prompt_length: Optional[int], largest: int, why: str) -> None:
    """`max_prompt_length` is None or an integer in [1, largest]; `why` explains the upper bound."""
    if max_prompt_length is None:
        return
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive integer or null, got {max_prompt_length!r}")
    if max_prompt_length > largest:
        raise ValueError(f"max_prompt_length={max_prompt_length} is too large: {why}")


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt within the budget: its (possibly shortened) turns, their ids, and how it was
    shortened (None: untouched)."""

    turns: list[str]
    input_ids: list[int]  # [P]  P <= limit
    shortened: Optional[str] = None


@dataclass(frozen=True)
class Unfit:
    """A prompt left out, with the reason (for the dataset's counted warning)."""

    reason: str


class PromptFitter:
    """Fits prompts rendered by `template` into `limit` tokens with `policy`.

    `too_long` is how a left-out prompt is described under "drop" (each dataset words it after
    the key that set the limit, e.g. "prompt longer than max_prompt_length=128 tokens").
    """

    EARLIER_TURNS = "earlier turns dropped"
    LEFT_TOKENS = "tokens cut from the left"

    def __init__(self, template: PromptTemplate, limit: int, policy: Union[str, PromptTruncation], too_long: str) -> None:
        if limit < 1:
            raise ValueError(f"a prompt budget must be at least 1 token, got {limit}")
        self.template = template
        self.limit = limit
        self.policy = check_prompt_truncation(policy)
        self.too_long = too_long

    def fit(self, turns: Sequence[str], system: Optional[str] = None) -> Union[FittedPrompt, Unfit]:
        turns = list(turns)
        ids = self.template.encode_prompt(turns, system)
        if len(ids) <= self.limit:
            return FittedPrompt(turns, ids)
        if self.policy is PromptTruncation.DROP:
            return Unfit(self.too_long)
        if self.policy is PromptTruncation.LEFT_TURNS:
            while len(turns) > 1:
                turns = turns[2:]
                ids = self.template.encode_prompt(turns, system)
                if len(ids) <= self.limit:
                    return FittedPrompt(turns, ids, self.EARLIER_TURNS)
        return self._cut_tokens(turns, system)

    def _cut_tokens(self, turns: list[str], system: Optional[str]) -> Union[FittedPrompt, Unfit]:
        while True:
            overflow = len(self.template.encode_prompt(turns, system)) - self.limit
            first = self.template.encode_text(turns[0])
            # The cut text is re-encoded inside the template, where it may take a token more
            # (a word that lost its start); cutting from the original ids only ever grows the cut.
            cut = overflow
            while cut < len(first):
                kept = self._text_of(first[cut:])
                if not kept:
                    break  # only whitespace is left, and cutting more leaves less
                candidate = [kept] + turns[1:]
                ids = self.template.encode_prompt(candidate, system)
                if len(ids) <= self.limit:
                    return FittedPrompt(candidate, ids, self.LEFT_TOKENS)
                cut += len(ids) - self.limit
            if len(turns) == 1:
                framing = len(self.template.encode_prompt([_REPLACEMENT_CHARACTER], system))
                return Unfit(
                    f"prompt cannot fit in {self.limit} tokens even after truncation (the template's framing alone "
                    f"takes about {framing})"
                )
            turns = turns[2:]  # the first user turn is used up: its answer goes with it
            ids = self.template.encode_prompt(turns, system)
            if len(ids) <= self.limit:
                return FittedPrompt(turns, ids, self.LEFT_TOKENS)

    def _text_of(self, ids: Sequence[int]) -> str:
        # A cut inside a multi-byte character leaves a replacement character at the start.
        return decode(self.template.tokenizer, ids, skip_special_tokens=True).lstrip(_REPLACEMENT_CHARACTER).strip()
