"""Pure PPO math: no trainer state, every function takes tensors and returns tensors.

Layout used throughout (one rollout batch):

- ``input_ids`` [B, L] = left-padded prompt of length P followed by a right-padded response of
  length T = L - P; ``attention_mask`` [B, L] is True on real prompt tokens and on response tokens
  up to and including EOS. Pad may equal EOS, so masks never come from comparing token ids.
- Per-token quantities have length L - 1 and are indexed by the position that *predicts* the next
  token: ``log_probs[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``.
  ``action_mask`` [B, L-1] is True where token t + 1 is a response token. Critic values
  [B, L-1] are the critic's scores at positions 0 .. L-2.

Conventions of this module:

- Masks are bool (integer 0/1 masks are accepted and converted).
- Arithmetic runs in float32 whatever the input dtype (bf16/fp16 logits or values are upcast), so
  results are float32.
- Every masked reduction names its reduction and returns 0 (never NaN) when nothing is selected.
- Reward, advantage and diagnostic functions run without gradient: they produce fixed targets or
  numbers to log. Only the losses and ``gather_log_probs`` / ``token_entropy`` keep the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, Sequence, TypeVar, Union

import paddle

from ppo.data.base import IGNORE_INDEX
from ppo.models import cpu_fused

# Upper bound on elements of one float32 [rows, L, V] working chunk in the vocabulary-wide
# reductions (64 Mi elements = 256 MiB). Long sequences times a 100k+ vocabulary would otherwise
# materialise several full-size float32 temporaries at once.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 26

_EnumT = TypeVar("_EnumT", bound=Enum)


def _parse_choice(enum_cls: type[_EnumT], value: str | _EnumT, what: str) -> _EnumT:
    """Turn a user-facing name into an enum member, or explain the valid names."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; valid choices are {valid}") from None


def _check_same_shape(**tensors: paddle.Tensor) -> None:
    """Refuse silent broadcasting between per-token tensors that must line up one-to-one."""
    shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {described} must all have the same shape")


def _as_bool(mask: paddle.Tensor) -> paddle.Tensor:
    return mask if mask.dtype == paddle.bool else mask != 0


