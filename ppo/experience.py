"""Typed batches that flow between the PPO stages: prompts in, scored experience out.

`PromptBatch` is what the prompt-only collator feeds to the rollout; `Experience` is one rollout
after scoring and advantage estimation, i.e. everything an actor/critic update needs. Layout
(see `ppo.models.ppo_model_utils`): prompts left-padded to P, responses right-padded after EOS,
full length L = P + T, per-token fields of length L - 1 indexed by the predicting position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import paddle

from ppo.models.advantages import AdvantageEstimator, advantage_estimator
from ppo.models.ppo_model_utils import (
    KLEstimator,
    action_mask_from,
    kl_penalized_rewards,
    make_position_ids,
    masked_whiten,
    response_lengths,
)


def _to_bool_mask(mask: paddle.Tensor, name: str) -> paddle.Tensor:
    if mask.dtype == paddle.bool:
        return mask
    if mask.dtype not in (paddle.int32, paddle.int64, paddle.int8, paddle.uint8):
        raise TypeError(f"{name} must be a bool or 0/1 integer tensor, got dtype {mask.dtype}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0/1 values")
    return mask != 0


def _as_tensor(value: Any) -> paddle.Tensor:
    return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)


def _indices_tensor(indices: Sequence[int] | paddle.Tensor) -> paddle.Tensor:
    if isinstance(indices, paddle.Tensor):
        return indices.astype("int64").flatten()
    return paddle.to_tensor(list(indices), dtype="int64")


def _check_batch_indices(indices: paddle.Tensor, batch_size: int) -> None:
    if indices.shape[0] == 0:
        raise ValueError("cannot select an empty set of rows")
    if bool(((indices < 0) | (indices >= batch_size)).any()):
        raise IndexError(f"row indices must be in [0, {batch_size}), got {indices.tolist()}")


@dataclass
class PromptBatch:
    """Tokenised prompts ready for generation, left-padded to a common length P."""

    input_ids: paddle.Tensor  # [B, P] int64 prompt token ids, pad on the left
    attention_mask: paddle.Tensor  # [B, P] bool, True on real prompt tokens

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, P], got shape {list(self.input_ids.shape)}")
        if list(self.attention_mask.shape) != list(self.input_ids.shape):
            raise ValueError(
                f"attention_mask {list(self.attention_mask.shape)} must match input_ids "
                f"{list(self.input_ids.shape)}"
            )
        self.input_ids = self.input_ids.astype("int64")
        self.attention_mask = _to_bool_mask(self.attention_mask, "attention_mask")
        # Generation appends right after column P-1; a right-padded prompt would put pad tokens
        # between the prompt and its response and shift every response position.
        mask = self.attention_mask.astype("int64")
        if self.input_ids.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(
                "prompts must be left-padded (padding before the prompt, as the prompt-only "
                "collator does for generation); found a pad after a real token"
            )

    @classmethod
    def from_collated(cls, batch: Mapping[str, Any]) -> "PromptBatch":
        """From the prompt-only collator's dict with keys 'input_ids' and 'attention_mask'."""
        missing = [key for key in ("input_ids", "attention_mask") if key not in batch]
        if missing:
            raise KeyError(
                f"a collated prompt batch needs keys 'input_ids' and 'attention_mask'; missing "
                f"{missing} (got keys {sorted(batch)})"
            )
        return cls(
            input_ids=_as_tensor(batch["input_ids"]),
            attention_mask=_as_tensor(batch["attention_mask"]),
        )

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def position_ids(self) -> paddle.Tensor:  # [B, P] int64
        return make_position_ids(self.attention_mask)

    def __len__(self) -> int:
        return self.batch_size

    def repeat_interleave(self, repeats: int) -> "PromptBatch":
        """Each prompt repeated `repeats` times in a row ([p0, p0, p1, p1, ...]), so that
        `num_return_sequences` samples of the same prompt are neighbours."""
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats (num_return_sequences) must be an int >= 1, got {repeats!r}")
        if repeats == 1:
            return self
        # A row gather rather than paddle.repeat_interleave, whose CPU kernel rejects bool masks.
        rows = paddle.repeat_interleave(paddle.arange(self.batch_size, dtype="int64"), repeats)
        return PromptBatch(
            input_ids=paddle.gather(self.input_ids, rows, axis=0),
            attention_mask=paddle.gather(self.attention_mask, rows, axis=0),
        )

    def to(self, place: Any) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(place), self.attention_mask.to(place))


# Per-row tensor fields of Experience by their length along axis 1 (None = no axis 1).
_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")  # [B, L]
_PER_TOKEN_FIELDS = (  # [B, L-1]
    "action_mask",
    "old_log_probs",
    "reference_log_probs",
    "old_values",
    "rewards",
    "advantages",
    "returns",
)
_PER_SEQUENCE_FIELDS = ("reward_scores",)  # [B]


