"""Models shared by the reward-model and PPO stages: score models, their losses and normalizers."""

from ppo.models.normalizer import (
    NORMALIZERS,
    ExponentialMovingAverage,
    Normalizer,
    RunningMeanStd,
    build_normalizer,
)
from ppo.models.ppo_model_utils import make_position_ids
from ppo.models.reward_losses import (
    REWARD_LOSSES,
    PreferenceScores,
    get_reward_loss,
    sequence_wise_loss,
    token_wise_loss,
)
from ppo.models.score_model import (
    SCORE_MODEL_CLASSES,
    AutoModelForScore,
    LlamaModelForScore,
    Qwen2ModelForScore,
)
from ppo.models.score_model_utils import ScoreModelMixin, ScoreModelOutput

__all__ = [
    "AutoModelForScore",
    "ExponentialMovingAverage",
    "LlamaModelForScore",
    "NORMALIZERS",
    "Normalizer",
    "PreferenceScores",
    "Qwen2ModelForScore",
    "REWARD_LOSSES",
    "RunningMeanStd",
    "SCORE_MODEL_CLASSES",
    "ScoreModelMixin",
    "ScoreModelOutput",
    "build_normalizer",
    "get_reward_loss",
    "make_position_ids",
    "sequence_wise_loss",
    "token_wise_loss",
]
