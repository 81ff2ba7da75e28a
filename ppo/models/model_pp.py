"""Pipeline-parallel (Pipe) variants of the PPO policy and value models.

They are PaddleNLP's `LlamaForCausalLMPipe` / `Qwen2ForCausalLMPipe` (a `PipelineLayer` built
from `LayerDesc`s: embedding, decoder layers, final norm, head) with PPO losses computed in the
last stage:

- `LlamaPolicyPipe` / `Qwen2PolicyPipe`: the LM head's logits go into the clipped PPO actor loss,
  plus ptx_coeff x the supervised LM loss when the micro-batch carries supervised rows.
- `LlamaValuePipe` / `Qwen2ValuePipe`: the LM head is replaced by a score head
  (hidden -> score_dim, saved as `score_head.*` like the plain score models), whose per-token
  scores go into the clipped critic loss.

The losses are the pure functions of `ppo.models.ppo_model_utils`. Inputs travel through the
stages as (input_ids, attention_mask, position_ids); labels are built by
`ppo.models.pp_model_utils.prepare_policy_pipeline_inputs` / `prepare_value_pipeline_inputs`
from the same trainer step inputs the non-pipeline trainers receive.

Saved checkpoints use the plain parameter names (PaddleNLP's Pipe `state_dict` maps them), so a
policy loads into `LlamaForCausalLM` and a value model into `LlamaModelForScore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple, Type

import paddle
from paddle import nn
from paddle.distributed.fleet.meta_parallel import LayerDesc, SharedLayerDesc
from paddlenlp.transformers.llama.modeling_pp import (
    LlamaDecoderLayerPipe,
    LlamaEmbeddingPipe,
    LlamaForCausalLMPipe,
    LlamaLMHeadPipe,
    LlamaRMSNormPipe,
)
from paddlenlp.transformers.qwen2.modeling_pp import (
    Qwen2DecoderLayerPipe,
    Qwen2EmbeddingPipe,
    Qwen2ForCausalLMPipe,
    Qwen2LMHeadPipe,
    Qwen2RMSNormPipe,
)

from ppo.models.parallel_utils import check_score_model_parallel_config, score_model_tensor_parallel_mappings
from ppo.models.pp_model_utils import (
    PipeLayerSpec,
    PipeNameMapping,
    PipelineLayout,
    pipe_name_mapping,
    prepare_policy_pipeline_inputs,
    prepare_value_pipeline_inputs,
)
from ppo.models.ppo_model_utils import (
    Reduction,
    actor_clipped_loss,
    critic_clipped_loss,
    gather_log_probs,
    supervised_lm_loss,
)
from ppo.models.score_model_utils import apply_score_config

# --------------------------------------------------------------------------------------------
# Losses of the last stage
# --------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    valid = [choice.value for choice in Reduction]
    if reduction not in valid:
        raise ValueError(f"unknown loss reduction {reduction!r}; valid choices are {valid}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The PPO arguments that shape the actor loss (see `PPOTrainingArguments`)."""

    clip_range_ratio: float
    temperature: float = 1.0
    ptx_coeff: float = 0.0
    reduction: str = Reduction.TOKEN_MEAN.value

    def __post_init__(self):
        if not self.clip_range_ratio > 0:
            raise ValueError(f"clip_range_ratio must be > 0, got {self.clip_range_ratio}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.ptx_coeff < 0:
            raise ValueError(f"ptx_coeff must be >= 0, got {self.ptx_coeff}")
        _check_reduction(self.reduction)

    @classmethod
    def from_args(cls, args) -> "PolicyLossConfig":
        return cls(args.clip_range_ratio, args.temperature, args.ptx_coeff, args.loss_reduction)


@dataclass(frozen=True)
class ValueLossConfig:
    """The PPO arguments that shape the critic loss."""

    clip_range_value: float
    reduction: str = Reduction.TOKEN_MEAN.value

    def __post_init__(self):
        if not self.clip_range_value > 0:
            raise ValueError(f"clip_range_value must be > 0, got {self.clip_range_value}")
        _check_reduction(self.reduction)

    @classmethod
    def from_args(cls, args) -> "ValueLossConfig":
        return cls(args.clip_range_value, args.loss_reduction)


class PolicyPipeLoss(nn.Layer):
    """loss_fn of the Pipe policy: actor_clipped_loss on temperature-scaled log-probs, plus
    ptx_coeff x supervised_lm_loss on the raw logits when ptx labels are present."""

    def __init__(self, loss_config: PolicyLossConfig):
        super().__init__()
        self.loss_config = loss_config

    def forward(self, logits: paddle.Tensor, labels: Tuple[paddle.Tensor, ...]) -> paddle.Tensor:
        # logits [N, L, V]; labels see pp_model_utils.policy_pipeline_micro_batch
        if len(labels) not in (4, 5):
            raise ValueError(
                "policy pipeline labels must be (input_ids, old_log_probs, advantages, action_mask[, ptx_labels]), "
                f"got {len(labels)} tensors"
            )
        input_ids, old_log_probs, advantages, action_mask = labels[:4]
        config = self.loss_config
        scaled_logits = logits[:, :-1].astype("float32") / config.temperature
        log_probs = gather_log_probs(scaled_logits, input_ids[:, 1:])  # [N, L-1]
        loss = actor_clipped_loss(
            log_probs, old_log_probs, advantages, action_mask, config.clip_range_ratio, config.reduction
        )
        if len(labels) == 5 and config.ptx_coeff > 0:
            loss = loss + config.ptx_coeff * supervised_lm_loss(logits.astype("float32"), labels[4])
        return loss


class ValuePipeLoss(nn.Layer):
    """loss_fn of the Pipe value model: critic_clipped_loss on the first score dimension."""

    def __init__(self, loss_config: ValueLossConfig):
        super().__init__()
        self.loss_config = loss_config

    def forward(self, scores: paddle.Tensor, labels: Tuple[paddle.Tensor, ...]) -> paddle.Tensor:
        # scores [B, L, D]; labels = (old_values, returns, action_mask), each [B, L-1]
        if len(labels) != 3:
            raise ValueError(f"value pipeline labels must be (old_values, returns, action_mask), got {len(labels)} tensors")
        old_values, returns, action_mask = labels
        values = scores[:, :-1, 0].astype("float32")  # [B, L-1]
        config = self.loss_config
        return critic_clipped_loss(values, old_values, returns, action_mask, config.clip_range_value, config.reduction)


class ScoreHeadPipe(nn.Linear):
    """The last stage of a Pipe value model: hidden [B, L, H] -> scores [B, L, score_dim].

    Replicated under tensor parallel, like the plain score models' head (see parallel_utils).
    """

    def __init__(self, config):
        check_score_model_parallel_config(config)
        super().__init__(config.hidden_size, config.score_dim, bias_attr=None if config.score_bias else False)


# --------------------------------------------------------------------------------------------
# Layer sequences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeFamily:
    """The PaddleNLP Pipe layer classes of one backbone and the prefix of its plain names."""

    prefix: str
    embedding: type
    decoder: type
    norm: type
    lm_head: type

    @property
    def decoder_layer_name(self) -> str:
        """What PaddleNLP's `layer:<name>` segmentation matches for this backbone."""
        return self.decoder.__name__[: -len("Pipe")] if self.decoder.__name__.endswith("Pipe") else self.decoder.__name__


PIPE_FAMILIES: Dict[str, PipeFamily] = {
    "llama": PipeFamily("llama", LlamaEmbeddingPipe, LlamaDecoderLayerPipe, LlamaRMSNormPipe, LlamaLMHeadPipe),
    "qwen2": PipeFamily("qwen2", Qwen2EmbeddingPipe, Qwen2DecoderLayerPipe, Qwen2RMSNormPipe, Qwen2LMHeadPipe),
}


def pipe_family(model_type: str) -> PipeFamily:
    if model_type not in PIPE_FAMILIES:
        raise ValueError(f"no Pipe model for model_type {model_type!r}; supported model types: {sorted(PIPE_FAMILIES)}")
    return PIPE_FAMILIES[model_type]


def backbone_pipe_specs(family: PipeFamily, num_hidden_layers: int) -> List[PipeLayerSpec]:
    """Embedding, decoder layers and final norm, with the prefixes PaddleNLP registers."""
    return (
        [PipeLayerSpec(family.embedding, family.prefix, "embed_tokens")]
        + [PipeLayerSpec(family.decoder, f"{family.prefix}.layers.{i}") for i in range(num_hidden_layers)]
        + [PipeLayerSpec(family.norm, family.prefix, "norm")]
    )


def causal_lm_pipe_specs(config) -> List[PipeLayerSpec]:
    """Layer sequence of `LlamaForCausalLMPipe`-style models (also our policy Pipe)."""
    family = pipe_family(config.model_type)
    return backbone_pipe_specs(family, config.num_hidden_layers) + [PipeLayerSpec(family.lm_head, "lm_head")]


def value_pipe_specs(config) -> List[PipeLayerSpec]:
    """Layer sequence of the value Pipe: the LM head is replaced by the score head."""
    family = pipe_family(config.model_type)
    return backbone_pipe_specs(family, config.num_hidden_layers) + [PipeLayerSpec(ScoreHeadPipe, "score_head")]


# --------------------------------------------------------------------------------------------
# Pipe models
# --------------------------------------------------------------------------------------------


class _PipeNamingMixin:
    """Name mappings of an instantiated Pipe model and of its layout for any degree."""

    @classmethod
    def pipe_layer_specs(cls, config) -> List[PipeLayerSpec]:
        raise NotImplementedError

    @classmethod
    def name_mapping_for(cls, config, pp_degree: int, virtual_pp_degree: int = 1) -> PipeNameMapping:
        """The mapping of this model split over `pp_degree` stages, without instantiating it."""
        family = pipe_family(config.model_type)
        return pipe_name_mapping(
            cls.pipe_layer_specs(config),
            pp_degree,
            virtual_pp_degree,
            decoder_layer_name=family.decoder_layer_name,
            num_hidden_layers=config.num_hidden_layers,
        )

    def name_mapping(self) -> PipeNameMapping:
        """The mapping of this instance, with the segmentation its PipelineLayer actually used."""
        virtual_pp_degree = self.get_num_virtual_stages()
        pp_degree = (len(self.segment_parts) - 1) // virtual_pp_degree
        layout = PipelineLayout(tuple(self.segment_parts), pp_degree, virtual_pp_degree)
        return PipeNameMapping(self.pipe_layer_specs(self.config), layout)


class _PolicyPipeMixin(_PipeNamingMixin):
    _loss_config: PolicyLossConfig

    def _setup_policy(self, config, loss_config) -> None:
        if not isinstance(loss_config, PolicyLossConfig):
            raise TypeError(
                f"{type(self).__name__} needs loss_config=PolicyLossConfig(...) (clip_range_ratio, temperature, "
                f"ptx_coeff, reduction of the PPO run), got {loss_config!r}"
            )
        if config.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=True is not supported by the Pipe policy: the embedding and LM head "
                "then share one weight across the first and last stages, which the rollout weight sync "
                "(eval_mode) cannot place; untie them or train without pipeline parallel"
            )
        self._loss_config = loss_config
        # The actor loss takes log-softmax over the whole vocabulary; with tensor parallel the LM
        # head must gather its vocabulary slices instead of returning this rank's slice.
        config.tensor_parallel_output = False

    def get_loss_fn(self, config):
        return PolicyPipeLoss(self._loss_config)

    @classmethod
    def pipe_layer_specs(cls, config) -> List[PipeLayerSpec]:
        return causal_lm_pipe_specs(config)

    @classmethod
    def _prepare_pipeline_inputs_func(cls, inputs):
        return prepare_policy_pipeline_inputs(inputs)


