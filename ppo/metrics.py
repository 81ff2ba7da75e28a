"""Training metrics of the RL loop: accumulation between log points, and rollout statistics that
add up exactly across data-parallel ranks."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List

import numpy as np
import paddle

from ppo.experience import Experience
from ppo.models.ppo_model_utils import kl_divergence_per_token, response_lengths


class MetricTracker:
    """Accumulates scalars between two log points: means for most, maxima for `add_max`."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)
        self.maxima: Dict[str, float] = {}

    def add(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.sums[name] += float(value)
                self.counts[name] += 1

    def add_max(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            self.maxima[name] = max(float(value), self.maxima.get(name, -math.inf))

    def pop(self) -> Dict[str, float]:
        result = {name: self.sums[name] / self.counts[name] for name in self.sums}
        result.update(self.maxima)
        self.sums, self.counts, self.maxima = defaultdict(float), defaultdict(int), {}
        return result

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "maxima": dict(self.maxima)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = defaultdict(float, state["sums"])
        self.counts = defaultdict(int, state["counts"])
        self.maxima = dict(state["maxima"])


def rollout_sums(experience: Experience, kl_estimator: str, with_critic: bool = True) -> Dict[str, float]:
    """Additive statistics of one rollout: summed over every rank they are exactly the statistics
    of the union of the ranks' rollouts (float64 sums of per-token float32 values). Without a
    critic there are no values, returns or residuals."""
    mask = experience.action_mask
    valid = mask.numpy().astype(bool)

    def token_values(x: paddle.Tensor) -> np.ndarray:  # [B, L-1] -> valid entries, float64
        return x.astype("float32").numpy().astype(np.float64)[valid]

    kl = kl_divergence_per_token(experience.old_log_probs, experience.reference_log_probs, kl_estimator)
    sums = {
        "responses": float(experience.batch_size),
        "tokens": float(valid.sum()),
        "reward": float(experience.reward_scores.astype("float64").sum()),
        "reward_with_kl_penalty": float(token_values(experience.rewards).sum()),
        "kl": float(token_values(kl).sum()),
        "length": float(response_lengths(mask).astype("float64").sum()),
    }
    if not with_critic:
        return sums
    values, returns = token_values(experience.old_values), token_values(experience.returns)
    residual = returns - values
    sums.update(
        values=float(values.sum()),
        returns=float(returns.sum()),
        returns_squared=float(np.square(returns).sum()),
        residual=float(residual.sum()),
        residual_squared=float(np.square(residual).sum()),
    )
    return sums


def rollout_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """Metrics of a rollout from its (globally summed) `rollout_sums`: per-response means of the
    reward, the KL-penalised reward and KL summed over each response, and the response length;
    token means of values and returns; explained variance 1 - Var[R - V] / Var[R] over tokens
    (0 when Var[R] = 0)."""
    responses, tokens = max(sums["responses"], 1.0), max(sums["tokens"], 1.0)
    metrics = {
        "train/reward": sums["reward"] / responses,
        "train/reward_with_kl_penalty": sums["reward_with_kl_penalty"] / responses,
        "train/kl_divergence": sums["kl"] / responses,
        "train/mean_generated_length": sums["length"] / responses,
    }
    if "values" not in sums:  # critic-free: no value diagnostics
        return metrics

    def variance(total: float, squares: float) -> float:
        return max(squares / tokens - (total / tokens) ** 2, 0.0)

    returns_variance = variance(sums["returns"], sums["returns_squared"])
    residual_variance = variance(sums["residual"], sums["residual_squared"])
    return {
        **metrics,
        "train/values": sums["values"] / tokens,
        "train/returns": sums["returns"] / tokens,
        "train/explained_variance": 1.0 - residual_variance / returns_variance if returns_variance > 0 else 0.0,
    }


def mean_stats(step_stats: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-name mean over the micro-batches of one optimizer step (non-finite values skipped)."""
    tracker = MetricTracker()
    for values in step_stats:
        tracker.add(values)
    return tracker.pop()
