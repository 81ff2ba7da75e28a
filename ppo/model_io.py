"""Saving and loading model directories that PaddleNLP reads directly."""

from __future__ import annotations

import os

import paddle

from ppo.checkpoint import atomic_directory

_WEIGHT_FILES = ("model_state.pdparams", "model.safetensors")


def save_model_dir(model, tokenizer, path: str, args=None, atomic: bool = True) -> None:
    """Write `model` (+ tokenizer) as a normal PaddleNLP model directory.

    Under tensor parallelism every rank holds a slice; `merge_tensor_parallel` gathers them so the
    directory is a single full model. Only the main process writes; with `atomic` the directory
    appears in one rename, never half-written.
    """
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


def load_model_weights(model, path: str) -> None:
    """Load the weights of a directory written by `save_model_dir` into an existing model."""
    from paddlenlp.transformers.model_utils import load_state_dict

    for name in _WEIGHT_FILES:
        weights = os.path.join(path, name)
        if os.path.exists(weights):
            state = paddle.load(weights) if name.endswith(".pdparams") else load_state_dict(weights)
            missing, unexpected = model.set_state_dict(state)
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit the model: missing {missing}, unexpected {unexpected}")
            return
    # Sharded or otherwise special layouts: let PaddleNLP resolve them.
    model.set_state_dict(type(model).from_pretrained(path, dtype=model.config.dtype).state_dict())


def tokenizers_match(first, second) -> bool:
    """Same vocabulary and special tokens: token ids mean the same thing in both."""
    if first is second:
        return True
    return (
        first.get_vocab() == second.get_vocab()
        and first.eos_token_id == second.eos_token_id
        and first.bos_token_id == second.bos_token_id
    )
