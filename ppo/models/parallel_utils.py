"""Tensor-parallel weight conversion: split a full state dict into TP shards, merge shards back,
and merge a tensor/pipeline-parallel checkpoint directory into one plain model directory.

All conversions go through PaddleNLP's own per-model name mappings
(`cls._get_tensor_parallel_mappings` resolved by `cls.get_tensor_parallel_convert_actions`), the
same actions `from_pretrained` uses to split a checkpoint on load and `save_pretrained(...,
merge_tensor_parallel=True)` uses to merge one on save. Nothing here needs tensor-parallel layers
or a communication group: arrays in, arrays out.

Score models keep the backbone's mappings and replicate `score_head` on every TP rank: its output
width is `score_dim` (usually 1), which cannot be divided across ranks, and its cost is negligible
next to the backbone. Its input (the final hidden states) is complete on every rank, so every rank
computes the same scores and the same head gradient; fleet broadcasts non-distributed parameters
across the model-parallel group when it wraps the model, so the copies also start identical.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import paddle

# Backbones whose attention asserts that key/value heads divide evenly across TP ranks (Llama
# instead replicates K/V on every rank when they do not divide, unless they are fused with Q).
_KV_HEADS_MUST_DIVIDE = {"qwen2"}

# The LM-head entries of the backbone mappings: a score model has no LM head.
_LM_HEAD_KEYS = ("lm_head.weight", "lm_head.bias")

# Weight files PaddleNLP writes per rank when it saves without merging: `model_state.tp01.pdparams`,
# `model_state.tp00_pp01.pdparams`, `model.tp01.safetensors`, ...
_SHARD_FILE = re.compile(
    r"^(?P<stem>model_state|model)\.(?P<variant>(?:tp\d+)?(?:_?pp\d+)?)\.(?P<ext>pdparams|safetensors)$"
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def check_tensor_parallel_degree(config, degree: int) -> None:
    """Explain, before any layer is built, why `config` cannot be split `degree` ways."""
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"tensor_parallel_degree must be an integer >= 1, got {degree!r}")
    if degree == 1:
        return
    problems = []
    if config.num_attention_heads % degree:
        problems.append(f"num_attention_heads={config.num_attention_heads}")
    if config.intermediate_size % degree:
        problems.append(f"intermediate_size={config.intermediate_size}")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv_heads % degree:
        if getattr(config, "model_type", None) in _KV_HEADS_MUST_DIVIDE:
            problems.append(f"num_key_value_heads={kv_heads} ({config.model_type} splits K/V heads across ranks)")
        elif getattr(config, "fuse_attention_qkv", False):
            problems.append(f"num_key_value_heads={kv_heads} (with fuse_attention_qkv=True K/V cannot be replicated)")
    if problems:
        raise ValueError(
            f"tensor_parallel_degree={degree} must divide {', '.join(problems)}; "
            f"choose a degree that divides all of them"
        )


def tensor_parallel_config(config, degree: int, rank: int):
    """A copy of `config` describing TP rank `rank` of `degree` (the mappings read these fields)."""
    check_tensor_parallel_degree(config, degree)
    if not 0 <= rank < degree:
        raise ValueError(f"tensor_parallel_rank must be in [0, {degree}), got {rank}")
    rank_config = copy.deepcopy(config)
    rank_config.tensor_parallel_degree = degree
    rank_config.tensor_parallel_rank = rank
    return rank_config


def check_score_model_parallel_config(config) -> None:
    """Score models read complete hidden states [B, L, H]; sequence parallel would hand the head a
    [B*L/n, H] slice of the sequence instead."""
    if getattr(config, "sequence_parallel", False) and getattr(config, "tensor_parallel_degree", 1) > 1:
        raise ValueError(
            "sequence_parallel is not supported for score/value models (the score head needs every "
            "position of the sequence); set sequence_parallel=false for them"
        )


# ---------------------------------------------------------------------------------------------
# Mappings
# ---------------------------------------------------------------------------------------------


def score_model_tensor_parallel_mappings(backbone_mappings: Dict[str, Any]) -> Dict[str, Any]:
    """TP actions of a score model: the backbone's, minus its LM head (absent from a score
    model); `score_head` has no entry, i.e. it is replicated (see the module docstring)."""
    return {key: action for key, action in backbone_mappings.items() if key not in _LM_HEAD_KEYS}


def tensor_parallel_actions(model_class, config, state_keys: Sequence[str], is_split: bool) -> Dict[str, Any]:
    """{state-dict key: split or merge action} for the keys of `state_keys` that are distributed;
    keys without an action are replicated on every TP rank."""
    actions = model_class.get_tensor_parallel_convert_actions(config, list(state_keys), is_split=is_split, ignore_error=True)
    present = set(state_keys)
    return {key: action for key, action in actions.items() if key in present}


def _to_numpy(value) -> np.ndarray:
    # bfloat16 tensors come out as uint16 arrays holding the same bits: fine for splitting and
    # for equality checks, which is all they are used for here.
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def split_state_dict(
    model_class, config, state_dict: Mapping[str, Any], degree: int
) -> List[Dict[str, np.ndarray]]:
    """The TP shards of a full (single-device) state dict, one dict of numpy arrays per rank."""
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    shards = []
    for rank in range(degree):
        actions = tensor_parallel_actions(model_class, tensor_parallel_config(config, degree, rank), list(arrays), True)
        shards.append({key: (actions[key](value) if key in actions else value) for key, value in arrays.items()})
    return shards


def merge_state_dicts(model_class, config, shards: Sequence[Mapping[str, Any]], check_replicated: bool = True) -> Dict[str, Any]:
    """One full state dict from the TP shards of every rank (in rank order). Values stay what they
    were given as: numpy arrays, or paddle tensors (which keeps bfloat16 intact).

    Distributed keys are concatenated by PaddleNLP's merge actions. Replicated keys must agree on
    every rank (`check_replicated`): ranks that drifted apart would otherwise be merged silently
    into whichever copy rank 0 holds.
    """
    if not shards:
        raise ValueError("merge_state_dicts needs the shards of at least one rank")
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            difference = sorted(set(shard) ^ set(keys))
            raise ValueError(f"TP rank {rank} holds different parameters than rank 0: {difference[:10]}")
    actions = tensor_parallel_actions(model_class, tensor_parallel_config(config, len(shards), 0), keys, False)
    merged = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        if key in actions:
            merged[key] = actions[key](parts)
            continue
        if check_replicated:
            first = _to_numpy(parts[0])
            for rank, part in enumerate(parts[1:], start=1):
                other = _to_numpy(part)
                if other.shape != first.shape or not np.array_equal(other, first):
                    raise ValueError(
                        f"replicated parameter {key!r} differs between TP rank 0 and rank {rank}; "
                        f"the ranks were not kept in sync"
                    )
        merged[key] = parts[0]
    return merged


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------


def find_parallel_shard_files(checkpoint_dir: str) -> Dict[Tuple[int, int], str]:
    """{(tp_rank, pp_stage): weight file} of a directory saved by PaddleNLP without merging."""
    found: Dict[Tuple[int, int], str] = {}
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "model*"))):
        match = _SHARD_FILE.match(os.path.basename(path))
        if match is None or not match.group("variant"):
            continue
        variant = match.group("variant")
        tp = re.search(r"tp(\d+)", variant)
        pp = re.search(r"pp(\d+)", variant)
        key = (int(tp.group(1)) if tp else 0, int(pp.group(1)) if pp else 0)
        if key in found:
            raise ValueError(f"{checkpoint_dir} holds two weight files for tp={key[0]} pp={key[1]}: {found[key]}, {path}")
        found[key] = path
    return found


def _load_weight_file(path: str) -> Dict[str, paddle.Tensor]:
    """CPU tensors of a .pdparams or .safetensors file (PaddleNLP's loader keeps bfloat16)."""
    from paddlenlp.transformers.model_utils import load_state_dict

    return load_state_dict(path, device="cpu")


def causal_lm_class_for(model_type: str):
    """The PaddleNLP causal-LM class of a supported backbone."""
    from paddlenlp.transformers import LlamaForCausalLM, Qwen2ForCausalLM

    classes = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    if model_type not in classes:
        raise ValueError(f"no causal LM for model_type {model_type!r}; supported model types: {sorted(classes)}")
    return classes[model_type]


def _plain_model_class(config, state_keys: Sequence[str]):
    """The non-pipeline class whose TP mappings describe the checkpoint: a score model when it
    holds a score head, else the causal LM of its model type."""
    from ppo.models.score_model import AutoModelForScore

    if any(key.startswith("score_head.") for key in state_keys):
        return AutoModelForScore.model_class_for(config.model_type)
    return causal_lm_class_for(config.model_type)


def merge_parallel_checkpoint(checkpoint_dir: str, output_dir: str, model_class: Optional[Type] = None) -> str:
    """Write `output_dir`: one plain PaddleNLP model directory (config, `model_state.pdparams`,
    tokenizer and generation files) from a directory whose weights were saved per TP rank and/or
    per pipeline stage (`model_state.tp00_pp01.pdparams`, ...).

    Pipeline stages already use the plain parameter names (PaddleNLP's Pipe `state_dict` maps
    them), so the stages of one TP rank are unioned; TP ranks are then merged with the model
    class's TP actions. Returns `output_dir`.
    """
    from paddlenlp.transformers import AutoConfig

    files = find_parallel_shard_files(checkpoint_dir)
    if not files:
        present = sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else "missing directory"
        raise FileNotFoundError(
            f"{checkpoint_dir} has no per-rank weight files (model_state.tpXX[_ppYY].pdparams or "
            f"model.tpXX[_ppYY].safetensors); found: {present}"
        )
    tp_ranks = sorted({tp for tp, _ in files})
    pp_stages = sorted({pp for _, pp in files})
    expected = {(tp, pp) for tp in range(len(tp_ranks)) for pp in range(len(pp_stages))}
    if set(files) != expected:
        missing = sorted(expected - set(files))
        raise ValueError(f"{checkpoint_dir} is incomplete: no weight file for (tp, pp) = {missing}")

    shards: List[Dict[str, paddle.Tensor]] = []
    for tp in tp_ranks:
        union: Dict[str, paddle.Tensor] = {}
        for pp in pp_stages:
            stage = _load_weight_file(files[(tp, pp)])
            overlap = sorted(set(stage) & set(union))
            if overlap:
                raise ValueError(f"pipeline stages of tp rank {tp} both hold {overlap[:5]}")
            union.update(stage)
        shards.append(union)

    config = AutoConfig.from_pretrained(checkpoint_dir)
    if model_class is None:
        model_class = _plain_model_class(config, list(shards[0]))
    merged = merge_state_dicts(model_class, config, shards) if len(shards) > 1 else shards[0]

    os.makedirs(output_dir, exist_ok=True)
    config.tensor_parallel_degree = 1
    config.tensor_parallel_rank = 0
    config.architectures = [model_class.__name__]
    config.save_pretrained(output_dir)
    paddle.save(merged, os.path.join(output_dir, "model_state.pdparams"))
    _copy_side_files(checkpoint_dir, output_dir)
    return output_dir


def _copy_side_files(source_dir: str, output_dir: str) -> None:
    """Tokenizer and generation files travel with the merged weights."""
    for path in glob.glob(os.path.join(source_dir, "*")):
        name = os.path.basename(path)
        if not os.path.isfile(path) or name == "config.json" or name.startswith("model"):
            continue
        if name.endswith((".json", ".model", ".txt", ".tiktoken")) or name == "tokenizer.model":
            shutil.copy2(path, os.path.join(output_dir, name))


# ---------------------------------------------------------------------------------------------
# Rollout model under pipeline parallel (eval_mode)
# ---------------------------------------------------------------------------------------------
# A Pipe model cannot generate: each rank holds only its stage. With `eval_mode` the trainer keeps
# a non-pipeline copy for rollout and refreshes its weights from the Pipe model after updates:
#   "single":          the full model on every rank (TP shards merged);
#   "tensor_parallel": a TP model with the training TP degree; each rank keeps its own shard.

EVAL_MODES = ("single", "tensor_parallel")


def check_eval_mode(eval_mode: str) -> None:
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES} under pipeline parallel, got {eval_mode!r}")


