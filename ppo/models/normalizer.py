"""Running statistics of scores, used to normalise reward/cost model outputs.

The statistics live on the host in float64 (they are a handful of numbers updated once per step)
and are exported as plain lists so that they can be stored in a model's `config.json`.
Normalising a tensor uses them as constants: no gradient flows into the statistics.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Type, Union

import numpy as np
import paddle

# How a score type is normalised: rewards are centred and scaled, costs only scaled (their sign
# carries meaning: cost > 0 is unsafe), critic values are left alone.
NORMALIZATION_MODES = ("affine", "scale", "identity")

DEFAULT_MOMENTUM = 0.9
DEFAULT_EPSILON = 1e-8


def _as_float64_rows(values, dim: int) -> np.ndarray:
    """Any tensor/array of scores -> float64 array [N, dim]."""
    if isinstance(values, paddle.Tensor):
        values = values.detach().astype("float64").numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1 and dim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"normalizer of dimension {dim} expects scores of shape [N, {dim}], got {list(array.shape)}")
    return array


class Normalizer:
    """Base class: holds `mean`, `var` ([dim] float64) and `count` (number of scores seen).

    Subclasses define how a batch of scores updates the statistics (`update`).
    """

    NAME: str = ""

    def __init__(self, dim: int = 1, momentum: float = DEFAULT_MOMENTUM, epsilon: float = DEFAULT_EPSILON):
        if dim < 1:
            raise ValueError(f"normalizer dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.mean = np.zeros(self.dim, dtype=np.float64)
        self.var = np.ones(self.dim, dtype=np.float64)
        self.count = 0

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + self.epsilon)

    def update(self, scores) -> None:
        """Fold a batch of scores [N, dim] (or [N] when dim == 1) into the statistics."""
        batch = _as_float64_rows(scores, self.dim)
        if batch.shape[0] == 0:
            return
        self._update(batch.mean(axis=0), batch.var(axis=0), batch.shape[0])

    def _update(self, batch_mean: np.ndarray, batch_var: np.ndarray, batch_count: int) -> None:
        raise NotImplementedError

    def normalize(self, scores: paddle.Tensor, mode: str) -> paddle.Tensor:
        """scores: [..., dim] -> same shape; `mode` is one of NORMALIZATION_MODES."""
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"unknown normalization mode {mode!r}; allowed: {list(NORMALIZATION_MODES)}")
        if mode == "identity":
            return scores
        std = paddle.to_tensor(self.std, dtype=scores.dtype)
        if mode == "scale":
            return scores / std
        mean = paddle.to_tensor(self.mean, dtype=scores.dtype)
        return (scores - mean) / std

    def state_dict(self) -> Dict[str, Union[list, int]]:
        """JSON-serialisable statistics (stored in the model config)."""
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": int(self.count)}

    def load_state_dict(self, state: Dict[str, Optional[Union[Sequence[float], float, int]]]) -> None:
        """Restore statistics saved by `state_dict`; missing entries keep their current values."""
        for key in ("mean", "var"):
            value = state.get(key)
            if value is None:
                continue
            array = np.asarray(value, dtype=np.float64).reshape(-1)
            if array.shape[0] != self.dim:
                raise ValueError(f"normalizer {key} has {array.shape[0]} values, expected {self.dim}")
            setattr(self, key, array)
        if state.get("count") is not None:
            self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.tolist()}, var={self.var.tolist()}, count={self.count})"


class RunningMeanStd(Normalizer):
    """Exact mean and (population) variance of every score seen so far.

    Batches are merged with the parallel-variance formula, so the result equals `np.mean`/`np.var`
    over all scores concatenated, whatever the batch sizes.
    """

    NAME = "RunningMeanStd"

    def _update(self, batch_mean, batch_var, batch_count):
        total = self.count + batch_count
        delta = batch_mean - self.mean
        new_mean = self.mean + delta * batch_count / total
        sum_sq = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean, self.var, self.count = new_mean, sum_sq / total, total


class ExponentialMovingAverage(Normalizer):
    """`stat <- momentum * stat + (1 - momentum) * batch_stat` for mean and variance.

    The first batch initialises the statistics directly (no pull towards the N(0, 1) start
    values), so early normalisation is already on the right scale.
    """

    NAME = "ExponentialMovingAverage"

    def _update(self, batch_mean, batch_var, batch_count):
        if self.count == 0:
            self.mean, self.var = batch_mean.copy(), batch_var.copy()
        else:
            self.mean = self.momentum * self.mean + (1.0 - self.momentum) * batch_mean
            self.var = self.momentum * self.var + (1.0 - self.momentum) * batch_var
        self.count += batch_count


NORMALIZERS: Dict[str, Type[Normalizer]] = {cls.NAME: cls for cls in (RunningMeanStd, ExponentialMovingAverage)}


def check_normalizer_type(name: Optional[str]) -> None:
    """Raise a ValueError naming the allowed values unless `name` is a known normalizer or None."""
    if name is not None and name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer_type {name!r}; allowed: {sorted(NORMALIZERS) + [None]}")


def build_normalizer(
    name: str, dim: int = 1, momentum: float = DEFAULT_MOMENTUM, epsilon: float = DEFAULT_EPSILON
) -> Normalizer:
    """Create the normalizer registered under `name` (see NORMALIZERS)."""
    if name is None or name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer_type {name!r}; allowed: {sorted(NORMALIZERS)}")
    return NORMALIZERS[name](dim=dim, momentum=momentum, epsilon=epsilon)
