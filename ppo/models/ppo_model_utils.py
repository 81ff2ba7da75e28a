"""Pure PPO math: no trainer state, every function takes tensors and returns tensors."""

from __future__ import annotations

import paddle


def make_position_ids(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """Position ids that start at 0 on the first real token of every row.

    With left-padded prompts the default `arange` positions would shift every real token by the
    row's padding, so rollout, log-prob recomputation and scoring all pass these instead.

    attention_mask: [B, L] (1/True = real token) -> [B, L] int64
    """
    mask = attention_mask.astype("int64")
    return paddle.clip(paddle.cumsum(mask, axis=-1) - 1, min=0)