def check_pipeline_ppo_arguments(args) -> None:
    """What PPO needs under pipeline parallel beyond PaddleNLP's own checks (which already refuse
    sharding stage2/3 with pipeline parallel). No-op without pipeline parallel."""
    if getattr(args, "pipeline_parallel_degree", 1) <= 1:
        return
    problems = []
    if getattr(args, "eval_mode", None) not in EVAL_MODES:
        problems.append(
            f"eval_mode must be one of {EVAL_MODES} (a Pipe model cannot generate; rollout runs on a "
            f"non-pipeline copy of the weights), got {getattr(args, 'eval_mode', None)!r}"
        )
    if "disable_p2p_cache_shape" not in str(getattr(args, "pipeline_parallel_config", "") or "").split():
        problems.append(
            "pipeline_parallel_config must contain 'disable_p2p_cache_shape': rollout lengths (and ptx "
            "rows) change the shapes the stages exchange, and Paddle otherwise reuses the first shapes"
        )
    if problems:
        raise ValueError("pipeline parallel PPO: " + "; ".join(problems))


def eval_model_config(train_config, eval_mode: str):
    """Config of the non-pipeline rollout model for a Pipe model trained with `train_config`
    (whose tensor_parallel_degree / _rank describe this rank)."""
    check_eval_mode(eval_mode)
    config = copy.deepcopy(train_config)
    if eval_mode == "single":
        config.tensor_parallel_degree = 1
        config.tensor_parallel_rank = 0
    # Decoding steps have sequence length 1, which sequence parallel cannot split across ranks.
    config.sequence_parallel = False
    # Sampling and log-probs need the whole vocabulary, not this rank's slice of the logits.
    config.tensor_parallel_output = False
    return config


