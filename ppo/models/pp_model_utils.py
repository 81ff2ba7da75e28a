"""Pipeline-parallel bookkeeping that needs no communication: which stage builds which layer,
how a Pipe model names its parameters, and how PPO batches become pipeline inputs.

A PaddleNLP Pipe model is a flat sequence of layers (embedding, decoder layers, final norm, head),
each registered with the plain-model prefix of its parameters (`add_sequential_layer(desc,
"llama.layers.3")`). Paddle's `PipelineLayer` cuts the sequence into `pp_degree *
virtual_pp_degree` segments with `SegmentLayers`; stage s builds segments s, s + pp_degree, ...
and names a parameter after the layer's global index: `"{index}.{local}"`, or with virtual stages
`"{segment_start}.{index - segment_start}.{local}"`. `PipelineLayout` reproduces that cut with
Paddle's own `SegmentLayers`; `PipeNameMapping` translates names both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import paddle
from paddle.distributed.fleet.meta_parallel.parallel_layers.pp_layers import SegmentLayers

from ppo.data.base import IGNORE_INDEX
from ppo.models.ppo_model_utils import make_position_ids

# --------------------------------------------------------------------------------------------
# Layout: which stage builds which layer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeLayerSpec:
    """One entry of a Pipe model's layer sequence.

    layer_class: the Pipe layer class (segmentation by "layer:<name>" matches its class name)
    name_prefix: the plain-model prefix PaddleNLP records for it ("llama", "llama.layers.3")
    owns:        first component(s) of the local parameter names this layer holds, when several
                 layers share one prefix ("embed_tokens" and "norm" both live under "llama");
                 "" when the layer owns everything under its prefix
    """

    layer_class: type
    name_prefix: str
    owns: str = ""

    @property
    def plain_prefix(self) -> str:
        """Plain names of this layer's parameters start with this (plus a dot)."""
        return ".".join(part for part in (self.name_prefix, self.owns) if part)

    def plain_name(self, local_name: str) -> str:
        return f"{self.name_prefix}.{local_name}" if self.name_prefix else local_name

    def local_name(self, plain_name: str) -> str:
        return plain_name[len(self.name_prefix) + 1 :] if self.name_prefix else plain_name


def default_seg_method(decoder_layer_name: str, num_hidden_layers: int, pp_degree: int) -> str:
    """PaddleNLP's choice for its Llama/Qwen2 Pipe models: split by decoder layers when they divide
    evenly across stages, else uniformly over all layers."""
    return f"layer:{decoder_layer_name}" if num_hidden_layers % pp_degree == 0 else "uniform"


