"""Score models: a causal-LM backbone plus a linear `score_head` giving one score per token.

`ScoreModelMixin` holds everything that does not depend on the backbone (head, score config,
normaliser, end-score selection); `score_model.py` combines it with each PaddleNLP backbone.
The same class serves as reward model (`score_type="reward"`), cost model (`"cost"`) and PPO
critic (`"critic"`, per-token values, never normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import paddle
from paddle import nn
from paddlenlp.transformers.model_outputs import ModelOutput
from paddlenlp.utils.log import logger

from ppo.models.normalizer import (
    DEFAULT_MOMENTUM,
    Normalizer,
    build_normalizer,
    check_normalizer_type,
)
from ppo.models.parallel_utils import score_model_tensor_parallel_mappings
from ppo.models.ppo_model_utils import make_position_ids

# score_type -> how the normaliser transforms scores (see normalizer.NORMALIZATION_MODES).
SCORE_TYPE_NORMALIZATION = {"reward": "affine", "cost": "scale", "critic": "identity"}

# Score-model fields stored in the model config, with their defaults.
SCORE_CONFIG_DEFAULTS: Dict[str, Any] = {
    "score_dim": 1,
    "score_bias": False,
    "score_type": "reward",
    "do_normalize": False,
    "normalizer_type": None,
    "momentum": DEFAULT_MOMENTUM,
}
# Normaliser statistics, also stored in the config so that they travel with the checkpoint.
NORMALIZER_STAT_KEYS = ("mean", "var", "count")


@dataclass
class ScoreModelOutput(ModelOutput):
    """Output of a score model.

    scores:     [B, L, D] score of every position (normalised if the model normalises)
    end_scores: [B, D]    score at the last real token of each row
    end_index:  [B]       position of that token
    """

    scores: Optional[paddle.Tensor] = None
    end_scores: Optional[paddle.Tensor] = None
    end_index: Optional[paddle.Tensor] = None


def last_real_token_index(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """Position of the last real token in every row, for left or right padding alike.

    It looks only at the mask, never at token ids, so an EOS that doubles as pad token is still
    found when the mask marks it as real.

    attention_mask: [B, L] (1/True = real token) -> [B] int64
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {list(attention_mask.shape)}")
    batch_size, length = attention_mask.shape
    positions = paddle.arange(length, dtype="int64").unsqueeze(0).expand([batch_size, length])
    real = attention_mask.astype("bool")
    end_index = paddle.where(real, positions, paddle.full_like(positions, -1)).max(axis=-1)
    if bool((end_index < 0).any()):
        empty_rows = paddle.nonzero(end_index < 0).flatten().tolist()
        raise ValueError(f"rows {empty_rows} of attention_mask have no real token; cannot pick an end score")
    return end_index


def gather_end_scores(scores: paddle.Tensor, end_index: paddle.Tensor) -> paddle.Tensor:
    """scores: [B, L, D], end_index: [B] -> [B, D] (the score at `end_index` of each row)."""
    batch_index = paddle.arange(scores.shape[0], dtype="int64")
    return paddle.gather_nd(scores, paddle.stack([batch_index, end_index.astype("int64")], axis=-1))


def apply_score_config(config, overrides: Dict[str, Any]) -> None:
    """Write the score-model fields into `config`: explicit `overrides` first, then what the
    config already holds (e.g. a saved reward model), then the defaults. Validates them."""
    for key, default in SCORE_CONFIG_DEFAULTS.items():
        if key in overrides:
            setattr(config, key, overrides.pop(key))
        elif getattr(config, key, None) is None:
            setattr(config, key, default)
    for key in NORMALIZER_STAT_KEYS:
        if key in overrides:
            setattr(config, key, overrides.pop(key))
    if overrides:
        allowed = sorted(SCORE_CONFIG_DEFAULTS) + list(NORMALIZER_STAT_KEYS)
        raise TypeError(f"unknown score model arguments {sorted(overrides)}; allowed: {allowed}")

    if config.score_type not in SCORE_TYPE_NORMALIZATION:
        raise ValueError(f"unknown score_type {config.score_type!r}; allowed: {sorted(SCORE_TYPE_NORMALIZATION)}")
    if not isinstance(config.score_dim, int) or config.score_dim < 1:
        raise ValueError(f"score_dim must be a positive integer, got {config.score_dim!r}")
    check_normalizer_type(config.normalizer_type)
    if config.do_normalize and config.normalizer_type is None:
        raise ValueError("do_normalize=True needs a normalizer_type (RunningMeanStd or ExponentialMovingAverage)")