class _ValuePipeMixin(_PipeNamingMixin):
    _loss_config: ValueLossConfig
    # No LM head, so nothing is tied to the embedding.
    _tied_weights_keys = None

    def _setup_value(self, config, loss_config, score_kwargs) -> None:
        if not isinstance(loss_config, ValueLossConfig):
            raise TypeError(
                f"{type(self).__name__} needs loss_config=ValueLossConfig(clip_range_value, reduction), got {loss_config!r}"
            )
        apply_score_config(config, dict(score_kwargs))
        if config.do_normalize and config.score_type != "critic":
            raise ValueError(
                "the value model trains on raw head scores, but this config normalises "
                f"{config.score_type!r} scores; load the critic with score_type='critic' or do_normalize=False"
            )
        self._loss_config = loss_config

    @classmethod
    def _get_tensor_parallel_mappings(cls, config, is_split=True):
        # Like the plain score models: the backbone's actions, no LM head, score head replicated.
        return score_model_tensor_parallel_mappings(super()._get_tensor_parallel_mappings(config, is_split=is_split))

    def add_sequential_layer(self, layer_desc, name_prefix=""):
        # PaddleNLP's causal-LM Pipe registers its layers through this hook; the value model keeps
        # the backbone and swaps the LM head for the score head.
        if name_prefix == "lm_head":
            layer_desc, name_prefix = LayerDesc(ScoreHeadPipe, config=self.config), "score_head"
        elif isinstance(layer_desc, SharedLayerDesc):
            # Tied word embeddings share the LM head's weight; without an LM head the embedding
            # is an ordinary layer (and keeps its plain parameter names).
            layer_desc = LayerDesc(layer_desc.layer_func, *layer_desc.inputs, **layer_desc.kwargs)
        super().add_sequential_layer(layer_desc, name_prefix)

    def get_loss_fn(self, config):
        return ValuePipeLoss(self._loss_config)

    @classmethod
    def pipe_layer_specs(cls, config) -> List[PipeLayerSpec]:
        return value_pipe_specs(config)

    @classmethod
    def _prepare_pipeline_inputs_func(cls, inputs):
        return prepare_value_pipeline_inputs(inputs)