@dataclass(frozen=True)
class PipelineLayout:
    """How a layer sequence is cut into pipeline stages.

    segment_parts: boundaries of the pp_degree * virtual_pp_degree consecutive segments
                   (segment i holds layers [segment_parts[i], segment_parts[i+1]))
    Stage s holds segments s, s + pp_degree, s + 2·pp_degree, ... (one per virtual stage).
    """

    segment_parts: Tuple[int, ...]
    pp_degree: int
    virtual_pp_degree: int = 1

    def __post_init__(self):
        parts = self.segment_parts
        expected = self.pp_degree * self.virtual_pp_degree + 1
        if len(parts) != expected:
            raise ValueError(f"segment_parts needs {expected} boundaries for {self.pp_degree} stages x "
                             f"{self.virtual_pp_degree} virtual stages, got {list(parts)}")
        if parts[0] != 0 or any(b < a for a, b in zip(parts, parts[1:])):
            raise ValueError(f"segment_parts must start at 0 and never decrease, got {list(parts)}")

    @property
    def num_layers(self) -> int:
        return self.segment_parts[-1]

    @property
    def uses_virtual_stages(self) -> bool:
        return self.virtual_pp_degree > 1

    def chunks(self, stage: int) -> List[range]:
        """The layer-index ranges stage `stage` builds, in virtual-stage order."""
        if not 0 <= stage < self.pp_degree:
            raise ValueError(f"stage must be in [0, {self.pp_degree}), got {stage}")
        total = self.pp_degree * self.virtual_pp_degree
        return [range(self.segment_parts[i], self.segment_parts[i + 1]) for i in range(stage, total, self.pp_degree)]

    def locate(self, index: int) -> Tuple[int, int]:
        """(stage, start of its segment) of layer `index`."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index {index} outside [0, {self.num_layers})")
        for segment in range(len(self.segment_parts) - 1):
            start, end = self.segment_parts[segment], self.segment_parts[segment + 1]
            if start <= index < end:
                return segment % self.pp_degree, start
        raise AssertionError("unreachable: boundaries cover [0, num_layers)")

    def pipe_name(self, index: int, local_name: str) -> str:
        if not self.uses_virtual_stages:
            return f"{index}.{local_name}"
        _, start = self.locate(index)
        return f"{start}.{index - start}.{local_name}"

    def parse_pipe_name(self, pipe_name: str) -> Tuple[int, str]:
        """(global layer index, local parameter name) of a Pipe parameter name."""
        parts = pipe_name.split(".")
        if parts[0] in ("shared_layers", "local_shared_layers"):
            raise ValueError(
                f"{pipe_name!r} belongs to a shared (tied) layer; tied word embeddings are not supported "
                f"by the pipeline weight conversion (set tie_word_embeddings=false)"
            )
        try:
            if self.uses_virtual_stages:
                index, local = int(parts[0]) + int(parts[1]), parts[2:]
            else:
                index, local = int(parts[0]), parts[1:]
        except (ValueError, IndexError):
            raise ValueError(f"{pipe_name!r} is not a Pipe parameter name of this layout") from None
        if not local or not 0 <= index < self.num_layers:
            raise ValueError(f"{pipe_name!r} is not a Pipe parameter name of this layout")
        return index, ".".join(local)


def pipeline_layout(
    layer_classes: Sequence[type],
    pp_degree: int,
    virtual_pp_degree: int = 1,
    seg_method: str = "uniform",
) -> PipelineLayout:
    """Cut a layer sequence the way Paddle's `PipelineLayer` does (same `SegmentLayers`)."""
    if pp_degree < 1 or virtual_pp_degree < 1:
        raise ValueError(f"pp_degree and virtual_pp_degree must be >= 1, got {pp_degree}, {virtual_pp_degree}")
    total = pp_degree * virtual_pp_degree
    if virtual_pp_degree > 1 and not seg_method.startswith("layer:"):
        raise ValueError(
            f"virtual_pp_degree={virtual_pp_degree} (interleaved schedule) needs a 'layer:<Name>' seg_method, "
            f"got {seg_method!r}; the decoder layers must divide evenly into pp_degree * virtual_pp_degree parts"
        )
    if len(layer_classes) < pp_degree:
        raise ValueError(f"{len(layer_classes)} layers cannot fill {pp_degree} pipeline stages")
    if seg_method.startswith("layer:"):
        name = seg_method.split(":", 1)[1].lower()
        matching = sum(name in cls.__name__.lower() for cls in layer_classes)
        if matching == 0 or matching % total:
            raise ValueError(
                f"seg_method {seg_method!r} matches {matching} layers, which cannot be split evenly into "
                f"{pp_degree} stages x {virtual_pp_degree} virtual stages; change num_hidden_layers, "
                f"pipeline_parallel_degree or virtual_pp_degree"
            )
    segmenter = SegmentLayers(
        list(layer_classes),
        num_parts=pp_degree,
        method=seg_method,
        num_virtual_pipeline_stage=virtual_pp_degree if virtual_pp_degree > 1 else None,
    )
    return PipelineLayout(tuple(segmenter.do_segment()), pp_degree, virtual_pp_degree)


# --------------------------------------------------------------------------------------------
# Names: Pipe <-> plain model
# --------------------------------------------------------------------------------------------