@dataclass
class Experience:
    """One scored rollout batch: everything an actor/critic update needs, fixed during updates.

    All tensors are detached on construction: they are targets and references for the update,
    and a stray graph link (e.g. old_log_probs computed with gradient) would let the loss
    backpropagate into its own targets.
    """

    input_ids: paddle.Tensor  # [B, L] int64 prompt (left-padded to P) + response (right-padded)
    attention_mask: paddle.Tensor  # [B, L] bool real prompt tokens + response through its EOS
    position_ids: paddle.Tensor  # [B, L] int64 0 at each row's first real token
    prompt_length: int  # P: the response starts at column P for every row
    action_mask: paddle.Tensor  # [B, L-1] bool position t predicts a response token t+1
    old_log_probs: paddle.Tensor  # [B, L-1] f32 actor log p(input_ids[t+1]) at rollout time
    reference_log_probs: paddle.Tensor  # [B, L-1] f32 same under the frozen reference model
    old_values: paddle.Tensor  # [B, L-1] f32 critic value at position t at rollout time
    rewards: paddle.Tensor  # [B, L-1] f32 KL penalty + clipped score at the last action position
    advantages: paddle.Tensor  # [B, L-1] f32 GAE advantages (0 outside action_mask)
    returns: paddle.Tensor  # [B, L-1] f32 value targets A + V (0 outside action_mask)
    reward_scores: paddle.Tensor  # [B] f32 reward-model end scores used (before clipping)

    # Tensor fields by their shape; subclasses with more fields extend these.
    SEQUENCE_FIELDS: ClassVar[tuple] = _SEQUENCE_FIELDS
    PER_TOKEN_FIELDS: ClassVar[tuple] = _PER_TOKEN_FIELDS
    PER_SEQUENCE_FIELDS: ClassVar[tuple] = _PER_SEQUENCE_FIELDS

    @classmethod
    def tensor_fields(cls) -> tuple:
        return cls.SEQUENCE_FIELDS + cls.PER_TOKEN_FIELDS + cls.PER_SEQUENCE_FIELDS

    def __post_init__(self) -> None:
        for name in self.tensor_fields():
            value = getattr(self, name)
            if not isinstance(value, paddle.Tensor):
                raise TypeError(f"Experience.{name} must be a paddle.Tensor, got {type(value)}")
            setattr(self, name, value.detach())
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {list(self.input_ids.shape)}")
        batch_size, sequence_length = self.input_ids.shape
        expected = {
            **{name: [batch_size, sequence_length] for name in self.SEQUENCE_FIELDS},
            **{name: [batch_size, sequence_length - 1] for name in self.PER_TOKEN_FIELDS},
            **{name: [batch_size] for name in self.PER_SEQUENCE_FIELDS},
        }
        wrong = [
            f"{name} {list(getattr(self, name).shape)} (expected {shape})"
            for name, shape in expected.items()
            if list(getattr(self, name).shape) != shape
        ]
        if wrong:
            raise ValueError(
                f"Experience with input_ids [B={batch_size}, L={sequence_length}] has "
                f"mismatched fields: {'; '.join(wrong)}"
            )
        for name in ("attention_mask", "action_mask"):
            if getattr(self, name).dtype != paddle.bool:
                raise TypeError(f"Experience.{name} must be bool, got {getattr(self, name).dtype}")
        if not isinstance(self.prompt_length, int) or not 1 <= self.prompt_length <= sequence_length:
            raise ValueError(
                f"prompt_length must be an int in [1, L={sequence_length}], got {self.prompt_length!r}"
            )

    # ---------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        input_ids: paddle.Tensor,  # [B, L]
        attention_mask: paddle.Tensor,  # [B, L] bool or 0/1
        prompt_length: int,
        old_log_probs: paddle.Tensor,  # [B, L-1]
        reference_log_probs: paddle.Tensor | None,  # [B, L-1]; None: no reference (KL = 0)
        old_values: paddle.Tensor | None,  # [B, L-1]; None: no critic (stored as zeros)
        reward_scores: paddle.Tensor,  # [B]
        *,
        kl_coeff: float,
        clip_range_score: float,
        gamma: float,
        gae_lambda: float,
        kl_estimator: str | KLEstimator = KLEstimator.K1,
        whiten_advantages: bool = False,
        rl_algorithm: str | AdvantageEstimator = AdvantageEstimator.PPO,
        group_size: int = 1,
        normalize_advantage_std: bool = True,
        whiten: Callable = masked_whiten,
    ) -> "Experience":
        """Derive position ids, action mask, KL-penalised rewards and the advantages/returns of
        `rl_algorithm`'s registered estimator (GAE for ppo, see `ppo.models.advantages`) from a
        scored rollout. ``group_size``: responses per prompt, prompt-major rows (grpo/rloo);
        ``whiten``: the batch whitening of estimators that whiten (reinforce_plus_plus).
        With ``whiten_advantages`` the advantages are whitened over the batch's action tokens
        after the returns are computed (returns keep the raw advantages).
        """
        estimator = advantage_estimator(rl_algorithm)
        attention_mask = _to_bool_mask(attention_mask, "attention_mask")
        action_mask = action_mask_from(attention_mask, prompt_length)
        if reference_log_probs is None:
            reference_log_probs = old_log_probs
        if old_values is None:
            if estimator.needs_critic:
                raise ValueError(f"rl_algorithm={rl_algorithm!r} needs the critic's old_values")
            old_values = paddle.zeros_like(old_log_probs, dtype="float32")
        rewards = kl_penalized_rewards(
            reward_scores.astype("float32"),
            old_log_probs,
            reference_log_probs,
            action_mask,
            kl_coeff=kl_coeff,
            clip_range_score=clip_range_score,
            kl_estimator=kl_estimator,
        )
        advantages, returns = estimator.compute(
            rewards, old_values, action_mask, gamma=gamma, gae_lambda=gae_lambda,
            group_size=group_size, normalize_std=normalize_advantage_std, whiten=whiten,
        )  # fmt: skip
        if whiten_advantages:
            advantages = masked_whiten(advantages, action_mask)
        return cls(
            input_ids=input_ids.astype("int64"),
            attention_mask=attention_mask,
            position_ids=make_position_ids(attention_mask),
            prompt_length=prompt_length,
            action_mask=action_mask,
            old_log_probs=old_log_probs.astype("float32"),
            reference_log_probs=reference_log_probs.astype("float32"),
            old_values=old_values.astype("float32"),
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            reward_scores=reward_scores.astype("float32"),
        )

    # ---------------------------------------------------------------- views

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sequence_length(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def prompt_input_ids(self) -> paddle.Tensor:  # [B, P]
        return self.input_ids[:, : self.prompt_length]

    @property
    def response_input_ids(self) -> paddle.Tensor:  # [B, L-P] pad after EOS
        return self.input_ids[:, self.prompt_length :]

    @property
    def response_lengths(self) -> paddle.Tensor:  # [B] int64, EOS included
        return response_lengths(self.action_mask)

    def num_action_tokens(self) -> int:
        """Number of response tokens in the batch (EOS included), the token-mean denominator."""
        return int(self.action_mask.astype("int64").sum())

    # ---------------------------------------------------------------- batch operations

    def _map_tensors(self, fn) -> "Experience":
        return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in self.tensor_fields()})

    def select(self, indices: Sequence[int] | paddle.Tensor) -> "Experience":
        """Rows `indices` in that order (e.g. a permutation to shuffle between update_iters)."""
        index = _indices_tensor(indices)
        _check_batch_indices(index, self.batch_size)
        return self._map_tensors(lambda tensor: paddle.gather(tensor, index, axis=0))

    def split(self, micro_batch_size: int) -> list["Experience"]:
        """Consecutive micro-batches of `micro_batch_size` rows; the last one holds the remainder
        when the batch size is not a multiple."""
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
        return [
            self._map_tensors(lambda tensor, start=start: tensor[start : start + micro_batch_size])
            for start in range(0, self.batch_size, micro_batch_size)
        ]

    @classmethod
    def concat(
        cls, experiences: Sequence["Experience"], pad_token_id: int | None = None
    ) -> "Experience":
        """Stack batches along rows. They must share `prompt_length`; shorter sequences are
        right-padded to the longest (input_ids with `pad_token_id`, masks False, per-token values
        0, position ids repeating the last position), so `pad_token_id` is required only when the
        lengths differ."""
        if not experiences:
            raise ValueError("Experience.concat needs at least one Experience")
        prompt_lengths = {experience.prompt_length for experience in experiences}
        if len(prompt_lengths) > 1:
            raise ValueError(
                f"cannot concat experiences with different prompt_length {sorted(prompt_lengths)}: "
                "roll out prompts padded to one length, or keep the batches separate"
            )
        longest = max(experience.sequence_length for experience in experiences)
        if pad_token_id is None and any(e.sequence_length != longest for e in experiences):
            raise ValueError(
                "experiences have different sequence lengths "
                f"{sorted({e.sequence_length for e in experiences})}; pass pad_token_id to "
                "right-pad them"
            )
        padded = [experience._right_pad(longest, pad_token_id) for experience in experiences]
        return dataclasses.replace(
            padded[0],
            **{
                name: paddle.concat([getattr(e, name) for e in padded], axis=0)
                for name in cls.tensor_fields()
            },
        )

    def _right_pad(self, sequence_length: int, pad_token_id: int | None) -> "Experience":
        extra = sequence_length - self.sequence_length
        if extra == 0:
            return self

        def pad_columns(tensor: paddle.Tensor, value) -> paddle.Tensor:
            filler = paddle.full([tensor.shape[0], extra], value, dtype=tensor.dtype)
            return paddle.concat([tensor, filler], axis=1)

        last_positions = self.position_ids[:, -1:]
        updates = {
            "input_ids": pad_columns(self.input_ids, pad_token_id),
            "attention_mask": pad_columns(self.attention_mask, False),
            "position_ids": paddle.concat(
                [self.position_ids, last_positions.expand([self.batch_size, extra])], axis=1
            ),
        }
        # action_mask is bool, so its 0 filler is False.
        updates.update({name: pad_columns(getattr(self, name), 0) for name in self.PER_TOKEN_FIELDS})
        return dataclasses.replace(self, **updates)

    def to(self, place: Any) -> "Experience":
        """The same experience with every tensor on `place` (e.g. "cpu" to offload)."""
        return self._map_tensors(lambda tensor: tensor.to(place))