def _dtype_name(tensor: paddle.Tensor) -> str:
    return str(tensor.dtype).replace("paddle.", "")


def sync_eval_model_from_pipeline(pipe_model, eval_model, eval_mode: str, hcg=None) -> None:
    """Copy the weights of a pipeline-parallel model into the non-pipeline `eval_model` on every
    rank. Collective: every rank of the job calls it with its own stage and eval model.

    Each stage broadcasts its parameters (this rank's TP shard) over the pipeline group, one
    tensor at a time into the eval model, so no rank ever holds a second full copy. Under
    "single" with tensor-parallel training, the shards of the model-parallel group are gathered
    and merged with the eval model class's TP actions.
    """
    import paddle.distributed as dist
    from paddle.distributed import fleet

    check_eval_mode(eval_mode)
    hcg = hcg or fleet.get_hybrid_communicate_group()
    mapping = pipe_model.name_mapping()
    pp_group, stage = hcg.get_pipe_parallel_group(), hcg.get_stage_id()
    pp_degree = hcg.get_pipe_parallel_world_size()
    mp_group, mp_degree = hcg.get_model_parallel_group(), hcg.get_model_parallel_world_size()
    merge_shards = eval_mode == "single" and mp_degree > 1

    targets = eval_model.state_dict()
    local = {mapping.to_plain(name): tensor for name, tensor in paddle.nn.Layer.state_dict(pipe_model).items()}
    merge_actions = (
        tensor_parallel_actions(type(eval_model), pipe_model.config, list(targets), is_split=False) if merge_shards else {}
    )
    copied = set()
    for source_stage in range(pp_degree):
        source_rank = hcg.get_rank_from_stage(source_stage)
        # Sorted names: every rank walks the same sequence of collectives.
        meta = [[(name, list(local[name].shape), _dtype_name(local[name])) for name in sorted(local)]]
        if source_stage != stage:
            meta = [None]
        if pp_degree > 1:
            dist.broadcast_object_list(meta, src=source_rank, group=pp_group)
        for name, shape, dtype in meta[0]:
            if name not in targets:
                raise ValueError(f"pipeline parameter {name!r} has no counterpart in {type(eval_model).__name__}")
            tensor = local[name] if source_stage == stage else paddle.empty(shape, dtype=dtype)
            if pp_degree > 1:
                dist.broadcast(tensor, src=source_rank, group=pp_group)
            if merge_shards:
                parts: List[paddle.Tensor] = []
                dist.all_gather(parts, tensor, group=mp_group)
                tensor = merge_actions[name](parts) if name in merge_actions else parts[0]
            _assign(targets[name], tensor, name)
            copied.add(name)
    missing = sorted(set(targets) - copied)
    if missing:
        raise ValueError(f"the pipeline model provided no weights for {missing[:10]} of {type(eval_model).__name__}")


def _assign(target: paddle.Tensor, value: paddle.Tensor, name: str) -> None:
    if list(target.shape) != list(value.shape):
        raise ValueError(
            f"{name}: pipeline weight of shape {list(value.shape)} does not fit the eval model's {list(target.shape)} "
            f"(is the eval model's tensor_parallel_degree right for eval_mode?)"
        )
    if value.dtype != target.dtype:
        value = value.astype(target.dtype)
    target.set_value(value)