class PipeNameMapping:
    """Bijection between a Pipe model's parameter names (all stages) and the plain model's names."""

    def __init__(self, specs: Sequence[PipeLayerSpec], layout: PipelineLayout):
        if len(specs) != layout.num_layers:
            raise ValueError(f"{len(specs)} layer specs for a layout of {layout.num_layers} layers")
        self.specs = list(specs)
        self.layout = layout
        self._layer_by_prefix: Dict[str, int] = {}
        for index, spec in enumerate(self.specs):
            if spec.plain_prefix in self._layer_by_prefix:
                other = self._layer_by_prefix[spec.plain_prefix]
                raise ValueError(f"layers {other} and {index} both claim plain names under {spec.plain_prefix!r}")
            self._layer_by_prefix[spec.plain_prefix] = index

    def layer_of(self, plain_name: str) -> int:
        """Index of the layer holding `plain_name` (longest matching prefix wins)."""
        parts = plain_name.split(".")
        for length in range(len(parts) - 1, -1, -1):
            index = self._layer_by_prefix.get(".".join(parts[:length]))
            if index is not None:
                return index
        raise KeyError(f"{plain_name!r} belongs to no layer of this Pipe model")

    def to_pipe(self, plain_name: str) -> str:
        index = self.layer_of(plain_name)
        return self.layout.pipe_name(index, self.specs[index].local_name(plain_name))

    def to_plain(self, pipe_name: str) -> str:
        index, local = self.layout.parse_pipe_name(pipe_name)
        spec = self.specs[index]
        if spec.owns and not (local == spec.owns or local.startswith(spec.owns + ".")):
            raise ValueError(f"{pipe_name!r}: layer {index} ({spec.layer_class.__name__}) holds only {spec.owns}.*")
        return spec.plain_name(local)

    def stage_of(self, plain_name: str) -> int:
        return self.layout.locate(self.layer_of(plain_name))[0]

    def split_by_stage(self, plain_state: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """A plain state dict -> one Pipe-named state dict per stage."""
        stages: List[Dict[str, Any]] = [{} for _ in range(self.layout.pp_degree)]
        for plain_name, value in plain_state.items():
            stages[self.stage_of(plain_name)][self.to_pipe(plain_name)] = value
        return stages

    def join_stages(self, stage_states: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        """One Pipe-named state dict per stage -> the plain state dict (each name exactly once)."""
        plain: Dict[str, Any] = {}
        for stage, state in enumerate(stage_states):
            for pipe_name, value in state.items():
                index, _ = self.layout.parse_pipe_name(pipe_name)
                owner = self.layout.locate(index)[0]
                if owner != stage:
                    raise ValueError(f"{pipe_name!r} came from stage {stage} but layer {index} belongs to stage {owner}")
                plain_name = self.to_plain(pipe_name)
                if plain_name in plain:
                    raise ValueError(f"{plain_name!r} appears twice among the stages")
                plain[plain_name] = value
        return plain


def pipe_name_mapping(
    specs: Sequence[PipeLayerSpec],
    pp_degree: int,
    virtual_pp_degree: int = 1,
    seg_method: Optional[str] = None,
    decoder_layer_name: Optional[str] = None,
    num_hidden_layers: Optional[int] = None,
) -> PipeNameMapping:
    """Mapping for a Pipe model that has not been (or cannot be) instantiated here; `seg_method`
    defaults to PaddleNLP's rule (see `default_seg_method`)."""
    if seg_method is None:
        if decoder_layer_name is None or num_hidden_layers is None:
            raise ValueError("pass seg_method, or decoder_layer_name and num_hidden_layers to derive it")
        seg_method = default_seg_method(decoder_layer_name, num_hidden_layers, pp_degree)
    layout = pipeline_layout([spec.layer_class for spec in specs], pp_degree, virtual_pp_degree, seg_method)
    return PipeNameMapping(specs, layout)


# --------------------------------------------------------------------------------------------
# Pipeline inputs from PPO batches
# --------------------------------------------------------------------------------------------
# Paddle's pipeline engine slices every tensor as `data[begin:end, :]`, so every input and label
# is at least 2-D. Each micro-batch travels as its own list element (the engine then takes
# micro-batch i whole), which lets micro-batches differ in batch size and sequence length.
# The first stage receives PaddleNLP's four input slots (input_ids, attention_mask,
# attn_mask_startend_row_indices, position_ids) with the third left empty: Qwen2's Pipe embedding
# reads a 3-tuple's last entry as attention row indices, and on GPU Llama's reads an int64 mask
# as position ids, so attention_mask is bool and position_ids sits in the fourth slot.

PipelineMicroBatch = Tuple[Tuple[Optional[paddle.Tensor], ...], Tuple[paddle.Tensor, ...]]  # (inputs, labels)


def _first_stage_inputs(input_ids, attention_mask, position_ids) -> Tuple[Optional[paddle.Tensor], ...]:
    return (input_ids.astype("int64"), attention_mask.astype("bool"), None, position_ids.astype("int64"))


def _right_pad(x: paddle.Tensor, length: int, value) -> paddle.Tensor:
    """[B, T] -> [B, length], padding on the right with `value`."""
    missing = length - x.shape[1]
    if missing < 0:
        raise ValueError(f"cannot pad a tensor of length {x.shape[1]} to {length}")
    if missing == 0:
        return x
    return paddle.concat([x, paddle.full([x.shape[0], missing], value, dtype=x.dtype)], axis=1)


def _as_tensor(value, dtype: str) -> paddle.Tensor:
    tensor = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
    return tensor.astype(dtype)


def policy_pipeline_micro_batch(experience, ptx_batch: Optional[Mapping[str, Any]] = None) -> PipelineMicroBatch:
    """One actor micro-batch for the Pipe policy.

    inputs = (input_ids [N, L], attention_mask [N, L] bool, None, position_ids [N, L])
    labels = (input_ids [N, L], old_log_probs [N, L-1], advantages [N, L-1], action_mask [N, L-1])
             + (ptx_labels [N, L],) when a supervised batch is given.

    With ptx, the supervised rows are appended below the experience rows (both right-padded to a
    common length; padding is masked out of attention and of both losses): experience rows carry
    only IGNORE_INDEX ptx labels, supervised rows an all-False action mask. One forward and one
    backward then give exactly the gradient of actor_loss + ptx_coeff · ptx_loss, as the
    non-pipeline actor step computes it.
    """
    input_ids = experience.input_ids.astype("int64")
    attention_mask = experience.attention_mask.astype("bool")
    position_ids = experience.position_ids.astype("int64")
    old_log_probs = experience.old_log_probs.astype("float32")
    advantages = experience.advantages.astype("float32")
    action_mask = experience.action_mask.astype("bool")
    if ptx_batch is None:
        inputs = _first_stage_inputs(input_ids, attention_mask, position_ids)
        return inputs, (input_ids, old_log_probs, advantages, action_mask)

    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in ptx_batch]
    if missing:
        raise KeyError(f"the ptx batch needs input_ids, attention_mask and labels; missing {missing}")
    ptx_ids = _as_tensor(ptx_batch["input_ids"], "int64")
    ptx_mask = _as_tensor(ptx_batch["attention_mask"], "bool")
    ptx_labels = _as_tensor(ptx_batch["labels"], "int64")
    length = max(input_ids.shape[1], ptx_ids.shape[1])
    num_rows, num_ptx_rows = input_ids.shape[0], ptx_ids.shape[0]

    # Padded positions hold token 0: they are masked out, so the id only has to be a valid index.
    all_ids = paddle.concat([_right_pad(input_ids, length, 0), _right_pad(ptx_ids, length, 0)])
    all_mask = paddle.concat([_right_pad(attention_mask, length, False), _right_pad(ptx_mask, length, False)])
    all_positions = paddle.concat(
        [_right_pad(position_ids, length, 0), _right_pad(make_position_ids(ptx_mask), length, 0)]
    )

    def per_token(x, pad_value):  # [B, L-1] experience field -> [N, length-1]
        padded = _right_pad(x, length - 1, pad_value)
        filler = paddle.full([num_ptx_rows, length - 1], pad_value, dtype=x.dtype)
        return paddle.concat([padded, filler])

    all_ptx_labels = paddle.concat(
        [
            paddle.full([num_rows, length], IGNORE_INDEX, dtype="int64"),
            _right_pad(ptx_labels, length, IGNORE_INDEX),
        ]
    )
    inputs = _first_stage_inputs(all_ids, all_mask, all_positions)
    labels = (
        all_ids,
        per_token(old_log_probs, 0.0),
        per_token(advantages, 0.0),
        per_token(action_mask, False),
        all_ptx_labels,
    )
    return inputs, labels


def value_pipeline_micro_batch(experience) -> PipelineMicroBatch:
    """One critic micro-batch for the Pipe value model.

    inputs = (input_ids [B, L], attention_mask [B, L] bool, None, position_ids [B, L])
    labels = (old_values [B, L-1], returns [B, L-1], action_mask [B, L-1])
    """
    inputs = _first_stage_inputs(experience.input_ids, experience.attention_mask, experience.position_ids)
    labels = (
        experience.old_values.astype("float32"),
        experience.returns.astype("float32"),
        experience.action_mask.astype("bool"),
    )
    return inputs, labels


def _with_ptx_labels(micro_batch: PipelineMicroBatch) -> PipelineMicroBatch:
    """Give a policy micro-batch without ptx an all-IGNORE_INDEX ptx label (ptx loss 0), so that
    every micro-batch of one pipeline call has the same label structure."""
    inputs, labels = micro_batch
    if len(labels) == 5:
        return micro_batch
    input_ids = labels[0]
    return inputs, labels + (paddle.full(input_ids.shape, IGNORE_INDEX, dtype="int64"),)


def stack_micro_batches(micro_batches: Sequence[PipelineMicroBatch]) -> List[Tuple[List[paddle.Tensor], ...]]:
    """[inputs, labels] for Paddle's pipeline engine: every position of the input and label tuples
    becomes a list with one tensor per micro-batch."""
    if not micro_batches:
        raise ValueError("a pipeline step needs at least one micro-batch")
    label_arities = {len(labels) for _, labels in micro_batches}
    if label_arities == {4, 5}:  # policy micro-batches with and without ptx
        micro_batches = [_with_ptx_labels(micro_batch) for micro_batch in micro_batches]
    elif len(label_arities) > 1:
        raise ValueError(f"micro-batches of one pipeline step have different label structures: {sorted(label_arities)}")
    inputs = tuple(list(column) for column in zip(*(inputs for inputs, _ in micro_batches)))
    labels = tuple(list(column) for column in zip(*(labels for _, labels in micro_batches)))
    return [inputs, labels]


def _training_inputs(inputs) -> List[Mapping[str, Any]]:
    """The PPO trainers' `training_step` inputs ({"experience": ..., ...}), one or buffered."""
    items = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    for item in items:
        if not isinstance(item, Mapping) or "experience" not in item:
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"pipeline PPO inputs must be dicts with an 'experience' entry, got {keys}")
    return items


def prepare_policy_pipeline_inputs(inputs) -> List[Tuple[List[paddle.Tensor], ...]]:
    """`_prepare_pipeline_inputs_func` of the Pipe policy: the actor trainer's step inputs
    ({"experience": Experience, "ptx_batch": dict | None, ...}, or the list PaddleNLP buffers over
    gradient accumulation) -> [inputs, labels] for the pipeline engine."""
    return stack_micro_batches(
        [policy_pipeline_micro_batch(item["experience"], item.get("ptx_batch")) for item in _training_inputs(inputs)]
    )


def prepare_value_pipeline_inputs(inputs) -> List[Tuple[List[paddle.Tensor], ...]]:
    """`_prepare_pipeline_inputs_func` of the Pipe value model (see `prepare_policy_pipeline_inputs`)."""
    return stack_micro_batches([value_pipeline_micro_batch(item["experience"]) for item in _training_inputs(inputs)])
