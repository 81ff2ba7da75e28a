"""Models shared by the reward-model and PPO stages: score models, their losses and normalizers.

Importing this package points PaddleNLP's Llama/Qwen2 SwiGLU at a kernel that is plain Paddle ops
on CPU and the fused kernel on GPU (`ppo.models.kernels`), before any model is built.
"""

from ppo.models.kernels import install_plain_cpu_kernels

install_plain_cpu_kernels()

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