class ScoreModelMixin:
    """Backbone-independent part of a score model. The concrete class must be a PaddleNLP
    `PretrainedModel` whose `base_model` returns hidden states `[B, L, hidden]`."""

    score_head: nn.Linear
    normalizer: Optional[Normalizer]

    def init_score_head(self, config, hidden_size: int, **score_kwargs) -> None:
        apply_score_config(config, score_kwargs)
        self.score_head = nn.Linear(hidden_size, config.score_dim, bias_attr=None if config.score_bias else False)
        self.normalizer = None
        if config.normalizer_type is not None:
            self.normalizer = build_normalizer(
                config.normalizer_type, dim=config.score_dim, momentum=config.momentum
            )
            self.normalizer.load_state_dict({key: getattr(config, key, None) for key in NORMALIZER_STAT_KEYS})
            self._sync_normalizer_to_config()

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: paddle.Tensor,  # [B, L]
        attention_mask: paddle.Tensor,  # [B, L], 1/True = real token
        position_ids: Optional[paddle.Tensor] = None,  # [B, L]; default: count real tokens only
        normalize: Optional[bool] = None,  # None -> config.do_normalize
    ) -> ScoreModelOutput:
        if attention_mask is None:
            raise ValueError("score models need attention_mask to find the last real token of each row")
        if position_ids is None:
            position_ids = make_position_ids(attention_mask)
        hidden_states = self.base_model(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask.astype("bool"),
            use_cache=False,
            return_dict=True,
        ).last_hidden_state  # [B, L, hidden]
        scores = self.score_head(hidden_states)  # [B, L, D]
        end_index = last_real_token_index(attention_mask)  # [B]
        end_scores = gather_end_scores(scores, end_index)  # [B, D]
        if self.config.do_normalize if normalize is None else normalize:
            scores, end_scores = self.normalize_scores(scores), self.normalize_scores(end_scores)
        return ScoreModelOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    # -------------------------------------------------------------- normaliser
    def normalize_scores(self, scores: paddle.Tensor) -> paddle.Tensor:
        """scores: [..., D] -> normalised per `score_type` with the current statistics."""
        mode = SCORE_TYPE_NORMALIZATION[self.config.score_type]
        if mode == "identity":
            return scores
        if self.normalizer is None:
            raise ValueError("this score model has no normalizer; set normalizer_type to normalise its scores")
        return self.normalizer.normalize(scores, mode)

    def update_normalizer(self, end_scores) -> None:
        """Fold raw end scores [N, D] into the statistics and mirror them into the config."""
        if self.normalizer is None:
            raise ValueError("this score model has no normalizer; set normalizer_type to track score statistics")
        self.normalizer.update(end_scores)
        self._sync_normalizer_to_config()

    def _sync_normalizer_to_config(self) -> None:
        if self.normalizer is not None:
            for key, value in self.normalizer.state_dict().items():
                setattr(self.config, key, value)

    # ---------------------------------------------------------- tensor parallel
    @classmethod
    def _get_tensor_parallel_mappings(cls, config, is_split=True):
        """The backbone's TP split/merge actions without its LM head; score_head is replicated."""
        return score_model_tensor_parallel_mappings(super()._get_tensor_parallel_mappings(config, is_split=is_split))

    # ---------------------------------------------------------- save / load
    def save_pretrained(self, *args, **kwargs):
        self._sync_normalizer_to_config()
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        checkpoint_config = kwargs.get("config")
        if checkpoint_config is None or isinstance(checkpoint_config, (str, bytes)):
            checkpoint_config = cls.config_class.from_pretrained(checkpoint_config or pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if not is_score_model_config(checkpoint_config):
            logger.info(
                f"{cls.__name__}: loaded the backbone of the causal-LM checkpoint {pretrained_model_name_or_path}; "
                f"its LM head is unused and score_head is freshly initialised "
                f"(normal, std={getattr(model.config, 'initializer_range', 'default')})."
            )
        return model


def is_score_model_config(config) -> bool:
    """True when a checkpoint config was saved by a score model (it then holds a trained head)."""
    architectures = getattr(config, "architectures", None) or []
    return any(name.endswith("ForScore") for name in architectures) or getattr(config, "score_type", None) is not None