def as_float32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else x.astype("float32")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_unit_interval(**values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


# --------------------------------------------------------------------------------------------
# Positions and masks
# --------------------------------------------------------------------------------------------


def make_position_ids(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """Position ids that start at 0 on the first real token of every row.

    With left-padded prompts the default `arange` positions would shift every real token by the
    row's padding, so rollout, log-prob recomputation and scoring all pass these instead.

    attention_mask: [B, L] (1/True = real token) -> [B, L] int64
    """
    mask = attention_mask.astype("int64")
    return paddle.clip(paddle.cumsum(mask, axis=-1) - 1, min=0)


def action_mask_from(
    attention_mask: paddle.Tensor,  # [B, L] bool (True = real token)
    prompt_length: int,
) -> paddle.Tensor:  # [B, L-1] bool
    """Which next-token predictions produce a response token.

    ``action_mask[:, t] = (t + 1 >= prompt_length) and attention_mask[:, t + 1]``: position t
    predicts token t + 1, which is an action when it lies in the response part and is real (EOS
    included, trailing pad excluded).
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, L], got shape {list(attention_mask.shape)}")
    sequence_length = attention_mask.shape[1]
    if not 1 <= prompt_length <= sequence_length:
        raise ValueError(
            f"prompt_length must be in [1, L={sequence_length}] (a prompt has at least one "
            f"token to predict from), got {prompt_length}"
        )
    next_token_is_real = _as_bool(attention_mask[:, 1:])
    is_response_column = paddle.arange(1, sequence_length, dtype="int64") >= prompt_length  # [L-1]
    return paddle.logical_and(next_token_is_real, is_response_column.unsqueeze(0))


@dataclass(frozen=True)
class ResponseWindow:
    """The columns a batch's response needs: its longest response, not the rollout's.

    Responses start at column P and are right-padded, so with W = the longest response among
    these rows (at least 1), the inputs [:, :P+W] carry every response token and, by causality,
    give the same outputs on them as the full width; per-token quantities live at columns
    [P-1, P-1+W) of the [B, L-1] layout.
    """

    prompt_length: int  # P
    width: int  # W
    per_token_width: int  # L - 1 of the full layout

    @classmethod
    def of(cls, attention_mask: paddle.Tensor, prompt_length: int) -> "ResponseWindow":
        sequence_length = attention_mask.shape[1]
        if not 1 <= prompt_length < sequence_length:
            raise ValueError(
                f"a response window needs 1 <= prompt_length < L={sequence_length}, got prompt_length {prompt_length}"
            )
        lengths = attention_mask[:, prompt_length:].astype("int64").sum(axis=-1)
        longest = int(lengths.max()) if lengths.shape[0] > 0 else 0
        return cls(prompt_length, max(1, longest), sequence_length - 1)

    @property
    def start(self) -> int:  # first per-token column: the position that predicts token P
        return self.prompt_length - 1

    @property
    def end(self) -> int:
        return self.start + self.width

    def inputs(self, sequence: paddle.Tensor) -> paddle.Tensor:  # [B, L] -> [B, P+W]
        return sequence[:, : self.prompt_length + self.width]

    def tokens(self, per_token: paddle.Tensor) -> paddle.Tensor:  # [B, L-1] -> [B, W]
        return per_token[:, self.start : self.end]

    def labels(self, input_ids: paddle.Tensor) -> paddle.Tensor:  # [B, L] -> [B, W]: the tokens predicted
        return input_ids[:, self.prompt_length : self.prompt_length + self.width]

    def to_full(self, values: paddle.Tensor) -> paddle.Tensor:  # [B, W] -> [B, L-1], 0 outside
        rows = values.shape[0]
        left = paddle.zeros([rows, self.start], dtype=values.dtype)
        right = paddle.zeros([rows, self.per_token_width - self.end], dtype=values.dtype)
        return paddle.concat([left, values, right], axis=1)


def generated_tokens_mask(
    response_ids: paddle.Tensor,  # [B, T] tokens produced by generation, right-padded
    eos_token_id: Union[int, Sequence[int]],
) -> paddle.Tensor:  # [B, T] bool
    """True on generated tokens up to and including each row's first EOS (all True if the row
    never emitted EOS, i.e. it hit the length limit). `eos_token_id` may list several stop tokens
    (a chat template's end-of-turn token and EOS): the first of any of them ends the row.

    Only the *first* EOS matters: whatever follows it is padding, even when pad == eos, so this
    never confuses the EOS with padding the way comparing ids to the pad id would.
    """
    if response_ids.ndim != 2:
        raise ValueError(f"response_ids must be [B, T], got shape {list(response_ids.shape)}")
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stop_ids = paddle.to_tensor(stops, dtype=response_ids.dtype)  # [S]
    is_eos = (response_ids.unsqueeze(-1) == stop_ids).any(axis=-1).astype("int64")
    eos_seen_before = (paddle.cumsum(is_eos, axis=-1) - is_eos) > 0
    return paddle.logical_not(eos_seen_before)


def response_lengths(action_mask: paddle.Tensor) -> paddle.Tensor:  # [B, T] -> [B] int64
    """Number of generated tokens per row, EOS included."""
    return _as_bool(action_mask).astype("int64").sum(axis=-1)


def last_action_indices(action_mask: paddle.Tensor) -> paddle.Tensor:  # [B, T] -> [B] int64
    """Column of each row's last action position (its EOS, or the last token when generation hit
    the length limit); -1 for a row with no action position."""
    mask = _as_bool(action_mask)
    if mask.shape[-1] == 0:
        return paddle.full(mask.shape[:-1], -1, dtype="int64")
    columns = paddle.arange(mask.shape[-1], dtype="int64").unsqueeze(0).expand(mask.shape)
    return paddle.where(mask, columns, paddle.full_like(columns, -1)).max(axis=-1)


def _check_contiguous_rows(action_mask: paddle.Tensor) -> None:
    """GAE's terminal handling assumes one unbroken run of action positions per row."""
    mask = _as_bool(action_mask).astype("int64")
    if mask.shape[-1] == 0:
        return
    run_starts = paddle.clip(mask[:, 1:] - mask[:, :-1], min=0).sum(axis=-1) + mask[:, 0]
    if bool((run_starts > 1).any()):
        bad_rows = paddle.nonzero(run_starts > 1).flatten().tolist()
        raise ValueError(
            "action_mask must hold one contiguous run of action positions per row (a response "
            f"cannot restart after it ended); rows {bad_rows} have gaps"
        )


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------


class Reduction(str, Enum):
    """How a per-token quantity is reduced to a scalar.

    TOKEN_MEAN: every valid token weighs the same (long responses weigh more in the batch).
    SEQ_MEAN_TOKEN_MEAN: mean over sequences of each sequence's token mean (every sequence weighs
    the same); sequences with no valid token are left out of the outer mean.
    TOKEN_SUM: the sum over valid tokens; the trainer divides it by the token count of the whole
    optimizer step (all micro-batches, all ranks) to get the global token mean.
    """

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    TOKEN_SUM = "token-sum"


def masked_sum(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
    axis: int | None = None,
) -> paddle.Tensor:  # scalar, or x reduced over `axis`
    """sum(x[mask]) (over `axis`, or everything). Invalid entries are replaced, not multiplied,
    so a NaN/inf outside the mask cannot leak into the result."""
    _check_same_shape(x=x, mask=mask)
    selected = paddle.where(_as_bool(mask), as_float32(x), paddle.zeros([], dtype="float32"))
    return selected.sum() if axis is None else selected.sum(axis=axis)


def per_sequence_mean(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
) -> paddle.Tensor:  # [B]
    """Row-wise ``sum_t(x·m) / max(sum_t m, 1)``: 0 for a row with no valid token."""
    counts = _as_bool(mask).astype("float32").sum(axis=-1)
    return masked_sum(x, mask, axis=-1) / paddle.clip(counts, min=1.0)


def masked_mean(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
    reduction: str | Reduction = Reduction.TOKEN_MEAN,
) -> paddle.Tensor:  # scalar float32
    """Mean of x over the mask with a named reduction (see `Reduction`).

    token-mean:          sum(x·m) / max(sum(m), 1)
    seq-mean-token-mean: sum_b[n_b > 0]·mean_b / max(#{b: n_b > 0}, 1),
                         mean_b = sum_t(x·m)_b / n_b, n_b = sum_t m_b
    token-sum:           sum(x·m)
    All are 0 when the mask selects nothing.
    """
    reduction = _parse_choice(Reduction, reduction, "reduction")
    if reduction is Reduction.TOKEN_SUM:
        return masked_sum(x, mask)
    if reduction is Reduction.TOKEN_MEAN:
        count = _as_bool(mask).astype("float32").sum()
        return masked_sum(x, mask) / paddle.clip(count, min=1.0)
    if x.ndim != 2:
        raise ValueError(f"{reduction.value!r} needs [B, T] inputs, got shape {list(x.shape)}")
    row_has_tokens = _as_bool(mask).any(axis=-1)
    row_means = per_sequence_mean(x, mask)
    num_rows = row_has_tokens.astype("float32").sum()
    return masked_sum(row_means, row_has_tokens) / paddle.clip(num_rows, min=1.0)


def masked_variance(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
) -> paddle.Tensor:  # scalar float32
    """Population variance over the valid tokens: token-mean((x - token-mean(x))²); 0 if empty."""
    mean = masked_mean(x, mask)
    return masked_mean(paddle.square(as_float32(x) - mean), mask)


def masked_whiten(
    x: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> paddle.Tensor:  # [B, T] float32
    """(x - μ) / sqrt(σ² + eps) over the valid tokens (μ, σ² = token mean and population
    variance); with ``shift_mean=False`` μ is added back so only the scale changes.
    Invalid positions are 0; an empty mask gives all zeros."""
    values = as_float32(x)
    mean = masked_mean(values, mask)
    variance = masked_variance(values, mask)
    whitened = (values - mean) * paddle.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return paddle.where(_as_bool(mask), whitened, paddle.zeros([], dtype="float32"))


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# --------------------------------------------------------------------------------------------


def _row_chunks(logits: paddle.Tensor, max_chunk_elements: int) -> Iterator[slice]:
    """Batch-row slices whose [rows, L, V] float32 working copy fits in the element budget."""
    if max_chunk_elements <= 0:
        raise ValueError(f"max_chunk_elements must be > 0, got {max_chunk_elements}")
    batch_size = logits.shape[0]
    elements_per_row = max(1, math.prod(logits.shape[1:]))
    rows = max(1, min(batch_size, max_chunk_elements // elements_per_row))
    for start in range(0, batch_size, rows):
        yield slice(start, min(start + rows, batch_size))


def gather_log_probs(
    logits: paddle.Tensor,  # [B, L, V] any float dtype
    labels: paddle.Tensor,  # [B, L] int token ids in [0, V)
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> paddle.Tensor:  # [B, L] float32
    """log softmax(logits)[labels] = logits[labels] - logsumexp(logits), in float32.

    No shift happens here: pass ``logits[:, :-1]`` with ``input_ids[:, 1:]`` for next-token
    log-probs. Computed as minus Paddle's fused softmax cross-entropy: one kernel forward, and a
    backward of (softmax - one-hot) in one pass, ~7x faster at a 49k vocabulary than
    take_along_axis - logsumexp (whose backward materialises several [B, L, V] temporaries) and
    closer to a float64 reference (1e-5 instead of 1e-4 at |logits| ~ 10). Rows are processed in
    chunks so that the float32 upcast never exceeds ``max_chunk_elements`` at once (without
    gradient the chunks are freed one by one). Gradients flow back to the logits.
    """
    if logits.ndim != 3 or list(labels.shape) != list(logits.shape[:2]):
        raise ValueError(
            f"expected logits [B, L, V] and labels [B, L]; got logits {list(logits.shape)} "
            f"and labels {list(labels.shape)}"
        )
    labels = labels.astype("int64")
    if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise ValueError(f"labels must be token ids in [0, {logits.shape[-1]}), got [{int(labels.min())}, {int(labels.max())}]")
    whole, pieces = slice(0, logits.shape[0]), []
    for rows in _row_chunks(logits, max_chunk_elements):
        # Slicing the whole batch would copy the logits (and, backward, their gradient) for nothing.
        chunk, target = (logits, labels) if rows == whole else (logits[rows], labels[rows])
        nll = paddle.nn.functional.cross_entropy(as_float32(chunk), target.unsqueeze(-1), reduction="none", axis=-1)
        pieces.append(-nll.reshape(target.shape))
    return pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=0)


def token_entropy(
    logits: paddle.Tensor,  # [B, T, V] any float dtype
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> paddle.Tensor:  # [B, T] float32
    """H_t = -Σ_v p_v log p_v = logsumexp(z) - Σ_v softmax(z)_v z_v, in float32, chunked by rows.

    logsumexp(z) is taken from the softmax already computed: at the arg-max, p_max = exp(max(z) -
    logsumexp(z)), so logsumexp(z) = max(z) - log(p_max), exact, with p_max ≥ 1/V far from
    underflow. Two cheap reductions instead of Paddle's CPU logsumexp kernel (10 ms at [8, 64,
    1000], as long as the softmax and both sums together)."""
    if logits.ndim != 3:
        raise ValueError(f"expected logits [B, T, V], got shape {list(logits.shape)}")
    if (not paddle.is_grad_enabled() or logits.stop_gradient) and cpu_fused.applicable(logits):
        # One C++ pass per row, no [B, T, V] temporaries (the logged metric needs no gradient).
        return cpu_fused.token_entropy(logits)
    whole, pieces = slice(0, logits.shape[0]), []
    for rows in _row_chunks(logits, max_chunk_elements):
        chunk = as_float32(logits if rows == whole else logits[rows])
        probs = paddle.nn.functional.softmax(chunk, axis=-1)
        log_normalizer = chunk.max(axis=-1) - paddle.log(probs.max(axis=-1))
        pieces.append(log_normalizer - (probs * chunk).sum(axis=-1))
    return pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=0)


# --------------------------------------------------------------------------------------------
# KL estimators and rewards
# --------------------------------------------------------------------------------------------


class KLEstimator(str, Enum):
    """Per-token estimators of KL(π || π_ref) from samples of π (Schulman, "Approximating KL
    divergence"), with log_ratio = log π(a) - log π_ref(a).

    k1 = log_ratio                          unbiased, high variance, can be negative
    k2 = ½·log_ratio²                       biased, low variance, ≥ 0
    k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, low variance, ≥ 0
    """

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


def _kl_k1(log_ratio: paddle.Tensor) -> paddle.Tensor:
    return log_ratio


def _kl_k2(log_ratio: paddle.Tensor) -> paddle.Tensor:
    return 0.5 * paddle.square(log_ratio)


def _kl_k3(log_ratio: paddle.Tensor) -> paddle.Tensor:
    return paddle.exp(-log_ratio) - 1.0 + log_ratio


KL_ESTIMATORS: dict[KLEstimator, Callable[[paddle.Tensor], paddle.Tensor]] = {
    KLEstimator.K1: _kl_k1,
    KLEstimator.K2: _kl_k2,
    KLEstimator.K3: _kl_k3,
}


def kl_divergence_per_token(
    log_probs: paddle.Tensor,  # [B, T]
    reference_log_probs: paddle.Tensor,  # [B, T]
    kl_estimator: str | KLEstimator = KLEstimator.K1,
) -> paddle.Tensor:  # [B, T] float32
    """The named estimator (see `KLEstimator`) of KL(π || π_ref) at every position, unmasked."""
    estimator = _parse_choice(KLEstimator, kl_estimator, "kl_estimator")
    _check_same_shape(log_probs=log_probs, reference_log_probs=reference_log_probs)
    return KL_ESTIMATORS[estimator](as_float32(log_probs) - as_float32(reference_log_probs))


@paddle.no_grad()
def kl_penalized_rewards(
    reward_scores: paddle.Tensor,  # [B] end score of each sequence from the reward model
    log_probs: paddle.Tensor,  # [B, T] actor log-probs of the sampled tokens
    reference_log_probs: paddle.Tensor,  # [B, T] reference-model log-probs of the same tokens
    action_mask: paddle.Tensor,  # [B, T] bool
    kl_coeff: float,
    clip_range_score: float,
    kl_estimator: str | KLEstimator = KLEstimator.K1,
) -> paddle.Tensor:  # [B, T] float32
    """Per-token rewards: r_t = -kl_coeff·kl_t on action positions, and
    r_t += clip(score, -clip_range_score, clip_range_score) at each row's last action position
    (its EOS, or its last token when generation hit the length limit).

    Positions outside the mask get 0. A row with no action position (nothing generated) gets
    all-zero rewards: its score has no token to land on, and it contributes nothing to the loss.
    """
    _check_same_shape(
        log_probs=log_probs, reference_log_probs=reference_log_probs, action_mask=action_mask
    )
    if list(reward_scores.shape) != [log_probs.shape[0]]:
        raise ValueError(
            f"reward_scores must be [B] = [{log_probs.shape[0]}], got {list(reward_scores.shape)}"
            " (squeeze a [B, 1] score-model output first)"
        )
    if kl_coeff < 0:
        raise ValueError(f"kl_coeff must be >= 0, got {kl_coeff!r}")
    _check_positive(clip_range_score=clip_range_score)
    mask = _as_bool(action_mask)
    kl = kl_divergence_per_token(log_probs, reference_log_probs, kl_estimator)
    rewards = paddle.where(mask, -kl_coeff * kl, paddle.zeros([], dtype="float32"))
    clipped_scores = paddle.clip(as_float32(reward_scores), -clip_range_score, clip_range_score)
    last = last_action_indices(mask)  # [B], -1 for an empty row
    columns = paddle.arange(mask.shape[-1], dtype="int64").unsqueeze(0)
    at_end = columns == last.unsqueeze(-1)  # never true for -1, so empty rows get no score
    return rewards + paddle.where(at_end, clipped_scores.unsqueeze(-1), paddle.zeros([]))


def reward_and_cost_token_rewards(
    reward_scores: paddle.Tensor,  # [B] reward-model end scores
    cost_scores: paddle.Tensor,  # [B] cost-model end scores
    log_probs: paddle.Tensor,  # [B, T]
    reference_log_probs: paddle.Tensor,  # [B, T]
    action_mask: paddle.Tensor,  # [B, T] bool
    kl_coeff: float,
    clip_range_score: float,
    kl_estimator: str | KLEstimator = KLEstimator.K1,
) -> tuple[paddle.Tensor, paddle.Tensor]:  # reward tokens [B, T], cost tokens [B, T]
    """PPO-Lagrangian's per-token rewards and costs (safe-rlhf): the KL penalty is split in half,
    r_t = -½·kl_coeff·kl_t (+ clipped reward score at the last action position) and
    c_t = +½·kl_coeff·kl_t (+ clipped cost score there), so that A_r − λ·A_c keeps the full
    penalty whatever λ, once divided by 1 + λ."""
    half = 0.5 * kl_coeff
    rewards = kl_penalized_rewards(
        reward_scores, log_probs, reference_log_probs, action_mask, half, clip_range_score, kl_estimator
    )
    costs = -kl_penalized_rewards(
        -as_float32(cost_scores), log_probs, reference_log_probs, action_mask, half, clip_range_score, kl_estimator
    )
    return rewards, costs


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


@paddle.no_grad()
def gae_advantages_and_returns(
    values: paddle.Tensor,  # [B, T] critic values V_t
    rewards: paddle.Tensor,  # [B, T] per-token rewards r_t
    action_mask: paddle.Tensor,  # [B, T] bool, one contiguous run per row
    gamma: float,
    gae_lambda: float,
) -> tuple[paddle.Tensor, paddle.Tensor]:  # advantages [B, T], returns [B, T], float32
    """Generalised advantage estimation over each row's action positions.

    δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γ·λ·A_{t+1},   R_t = A_t + V_t,

    where the step after a row's last action position is terminal (V = 0, A = 0). Positions
    outside the mask get A = R = 0. Rows may start and end at different columns, but each row's
    action positions must be contiguous.
    """
    _check_same_shape(values=values, rewards=rewards, action_mask=action_mask)
    _check_unit_interval(gamma=gamma, gae_lambda=gae_lambda)
    mask = _as_bool(action_mask)
    _check_contiguous_rows(mask)
    values = paddle.where(mask, as_float32(values), paddle.zeros([], dtype="float32"))
    rewards = paddle.where(mask, as_float32(rewards), paddle.zeros([], dtype="float32"))
    advantages = paddle.zeros_like(values)
    active_columns = paddle.nonzero(mask.any(axis=0)).flatten()
    if active_columns.shape[0] > 0:
        # Columns outside [first, last] have no action in any row, so their A stays 0 and the
        # reverse loop only walks the response part. Columns are unbound once: per-step slicing
        # of a [B, T] tensor costs far more than the arithmetic on [B] vectors.
        first, last = int(active_columns[0]), int(active_columns[-1])
        value_cols = paddle.unbind(values[:, first : last + 1].T, axis=0)
        reward_cols = paddle.unbind(rewards[:, first : last + 1].T, axis=0)
        mask_cols = paddle.unbind(mask[:, first : last + 1].T.astype("float32"), axis=0)
        next_value = paddle.zeros_like(value_cols[0])
        next_advantage = paddle.zeros_like(value_cols[0])
        reversed_advantages = []
        for value, reward, is_action in zip(
            reversed(value_cols), reversed(reward_cols), reversed(mask_cols)
        ):
            # next_value / next_advantage are already 0 past a row's last action (masked below).
            delta = reward + gamma * next_value - value
            advantage = (delta + gamma * gae_lambda * next_advantage) * is_action
            reversed_advantages.append(advantage)
            next_value, next_advantage = value, advantage
        response_advantages = paddle.stack(reversed_advantages[::-1], axis=1)
        advantages = paddle.concat(
            [advantages[:, :first], response_advantages, advantages[:, last + 1 :]], axis=1
        )
    returns = paddle.where(mask, advantages + values, paddle.zeros([], dtype="float32"))
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def actor_clipped_loss(
    log_probs: paddle.Tensor,  # [B, T] current policy log-probs (with gradient)
    old_log_probs: paddle.Tensor,  # [B, T] log-probs at rollout time
    advantages: paddle.Tensor,  # [B, T]
    action_mask: paddle.Tensor,  # [B, T] bool
    clip_range_ratio: float,
    reduction: str | Reduction = Reduction.TOKEN_MEAN,
    clip_range_ratio_high: float | None = None,
) -> paddle.Tensor:  # scalar float32
    """PPO clipped surrogate: ratio = exp(logp - logp_old),
    L = masked_mean(max(-A·ratio, -A·clip(ratio, 1 - ε_low, 1 + ε_high))), with
    ε_low = clip_range_ratio and ε_high = clip_range_ratio_high (default: the same ε)."""
    _check_same_shape(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        action_mask=action_mask,
    )
    high = clip_range_ratio if clip_range_ratio_high is None else clip_range_ratio_high
    _check_positive(clip_range_ratio=clip_range_ratio, clip_range_ratio_high=high)
    ratio = paddle.exp(as_float32(log_probs) - as_float32(old_log_probs))
    advantages = as_float32(advantages)
    unclipped = -advantages * ratio
    clipped = -advantages * paddle.clip(ratio, 1.0 - clip_range_ratio, 1.0 + high)
    return masked_mean(paddle.maximum(unclipped, clipped), action_mask, reduction)


def critic_clipped_loss(
    values: paddle.Tensor,  # [B, T] current critic values (with gradient)
    old_values: paddle.Tensor,  # [B, T] critic values at rollout time
    returns: paddle.Tensor,  # [B, T]
    action_mask: paddle.Tensor,  # [B, T] bool
    clip_range_value: float,
    reduction: str | Reduction = Reduction.TOKEN_MEAN,
) -> paddle.Tensor:  # scalar float32
    """Clipped value loss: V_c = clip(V, V_old - ε, V_old + ε),
    L = ½·masked_mean(max((V - R)², (V_c - R)²))."""
    _check_same_shape(
        values=values, old_values=old_values, returns=returns, action_mask=action_mask
    )
    _check_positive(clip_range_value=clip_range_value)
    values, old_values, returns = as_float32(values), as_float32(old_values), as_float32(returns)
    clipped_values = paddle.minimum(
        paddle.maximum(values, old_values - clip_range_value), old_values + clip_range_value
    )
    squared_errors = paddle.maximum(
        paddle.square(values - returns), paddle.square(clipped_values - returns)
    )
    return 0.5 * masked_mean(squared_errors, action_mask, reduction)


def supervised_lm_loss(
    logits: paddle.Tensor,  # [B, L, V] logits for input_ids
    labels: paddle.Tensor,  # [B, L] aligned with input_ids, IGNORE_INDEX where unsupervised
    ignore_index: int = IGNORE_INDEX,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> paddle.Tensor:  # scalar float32
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1] (the shift happens here),
    L = -Σ log p(labels[t+1]) / max(#supervised targets, 1); 0 when nothing is supervised."""
    if logits.ndim != 3 or list(labels.shape) != list(logits.shape[:2]):
        raise ValueError(
            f"expected logits [B, L, V] and labels [B, L] aligned with input_ids; got logits "
            f"{list(logits.shape)} and labels {list(labels.shape)}"
        )
    targets = labels[:, 1:].astype("int64")
    supervised = targets != ignore_index
    safe_targets = paddle.where(supervised, targets, paddle.zeros_like(targets))
    target_log_probs = gather_log_probs(logits[:, :-1], safe_targets, max_chunk_elements)
    return -masked_mean(target_log_probs, supervised, Reduction.TOKEN_MEAN)


# --------------------------------------------------------------------------------------------
# Diagnostics (no gradient)
# --------------------------------------------------------------------------------------------


@paddle.no_grad()
def approx_kl(
    log_probs: paddle.Tensor,  # [B, T] current policy
    old_log_probs: paddle.Tensor,  # [B, T] rollout policy (the samples come from it)
    mask: paddle.Tensor,  # [B, T] bool
) -> paddle.Tensor:  # scalar float32
    """k3 estimate of KL(π_old || π) on rollout samples, token-mean:
    with r = exp(logp - logp_old), kl ≈ mean((r - 1) - log r) ≥ 0."""
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, mask=mask)
    log_ratio = as_float32(log_probs) - as_float32(old_log_probs)
    return masked_mean(paddle.exp(log_ratio) - 1.0 - log_ratio, mask)


@paddle.no_grad()
def clip_fraction(
    log_probs: paddle.Tensor,  # [B, T]
    old_log_probs: paddle.Tensor,  # [B, T]
    mask: paddle.Tensor,  # [B, T] bool
    clip_range_ratio: float,
    clip_range_ratio_high: float | None = None,
) -> paddle.Tensor:  # scalar float32 in [0, 1]
    """Fraction of valid tokens whose ratio left [1 - ε, 1 + ε], i.e. |ratio - 1| > ε (with
    `clip_range_ratio_high`: ratio < 1 - ε or ratio > 1 + ε_high)."""
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, mask=mask)
    ratio = paddle.exp(as_float32(log_probs) - as_float32(old_log_probs))
    if clip_range_ratio_high is None or clip_range_ratio_high == clip_range_ratio:
        return masked_mean((paddle.abs(ratio - 1.0) > clip_range_ratio).astype("float32"), mask)
    outside = (ratio < 1.0 - clip_range_ratio) | (ratio > 1.0 + clip_range_ratio_high)
    return masked_mean(outside.astype("float32"), mask)


@paddle.no_grad()
def entropy_from_logits(
    logits: paddle.Tensor,  # [B, T, V] logits at the positions of `mask`
    mask: paddle.Tensor,  # [B, T] bool
    reduction: str | Reduction = Reduction.TOKEN_MEAN,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> paddle.Tensor:  # scalar float32
    """Mean policy entropy (nats) over the valid positions, see `token_entropy`."""
    return masked_mean(token_entropy(logits, max_chunk_elements), mask, reduction)


@paddle.no_grad()
def explained_variance(
    values: paddle.Tensor,  # [B, T] critic predictions
    returns: paddle.Tensor,  # [B, T] targets
    mask: paddle.Tensor,  # [B, T] bool
) -> paddle.Tensor:  # scalar float32
    """1 - Var[R - V] / Var[R] over valid tokens (population variances). 1 = perfect critic,
    0 = no better than a constant, < 0 = worse. Defined as 0 when Var[R] = 0 (incl. empty mask)."""
    _check_same_shape(values=values, returns=returns, mask=mask)
    returns = as_float32(returns)
    returns_variance = masked_variance(returns, mask)
    residual_variance = masked_variance(returns - as_float32(values), mask)
    ratio = residual_variance / paddle.clip(returns_variance, min=1e-12)
    return paddle.where(returns_variance > 0, 1.0 - ratio, paddle.zeros([], dtype="float32"))