class LlamaPolicyPipe(_PolicyPipeMixin, LlamaForCausalLMPipe):
    """`LlamaForCausalLMPipe` whose last stage computes the PPO actor (+ptx) loss."""

    def __init__(self, config, loss_config: PolicyLossConfig = None):
        self._setup_policy(config, loss_config)
        super().__init__(config)


class Qwen2PolicyPipe(_PolicyPipeMixin, Qwen2ForCausalLMPipe):
    """`Qwen2ForCausalLMPipe` whose last stage computes the PPO actor (+ptx) loss."""

    def __init__(self, config, loss_config: PolicyLossConfig = None):
        self._setup_policy(config, loss_config)
        super().__init__(config)


class LlamaValuePipe(_ValuePipeMixin, LlamaForCausalLMPipe):
    """Llama Pipe value model: backbone + score head, clipped critic loss in the last stage."""

    def __init__(self, config, loss_config: ValueLossConfig = None, **score_kwargs):
        self._setup_value(config, loss_config, score_kwargs)
        super().__init__(config)


class Qwen2ValuePipe(_ValuePipeMixin, Qwen2ForCausalLMPipe):
    """Qwen2 Pipe value model: backbone + score head, clipped critic loss in the last stage."""

    def __init__(self, config, loss_config: ValueLossConfig = None, **score_kwargs):
        self._setup_value(config, loss_config, score_kwargs)
        super().__init__(config)


# (model_type, role) -> Pipe class
PIPE_MODEL_CLASSES: Dict[Tuple[str, str], Type[_PipeNamingMixin]] = {
    ("llama", "policy"): LlamaPolicyPipe,
    ("qwen2", "policy"): Qwen2PolicyPipe,
    ("llama", "value"): LlamaValuePipe,
    ("qwen2", "value"): Qwen2ValuePipe,
}


def pipe_model_class(model_type: str, role: str) -> Type[_PipeNamingMixin]:
    """The Pipe class for a backbone (`config.model_type`) and a role ("policy" or "value")."""
    if (model_type, role) not in PIPE_MODEL_CLASSES:
        choices = sorted(f"{m}/{r}" for m, r in PIPE_MODEL_CLASSES)
        raise ValueError(f"no Pipe model for model_type={model_type!r}, role={role!r}; available: {choices}")
    return PIPE_MODEL_CLASSES[(model_type, role)]
