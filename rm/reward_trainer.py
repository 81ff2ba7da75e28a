"""Reward-model training on preference pairs, as a PaddleNLP `Trainer` customised through its
public hooks: `compute_loss` (pairwise loss), `prediction_step` (scores for the metrics) and
`compute_metrics` (accuracy and reward statistics)."""

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddlenlp.trainer import EvalPrediction, Trainer
from paddlenlp.transformers.model_utils import unwrap_model

from ppo.grad_clip import SkipClipWithinNormMixin
from ppo.models.normalizer import DEFAULT_MOMENTUM, NORMALIZERS, check_normalizer_type
from ppo.models.reward_losses import REWARD_LOSSES, PreferenceScores, check_loss_type, get_reward_loss
from ppo.stage import StageArguments


@dataclass
class RewardArguments(StageArguments):
    """Arguments of `rm/run_reward.py`: PaddleNLP's TrainingArguments plus model_name_or_path,
    train_datasets, eval_datasets (preference dataset specs), max_length and the keys below."""

    MODEL_ROLE = "the SFT model the reward model starts from"
    DATA_KIND = "preference datasets"

    normalize_score_during_training: bool = field(
        default=False,
        metadata={"help": "Train on scores normalised with the running statistics (needs normalizer_type)."},
    )
    normalizer_type: Optional[str] = field(
        default=None,
        metadata={
            "help": f"How end-score statistics are tracked during training: one of {sorted(NORMALIZERS)}, or None "
            "(no statistics). They are saved in the model config, where PPO's normalize_reward finds them."
        },
    )
    normalizer_momentum: float = field(
        default=DEFAULT_MOMENTUM, metadata={"help": "Momentum of the ExponentialMovingAverage normalizer."}
    )
    loss_type: str = field(
        default="sequence-wise", metadata={"help": f"Pairwise loss: one of {sorted(REWARD_LOSSES)}."}
    )
    regularization: float = field(
        default=0.001, metadata={"help": "Weight of the L2 penalty on the scores used by the loss."}
    )
    train_top_layers: Optional[int] = field(
        default=None,
        metadata={"help": "Train only the score head, the final norm and the top N decoder layers (embeddings and "
                          "lower layers frozen: no backward through them, several times cheaper on CPU). "
                          "None: train the whole model."},
    )

    def __post_init__(self):
        check_loss_type(self.loss_type)
        if isinstance(self.normalizer_type, str) and self.normalizer_type.strip() in ("", "None", "none", "null"):
            self.normalizer_type = None
        check_normalizer_type(self.normalizer_type)
        if self.normalize_score_during_training and self.normalizer_type is None:
            raise ValueError(f"normalize_score_during_training needs normalizer_type: one of {sorted(NORMALIZERS)}")
        if not 0.0 < self.normalizer_momentum < 1.0:
            raise ValueError(f"normalizer_momentum must be in (0, 1), got {self.normalizer_momentum}")
        if self.regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        top = self.train_top_layers
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise ValueError(f"train_top_layers must be a non-negative integer or null, got {top!r}")
        super().__post_init__()


def compute_reward_metrics(eval_prediction: EvalPrediction) -> Dict[str, float]:
    """predictions: [N, 2] end scores of (preferred, other) response; label_ids: [N] index of the
    preferred column (always 0 here). accuracy = share of pairs scored in the right order, over
    `pairs` pairs (what its uncertainty depends on)."""
    scores = np.asarray(eval_prediction.predictions, dtype=np.float64)
    preferred_column = np.asarray(eval_prediction.label_ids, dtype=np.int64).reshape(-1)
    rows = np.arange(scores.shape[0])
    preferred = scores[rows, preferred_column]
    other = scores[rows, 1 - preferred_column]
    return {
        "accuracy": float(np.mean(preferred > other)),
        "pairs": int(scores.shape[0]),
        "rewards_mean": float(scores.mean()),
        "rewards_std": float(scores.std()),
        "better_rewards_mean": float(preferred.mean()),
        "worse_rewards_mean": float(other.mean()),
    }


class RewardTrainer(SkipClipWithinNormMixin, Trainer):
    """Trains a score model (`ppo.models.AutoModelForScore`) on `PreferenceDataset` batches."""

    args: RewardArguments

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", compute_reward_metrics)
        super().__init__(*args, **kwargs)
        self.reward_loss = get_reward_loss(self.args.loss_type)

    def score_pairs(self, model, inputs: Dict[str, paddle.Tensor]) -> PreferenceScores:
        """One forward pass over better and worse sequences together (they share the padded
        length L) -> per-token and end scores of both halves."""
        better_ids, worse_ids = inputs["better_input_ids"], inputs["worse_input_ids"]  # [B, L]
        better_mask, worse_mask = inputs["better_attention_mask"], inputs["worse_attention_mask"]  # [B, L]
        batch_size = better_ids.shape[0]
        output = model(
            paddle.concat([better_ids, worse_ids], axis=0),
            paddle.concat([better_mask, worse_mask], axis=0),
            normalize=False,
        )
        scores, end_scores = output.scores, output.end_scores  # [2B, L, D], [2B, D]
        if scores.shape[-1] != 1:
            raise ValueError(f"reward training needs a score model with score_dim=1, got {scores.shape[-1]}")

        score_model = unwrap_model(model)
        if model.training and score_model.normalizer is not None:
            # Statistics of the raw scores, tracked whether or not the loss uses them.
            score_model.update_normalizer(self._gather_across_processes(end_scores.detach()))
        if score_model.config.do_normalize:
            scores, end_scores = score_model.normalize_scores(scores), score_model.normalize_scores(end_scores)

        scores, end_scores = scores.squeeze(-1), end_scores.squeeze(-1)  # [2B, L], [2B]
        return PreferenceScores(
            better_scores=scores[:batch_size],
            worse_scores=scores[batch_size:],
            better_end_scores=end_scores[:batch_size],
            worse_end_scores=end_scores[batch_size:],
            better_input_ids=better_ids,
            worse_input_ids=worse_ids,
            better_attention_mask=better_mask,
            worse_attention_mask=worse_mask,
        )

    def _gather_across_processes(self, end_scores: paddle.Tensor) -> paddle.Tensor:
        """[N, D] on this process -> [N * world, D]: every process sees every score, so the
        normaliser statistics stay identical everywhere."""
        if not dist.is_initialized() or dist.get_world_size() <= 1:
            return end_scores
        gathered = []
        dist.all_gather(gathered, end_scores)
        return paddle.concat(gathered, axis=0)

    def compute_loss(self, model, inputs, return_outputs=False):
        scores = self.score_pairs(model, inputs)
        loss = self.reward_loss(scores, self.args.regularization)
        if not bool(paddle.isfinite(loss)):
            raise FloatingPointError(
                f"reward loss is {float(loss)} at step {self.state.global_step} "
                f"(better end scores {scores.better_end_scores.tolist()}, "
                f"worse end scores {scores.worse_end_scores.tolist()}); lower learning_rate or use fp32/bf16"
            )
        return (loss, scores) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """-> (loss, predictions [B, 2] = end scores of (better, worse), labels [B] = index of
        the preferred column, i.e. 0)."""
        with paddle.no_grad():
            scores = self.score_pairs(model, inputs)
            loss = self.reward_loss(scores, self.args.regularization).detach()
        if prediction_loss_only:
            return loss, None, None
        predictions = paddle.stack([scores.better_end_scores, scores.worse_end_scores], axis=-1).astype("float32")
        labels = paddle.zeros([predictions.shape[0]], dtype="int64")
        return loss, predictions, labels
