"""Saving and loading model directories that PaddleNLP reads directly, whatever the parallelism
the model was trained with: every directory written here is a plain single-device model."""

from __future__ import annotations

import os
import shutil

import numpy as np
import paddle

from ppo.checkpoint import atomic_directory

def _barrier(args) -> None:
    if args is not None and getattr(args, "world_size", 1) > 1:
        paddle.distributed.barrier()


def save_model_dir(model, tokenizer, path: str, args=None, atomic: bool = True) -> None:
    """Write `model` (+ tokenizer) as a normal PaddleNLP model directory. Collective under tensor
    or pipeline parallel: every rank calls it.

    Under tensor parallelism every rank holds a slice; `merge_tensor_parallel` gathers them so the
    directory is a single full model. Under pipeline parallelism see `_save_pipeline_model_dir`.
    Only the main process writes the final directory; with `atomic` it appears in one rename,
    never half-written.
    """
    if args is not None and getattr(args, "pipeline_parallel_degree", 1) > 1:
        _save_pipeline_model_dir(model, tokenizer, path, args, atomic)
        return
    tensor_parallel = args is not None and getattr(args, "tensor_parallel_degree", 1) > 1
    is_main = args is None or getattr(args, "should_save", True)
    if not is_main and not tensor_parallel:
        return

    def write(directory):
        model.save_pretrained(directory, merge_tensor_parallel=tensor_parallel, is_main_process=is_main)
        if is_main and tokenizer is not None:
            tokenizer.save_pretrained(directory)

    if atomic and is_main:
        with atomic_directory(path) as staging:
            write(staging)
    else:
        write(path)


def _save_pipeline_model_dir(model, tokenizer, path: str, args, atomic: bool) -> None:
    """Each pipeline stage (and tensor-parallel rank) of the first data-parallel replica writes its
    own weight file, `model_state.tpXX_ppYY.pdparams` (PaddleNLP's Pipe `state_dict` already uses
    the plain parameter names), into a sibling directory; after a barrier the main process merges
    them into `path` (`merge_stage_checkpoint`)."""
    parent, name = os.path.split(os.path.abspath(path))
    stages_dir = os.path.join(parent, f".{name}.stages")
    is_main = args.should_save
    if is_main:
        shutil.rmtree(stages_dir, ignore_errors=True)
        os.makedirs(stages_dir)
    _barrier(args)
    if args.should_save_model_state:  # sharding/data-parallel rank 0: one writer per (tp, pp) position
        # Without the variant every stage would write the same `model_state.pdparams`.
        model.save_pretrained(
            stages_dir, variant=args.weight_name_suffix, merge_tensor_parallel=False, is_main_process=is_main
        )
    if is_main and tokenizer is not None:
        tokenizer.save_pretrained(stages_dir)
    _barrier(args)
    if is_main:
        merge_stage_checkpoint(stages_dir, path, atomic=atomic)
    _barrier(args)


def merge_stage_checkpoint(stages_dir: str, path: str, atomic: bool = True) -> str:
    """The main process's half of a pipeline-parallel save: merge the per-stage (and per-TP-rank)
    weight files of `stages_dir` into the plain model directory `path`, then remove `stages_dir`."""
    from ppo.models.parallel_utils import merge_parallel_checkpoint

    if atomic:
        with atomic_directory(path) as staging:
            merge_parallel_checkpoint(stages_dir, staging)
    else:
        merge_parallel_checkpoint(stages_dir, path)
    shutil.rmtree(stages_dir, ignore_errors=True)
    return path


def _read_weights(path: str) -> dict:
    """The full state dict of a model directory: one weight file or an index of shards (large
    models), pdparams or safetensors, read by PaddleNLP's own loader."""
    from paddlenlp.transformers.model_utils import load_sharded_checkpoint_as_one

    try:
        return load_sharded_checkpoint_as_one(path)
    except (FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(f"{path} holds no model weights readable by PaddleNLP ({error})") from error


def _tensor_parallel_shard(model, state: dict) -> dict:
    """This rank's tensor-parallel slice of a full state dict, cut with the model class's own
    PaddleNLP split actions (as `from_pretrained` does when it loads a single checkpoint)."""
    from ppo.models.parallel_utils import tensor_parallel_actions

    actions = tensor_parallel_actions(type(model), model.config, list(state), is_split=True)
    shard = {}
    for key, value in state.items():
        if key not in actions:
            shard[key] = value
            continue
        dtype = value.dtype
        # bfloat16 goes through float32 (exact both ways); numpy has no bfloat16.
        array = value.astype("float32").numpy() if dtype == paddle.bfloat16 else np.asarray(value.numpy())
        shard[key] = paddle.to_tensor(np.ascontiguousarray(actions[key](array))).astype(dtype)
    return shard


def load_model_weights(model, path: str) -> None:
    """Load the weights of a directory written by `save_model_dir` (a full single model) into an
    existing model: a plain model, this rank's tensor-parallel slice, and/or this rank's
    pipeline stage (a Pipe model's `set_state_dict` keeps the names of its own stage)."""
    state = _read_weights(path)
    if getattr(model.config, "tensor_parallel_degree", 1) > 1:
        state = _tensor_parallel_shard(model, state)
    missing, unexpected = model.set_state_dict(state)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")


def tokenizers_match(first, second) -> bool:
    """Same vocabulary and special tokens: token ids mean the same thing in both."""
    if first is second:
        return True
    return (
        first.get_vocab() == second.get_vocab()
        and first.eos_token_id == second.eos_token_id
        and first.bos_token_id == second.bos_token_id
    )


def load_tokenizer(path: str, padding_side: str = "left"):
    """The tokenizer of a model directory, giving transformers' ids (the fast tokenizer whenever
    `tokenizer.json` exists; see `ppo.tokenizer_io`). Left padding for generation by default;
    EOS as pad when the tokenizer has no pad token (masks are built from lengths everywhere)."""
    from ppo.tokenizer_io import load_tokenizer as load

    return load(path, padding_side=padding_side)
