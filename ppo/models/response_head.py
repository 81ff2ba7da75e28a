"""The LM head on response positions only.

A causal LM's forward multiplies every position's hidden state by the [hidden, vocab] head, but
RL needs the next-token distribution only where the next token is a response token: columns
P-1 .. L-2 of a rollout (P prompt columns, L in all). At SmolLM2 shapes (vocab 49152) the prompt
columns' logits are a third of the head's FLOPs and of the float32 [B, L, V] tensors that the
log-softmax, its backward and the entropy walk over.

`head_on_columns` swaps the head of the model (found inside data-parallel / fleet wrappers)
for one that slices the hidden states first, for the duration of one forward. The wrapped
model's own forward still runs, so wrappers' hooks (DataParallel's gradient reducer) see the
same graph and the same parameters; only the head's input is narrower.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import paddle

# Wrapper attributes that hold the wrapped layer: paddle.DataParallel and fleet's meta-parallel
# wrappers (`_layers`), sharding / AMP decorators (`_layer`).
_WRAPPER_ATTRIBUTES = ("_layers", "_layer")
_MAX_WRAPPER_DEPTH = 4


def causal_lm_of(model) -> Optional[paddle.nn.Layer]:
    """The layer that owns `lm_head` inside up to a few training wrappers, or None."""
    for _ in range(_MAX_WRAPPER_DEPTH + 1):
        if model is None:
            return None
        if isinstance(getattr(model, "lm_head", None), paddle.nn.Layer):
            return model
        model = next((getattr(model, name) for name in _WRAPPER_ATTRIBUTES if getattr(model, name, None) is not None), None)
    return None


class ColumnSlicedHead(paddle.nn.Layer):
    """`head` applied to hidden-state columns [start, end) of a [B, L, H] input."""

    def __init__(self, head: paddle.nn.Layer, start: int, end: int):
        super().__init__()
        self.head, self.start, self.end = head, start, end

    def forward(self, hidden_states, *args, **kwargs):
        return self.head(hidden_states[:, self.start : self.end], *args, **kwargs)


def supports_column_head(model) -> bool:
    """Whether `head_on_columns` can narrow this model's head. Not under sequence parallel: its
    head first gathers hidden states that are laid out [L*B/tp, H], not [B, L, H]."""
    causal_lm = causal_lm_of(model)
    return causal_lm is not None and not getattr(getattr(causal_lm, "config", None), "sequence_parallel", False)


@contextlib.contextmanager
def head_on_columns(model, start: int, end: int) -> Iterator[bool]:
    """Within the block, `model(...)` returns logits for columns [start, end) only ([B, end -
    start, V]). Yields False, changing nothing, when the model is not supported
    (`supports_column_head`): the caller then gets the full [B, L, V] logits and slices them."""
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= start < end for the head's columns, got [{start}, {end})")
    if not supports_column_head(model):
        yield False
        return
    causal_lm = causal_lm_of(model)
    original = causal_lm.lm_head
    causal_lm.lm_head = ColumnSlicedHead(original, start, end)
    try:
        yield True
    finally:
        causal_lm.lm_head = original
