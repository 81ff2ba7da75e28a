"""Score models for each supported PaddleNLP backbone, and `AutoModelForScore` to pick one."""

from __future__ import annotations

from typing import Dict, Type

from paddlenlp.transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaModel,
    LlamaPretrainedModel,
    Qwen2Config,
    Qwen2Model,
    Qwen2PretrainedModel,
)

from ppo.models.score_model_utils import ScoreModelMixin


class LlamaModelForScore(ScoreModelMixin, LlamaPretrainedModel):
    """Llama backbone + score head. Parameter names match `LlamaForCausalLM` under `llama.`,
    so an SFT checkpoint loads its backbone directly."""

    def __init__(self, config: LlamaConfig, **score_kwargs):
        super().__init__(config)
        self.llama = LlamaModel(config)
        self.init_score_head(config, config.hidden_size, **score_kwargs)


class Qwen2ModelForScore(ScoreModelMixin, Qwen2PretrainedModel):
    """Qwen2 backbone + score head (parameters under `qwen2.`, as in `Qwen2ForCausalLM`)."""

    def __init__(self, config: Qwen2Config, **score_kwargs):
        super().__init__(config)
        self.qwen2 = Qwen2Model(config)
        self.init_score_head(config, config.hidden_size, **score_kwargs)


# config.model_type -> score model class
SCORE_MODEL_CLASSES: Dict[str, Type[ScoreModelMixin]] = {
    "llama": LlamaModelForScore,
    "qwen2": Qwen2ModelForScore,
}


class AutoModelForScore:
    """Chooses the score model class from a checkpoint's `config.model_type`."""

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("use AutoModelForScore.from_pretrained(path) or AutoModelForScore.from_config(config)")

    @staticmethod
    def model_class_for(model_type: str) -> Type[ScoreModelMixin]:
        if model_type not in SCORE_MODEL_CLASSES:
            raise ValueError(
                f"no score model for model_type {model_type!r}; supported model types: {sorted(SCORE_MODEL_CLASSES)}"
            )
        return SCORE_MODEL_CLASSES[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a score model, or initialise one from a causal-LM checkpoint (fresh score head).

        Extra keyword arguments go to `from_pretrained` (e.g. `dtype`) or override the score
        config (`score_type`, `do_normalize`, `normalizer_type`, `momentum`, `score_dim`, ...).
        """
        config = kwargs.get("config")
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        model_class = cls.model_class_for(getattr(config, "model_type", None))
        return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config, **score_kwargs):
        """A randomly initialised score model for `config`."""
        return cls.model_class_for(getattr(config, "model_type", None))(config, **score_kwargs)
