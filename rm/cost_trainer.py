"""Cost-model training on safety preference pairs (safe-rlhf's cost model): the reward trainer
with the cost objective, safety batches and the cost metrics.

The cost model is a score model with `score_type="cost"`: it should give the less safe answer of
a pair the higher cost (`accuracy`) and every answer a cost whose sign says whether it is unsafe
(> 0) or safe (< 0) (`accuracy_sign`), so that PPO-Lagrangian's threshold 0 on the mean cost
means "safe on average".
"""

from dataclasses import dataclass, field
from typing import Dict

import numpy as np
import paddle
from paddlenlp.trainer import EvalPrediction

from ppo.models.reward_losses import COST_LOSSES, SafetyPreferenceScores, check_cost_loss_type, get_cost_loss
from rm.reward_trainer import RewardArguments, RewardTrainer


@dataclass
class CostArguments(RewardArguments):
    """Arguments of `rm/run_cost.py`: those of the reward model (`RewardArguments`) on safety
    preference datasets; `loss_type` and `regularization` select and weight the cost objective."""

    MODEL_ROLE = "the SFT model the cost model starts from"
    DATA_KIND = "safety preference datasets"

    loss_type: str = field(
        default="sequence-wise",
        metadata={"help": f"Cost objective (pairwise plus sign term): one of {sorted(COST_LOSSES)}."},
    )

    def __post_init__(self):
        check_cost_loss_type(self.loss_type)
        super().__post_init__()


def compute_cost_metrics(eval_prediction: EvalPrediction) -> Dict[str, float]:
    """predictions: [N, 2] end costs of (safer, less safe) response; label_ids: [N, 2] their
    safety signs (+1 safe / -1 unsafe).

    accuracy = share of pairs whose less safe answer costs more (safe-rlhf's metric; on pairs
    of equal safety it follows whatever ranked them); accuracy_safe_vs_unsafe = the same on the
    pairs of one safe and one unsafe answer only; accuracy_sign = share of the 2N answers whose
    cost has the sign of its label (negative for safe, positive for unsafe); cost_mean /
    cost_std over all 2N answers (the values PPO-Lagrangian's threshold is set against); the
    safe/unsafe means show how far apart the two classes sit.
    """
    costs = np.asarray(eval_prediction.predictions, dtype=np.float64)
    signs = np.asarray(eval_prediction.label_ids, dtype=np.int64)
    if costs.ndim != 2 or costs.shape[1] != 2 or signs.shape != costs.shape:
        raise ValueError(
            f"cost metrics need predictions and labels of shape [N, 2], got {costs.shape} and {signs.shape}"
        )
    safe = signs > 0
    ordered = costs[:, 1] > costs[:, 0]
    mixed = safe[:, 0] != safe[:, 1]  # [N] one safe and one unsafe answer
    metrics = {
        "accuracy": float(np.mean(ordered)),
        "accuracy_sign": float(np.mean(costs * signs < 0.0)),
        "pairs": int(costs.shape[0]),
        "cost_mean": float(costs.mean()),
        "cost_std": float(costs.std()),
        "safe_answers": int(safe.sum()),
    }
    # Only what occurs: an all-safe eval set has no unsafe mean and no safe-vs-unsafe pair.
    if mixed.any():
        metrics["accuracy_safe_vs_unsafe"] = float(np.mean(ordered[mixed]))
        metrics["safe_vs_unsafe_pairs"] = int(mixed.sum())
    if safe.any():
        metrics["safe_cost_mean"] = float(costs[safe].mean())
    if (~safe).any():
        metrics["unsafe_cost_mean"] = float(costs[~safe].mean())
    return metrics


class CostTrainer(RewardTrainer):
    """Trains a cost model (`AutoModelForScore` with `score_type="cost"`) on
    `SafetyPreferenceDataset` batches with a loss from `COST_LOSSES`."""

    args: CostArguments

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", compute_cost_metrics)
        super().__init__(*args, **kwargs)
        # `compute_loss` of the reward trainer calls `self.reward_loss(scores, regularization)`.
        self.reward_loss = get_cost_loss(self.args.loss_type)

    def score_pairs(self, model, inputs: Dict[str, paddle.Tensor]) -> SafetyPreferenceScores:
        """A `SafetyPreferenceBatch` -> costs of both halves: the reward trainer's scoring with
        the safer answer in the `better` half (it should cost less), plus the safety signs."""
        scores = super().score_pairs(
            model,
            {
                "better_input_ids": inputs["safer_input_ids"],
                "better_attention_mask": inputs["safer_attention_mask"],
                "worse_input_ids": inputs["unsafer_input_ids"],
                "worse_attention_mask": inputs["unsafer_attention_mask"],
            },
        )
        return SafetyPreferenceScores(
            **vars(scores),
            better_safety_sign=inputs["safer_safety_sign"],
            worse_safety_sign=inputs["unsafer_safety_sign"],
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """-> (loss, predictions [B, 2] = end costs of (safer, less safe), labels [B, 2] = their
        safety signs)."""
        with paddle.no_grad():
            scores = self.score_pairs(model, inputs)
            loss = self.reward_loss(scores, self.args.regularization).detach()
        if prediction_loss_only:
            return loss, None, None
        predictions = paddle.stack([scores.better_end_scores, scores.worse_end_scores], axis=-1).astype("float32")
        labels = paddle.stack([scores.better_safety_sign, scores.worse_safety_sign], axis=-1).astype("int64")
        return loss, predictions, labels
