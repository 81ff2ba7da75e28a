"""Rollout: sample responses for a batch of left-padded prompts from the policy being trained.

`RolloutEngine` picks one of three backends (`RolloutEngine.backend` says which):

- "fused": PaddleNLP's fused inference model (needs `paddlenlp_ops`, GPU only), its weights
  copied in place from the training model before each rollout, prompts passed as token ids.
  See `FusedRollout` below.
- "decoder": our KV-cached decoder (`ppo/models/infer_model_utils.py`) running on the training
  model's own parameters. Default on CPU and whenever `paddlenlp_ops` is missing.
- "generate": PaddleNLP's `model.generate`; any causal LM, the slowest.

All three return the same `RolloutOutput` layout, and under greedy decoding the same tokens.
Randomness comes from Paddle's global generator (`paddle.seed`, `paddle.get_rng_state`).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import paddle
from paddlenlp.utils.log import logger

from ppo.models.cpu_decode import fused_decode_step
from ppo.models.infer_model_utils import (
    KVCache,
    UnsupportedModelError,
    apply_repetition_penalty,
    build_rope_tables,
    check_decoder_support,
    chosen_log_probs,
    collect_decoder_weights,
    decode_step,
    prefill,
    sampling_probs,
)
from ppo.models.ppo_model_utils import make_position_ids

BACKENDS = ("auto", "fused", "decoder", "generate")


@dataclass
class RolloutOutput:
    """Prompts and sampled responses, one row per (prompt, sample); the samples of a prompt are
    contiguous rows (repeat_interleave order).

    The response part is `T` columns wide, where T is the longest response in the batch (at most
    `max_new_tokens`): columns after a row's stop token hold `pad_token_id`. "EOS" below means any
    stop token (the tokenizer's EOS, or a chat template's end-of-turn token such as `<|im_end|>`).
    """

    sequences: paddle.Tensor  # [B*n, P+T] int64: left-padded prompt, then response, pad after EOS
    attention_mask: paddle.Tensor  # [B*n, P+T] bool: real prompt tokens + response up to AND incl. EOS
    prompt_length: int  # P
    # [B*n, T] float32 log softmax(logits / temperature) of each sampled token (0 after the
    # response); only from the "decoder" backend and only when asked for.
    log_probs: Optional[paddle.Tensor] = None

    @property
    def response_lengths(self) -> paddle.Tensor:  # [B*n] int64, EOS included
        return self.attention_mask[:, self.prompt_length :].astype("int64").sum(axis=-1)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    num_return_sequences: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    return_log_probs: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


def paddlenlp_ops_available() -> bool:
    return importlib.util.find_spec("paddlenlp_ops") is not None


def is_pipeline_parallel(model) -> bool:
    from paddle.distributed.fleet.meta_parallel import PipelineLayer

    return isinstance(model, PipelineLayer) or getattr(model.config, "pipeline_parallel_degree", 1) > 1


def check_prompts(input_ids: paddle.Tensor, attention_mask: paddle.Tensor) -> None:
    """Prompts must be [B, P] int ids, left-padded, each with at least one real token."""
    if len(input_ids.shape) != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got shape {list(input_ids.shape)}")
    if list(attention_mask.shape) != list(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} differs from input_ids shape {list(input_ids.shape)}"
        )
    if input_ids.dtype not in (paddle.int64, paddle.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    mask = attention_mask.astype("int64")
    if int(mask.min()) < 0 or int(mask.max()) > 1:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if input_ids.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("prompts must be LEFT-padded (padding first, then the prompt); got a row with "
                         "padding after a real token — set tokenizer.padding_side = 'left'")
    if bool((mask.sum(axis=-1) == 0).any()):
        raise ValueError("every prompt needs at least one real token; got a row that is all padding")


def build_output(
    prompt_ids: paddle.Tensor,  # [N, P] int64
    prompt_mask: paddle.Tensor,  # [N, P]
    response_tokens: np.ndarray,  # [N, T] int64, pad after the response
    response_lengths: np.ndarray,  # [N] EOS included
    response_log_probs: Optional[np.ndarray] = None,  # [N, T]
) -> RolloutOutput:
    """Trim the response columns to the longest response and assemble the masks."""
    width = int(response_lengths.max()) if len(response_lengths) else 0
    tokens = response_tokens[:, :width]
    response_mask = np.arange(width)[None, :] < response_lengths[:, None]
    sequences = paddle.concat([prompt_ids.astype("int64"), paddle.to_tensor(tokens, dtype="int64")], axis=-1)
    attention_mask = paddle.concat([prompt_mask.astype("bool"), paddle.to_tensor(response_mask)], axis=-1)
    log_probs = None
    if response_log_probs is not None:
        log_probs = paddle.to_tensor(np.where(response_mask, response_log_probs[:, :width], 0.0).astype("float32"))
    return RolloutOutput(sequences, attention_mask, int(prompt_ids.shape[1]), log_probs)


StopTokens = Union[int, Sequence[int]]


def stop_token_tuple(stop_token_ids: StopTokens) -> tuple[int, ...]:
    """One stop id or several (e.g. `<|im_end|>` and EOS) as a non-empty tuple of ints."""
    ids = (stop_token_ids,) if isinstance(stop_token_ids, (int, np.integer)) else tuple(stop_token_ids)
    if not ids or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"stop token ids must be an int or a non-empty sequence of ints, got {stop_token_ids!r}")
    return tuple(int(i) for i in ids)


def response_lengths_from_tokens(tokens: np.ndarray, stop_token_ids: StopTokens) -> np.ndarray:  # [N, T] -> [N]
    """Length up to and including the first stop token; the full width when a row never emits one."""
    is_eos = np.isin(tokens, stop_token_tuple(stop_token_ids))
    first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])
    return first_eos.astype("int64")


class RolloutEngine:
    """Sample responses from `model` with the fastest backend available.

    backend: "auto" (fused if `use_fusemt` and `paddlenlp_ops` is importable and the model is not
    pipeline parallel, else decoder if the architecture is supported, else generate), or force
    one of "fused", "decoder", "generate".

    `eos_token_id`: the token that ends a response, or several (a chat template's end-of-turn
    token, then the tokenizer's EOS); a response ends at the first of them it emits.
    """

    def __init__(
        self,
        model,
        eos_token_id: StopTokens,
        pad_token_id: int,
        use_fusemt: bool = True,
        backend: str = "auto",
        compact_finished_rows: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown rollout backend {backend!r}; choose one of {BACKENDS}")
        if eos_token_id is None or pad_token_id is None:
            raise ValueError(f"eos_token_id and pad_token_id must be set, got {eos_token_id} and {pad_token_id}")
        self.model = model
        self.stop_token_ids = stop_token_tuple(eos_token_id)
        self.eos_token_id = self.stop_token_ids[0]
        self.pad_token_id = int(pad_token_id)
        self.use_fusemt = use_fusemt
        self.compact_finished_rows = compact_finished_rows
        self.backend = self._resolve_backend(backend)
        self._fused = None

    def _resolve_backend(self, requested: str) -> str:
        decoder_problem = None
        try:
            check_decoder_support(self.model)
        except UnsupportedModelError as error:
            decoder_problem = error
        if requested == "fused" or (requested == "auto" and self.use_fusemt):
            fused_problem = None
            if not paddlenlp_ops_available():
                fused_problem = "the `paddlenlp_ops` package (GPU builds only) is not installed"
            elif is_pipeline_parallel(self.model):
                fused_problem = "the model is pipeline parallel (build a non-pipeline model for rollout, see eval_mode)"
            elif decoder_problem is not None:
                fused_problem = str(decoder_problem)
            if fused_problem is None:
                return "fused"
            if requested == "fused":
                raise RuntimeError(f"backend='fused' is unavailable: {fused_problem}; use backend='decoder' or 'generate'")
            logger.info(f"use_fusemt: fused rollout unavailable ({fused_problem}); falling back")
        if requested == "decoder":
            if decoder_problem is not None:
                raise decoder_problem
            return "decoder"
        if requested == "generate":
            return "generate"
        if decoder_problem is not None:
            logger.info(f"rollout with PaddleNLP generate: {decoder_problem}")
            return "generate"
        return "decoder"

    @paddle.no_grad()
    def generate(
        self,
        input_ids: paddle.Tensor,  # [B, P] left-padded
        attention_mask: paddle.Tensor,  # [B, P] 0/1
        *,
        max_new_tokens: int,
        num_return_sequences: int = 1,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        return_log_probs: bool = False,
    ) -> RolloutOutput:
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            return_log_probs=return_log_probs,
        )
        check_prompts(input_ids, attention_mask)
        if return_log_probs and self.backend != "decoder":
            raise ValueError(f"return_log_probs is only available from the 'decoder' backend, not {self.backend!r}")
        input_ids = input_ids.astype("int64")
        attention_mask = attention_mask.astype("int64")
        if self.backend == "decoder":
            return DecoderRollout(self.model, self.stop_token_ids, self.pad_token_id, self.compact_finished_rows).run(
                input_ids, attention_mask, settings
            )
        if self.backend == "generate":
            return generate_with_paddlenlp(self.model, self.stop_token_ids, self.pad_token_id, input_ids, attention_mask, settings)
        if self._fused is None:
            self._fused = FusedRollout(self.model, self.stop_token_ids, self.pad_token_id)
        return self._fused.run(input_ids, attention_mask, settings)


# ----------------------------------------------------------------------------------------------
# Backend: our decoder


@dataclass
class _Segment:
    """Tokens sampled for a fixed set of rows over consecutive steps (a new segment starts each
    time finished rows are dropped from the batch)."""

    rows: np.ndarray  # [Na] output row of each active row
    first_step: int
    tokens: List[paddle.Tensor] = field(default_factory=list)  # per step [Na]
    log_probs: List[paddle.Tensor] = field(default_factory=list)  # per step [Na]


class DecoderRollout:
    """The generation loop over `prefill` / `decode_step` (one C++ call per step on CPU when the
    extension is available, `ppo.models.cpu_decode`; `use_cpu_extension=False` keeps the eager step).

    Rows are decoded in lockstep (one shared cache slot per step). A finished row keeps emitting
    pad until it is dropped: when at least a quarter of the rows still in the batch are finished,
    they are removed from the cache (a gather) so later steps do less work. The loop ends when
    every row has emitted a stop token or after `max_new_tokens` steps.
    """

    def __init__(
        self,
        model,
        stop_token_ids: StopTokens,
        pad_token_id: int,
        compact_finished_rows: bool = True,
        use_cpu_extension: bool = True,
    ):
        self.model = model
        self.use_cpu_extension = use_cpu_extension
        self.stop_token_ids = stop_token_tuple(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.compact_finished_rows = compact_finished_rows

    def run(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor, settings: GenerationSettings) -> RolloutOutput:
        batch, prompt_len = input_ids.shape
        copies = settings.num_return_sequences
        total_rows = batch * copies
        steps = settings.max_new_tokens

        weights = collect_decoder_weights(self.model)
        rope = build_rope_tables(weights)
        position_ids = make_position_ids(attention_mask)
        longest_prompt = int(attention_mask.sum(axis=-1).max())
        if longest_prompt + steps > weights.max_positions:
            raise ValueError(
                f"a prompt of {longest_prompt} tokens plus max_new_tokens={steps} exceeds the model's "
                f"max_position_embeddings={weights.max_positions}"
            )

        # One C++ call per step on CPU when the extension is available, else the eager step.
        step_fn = fused_decode_step(weights, rope) if self.use_cpu_extension else None
        if step_fn is None:
            step_fn = functools.partial(decode_step, weights, rope)
        # The prompts are encoded once; their samples share the encoded cache rows.
        logits, cache = prefill(weights, rope, input_ids, attention_mask, position_ids, capacity=prompt_len + steps)
        prompt_ids, prompt_mask = input_ids, attention_mask
        positions = position_ids[:, -1] + 1  # [B]
        if copies > 1:
            rows = paddle.arange(batch, dtype="int64").repeat_interleave(copies)
            logits, cache = paddle.index_select(logits, rows), cache.select_rows(rows)
            prompt_ids, prompt_mask = paddle.index_select(input_ids, rows), paddle.index_select(attention_mask, rows)
            positions = paddle.index_select(positions, rows)

        penalise = settings.repetition_penalty != 1.0
        seen = self._prompt_vocabulary(prompt_ids, prompt_mask, logits.shape[-1]) if penalise else None
        finished = paddle.zeros([total_rows], dtype="bool")
        pad = paddle.full([], self.pad_token_id, dtype="int64")
        stops = paddle.to_tensor(list(self.stop_token_ids), dtype="int64")  # [S]
        segment = _Segment(rows=np.arange(total_rows), first_step=0)
        segments = [segment]

        for step in range(steps):
            raw_logits = logits
            if penalise:
                logits = apply_repetition_penalty(logits, seen > 0, settings.repetition_penalty)
            if settings.do_sample:
                tokens = paddle.multinomial(sampling_probs(logits, settings.temperature, settings.top_p)).squeeze(-1)
            else:
                tokens = paddle.argmax(logits, axis=-1)
            tokens = paddle.where(finished, pad, tokens)
            segment.tokens.append(tokens)
            if settings.return_log_probs:
                segment.log_probs.append(chosen_log_probs(raw_logits, tokens, settings.temperature))
            finished = finished | (tokens.unsqueeze(-1) == stops).any(axis=-1)
            if step == steps - 1:
                break
            active = finished.shape[0]
            done = int(finished.astype("int32").sum())
            if done == active:
                break
            if self.compact_finished_rows and done > 0 and 4 * done >= active:
                keep = paddle.nonzero(~finished).squeeze(-1)
                cache = cache.select_rows(keep)
                tokens, positions, finished = (paddle.index_select(t, keep) for t in (tokens, positions, finished))
                if penalise:
                    seen = paddle.index_select(seen, keep)
                segment = _Segment(rows=segment.rows[keep.numpy()], first_step=step + 1)
                segments.append(segment)
            if penalise:
                seen = paddle.put_along_axis(seen, tokens.unsqueeze(-1), paddle.ones_like(tokens, "float32").unsqueeze(-1), axis=-1)
            logits = step_fn(cache, tokens, positions, prompt_len + step)
            positions = positions + 1

        response = np.full([total_rows, steps], self.pad_token_id, dtype="int64")
        log_probs = np.zeros([total_rows, steps], dtype="float32") if settings.return_log_probs else None
        for seg in segments:
            if not seg.tokens:
                continue
            end = seg.first_step + len(seg.tokens)
            response[seg.rows, seg.first_step : end] = paddle.stack(seg.tokens, axis=1).numpy()
            if log_probs is not None:
                log_probs[seg.rows, seg.first_step : end] = paddle.stack(seg.log_probs, axis=1).numpy()
        lengths = response_lengths_from_tokens(response, self.stop_token_ids)
        return build_output(prompt_ids, prompt_mask, response, lengths, log_probs)

    @staticmethod
    def _prompt_vocabulary(prompt_ids, prompt_mask, vocab_size: int) -> paddle.Tensor:  # [N, V] float 0/1
        """Which tokens each prompt contains (padding excluded: it is not text the model saw).
        Float, not bool: Paddle's put_along_axis has no bool kernel."""
        counts = paddle.put_along_axis(
            paddle.zeros([prompt_ids.shape[0], vocab_size], dtype="float32"),
            prompt_ids,
            prompt_mask.astype("float32"),
            axis=-1,
            reduce="add",
        )
        return (counts > 0).astype("float32")


# ----------------------------------------------------------------------------------------------
# Backend: PaddleNLP generate


def generate_with_paddlenlp(model, eos_token_id: StopTokens, pad_token_id: int, input_ids, attention_mask, settings: GenerationSettings) -> RolloutOutput:
    """PaddleNLP's `model.generate` with the KV cache, on left-padded prompts.

    Its repetition penalty counts every id in `input_ids`, padding included (the decoder backend
    counts real tokens only).
    """
    stops = stop_token_tuple(eos_token_id)
    copies = settings.num_return_sequences
    if copies > 1:
        rows = paddle.arange(input_ids.shape[0], dtype="int64").repeat_interleave(copies)
        input_ids, attention_mask = paddle.index_select(input_ids, rows), paddle.index_select(attention_mask, rows)
    tokens, _ = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=make_position_ids(attention_mask),
        max_new_tokens=settings.max_new_tokens,
        decode_strategy="sampling" if settings.do_sample else "greedy_search",
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=stops[0] if len(stops) == 1 else list(stops),  # generate() stops at any id of a list
        pad_token_id=pad_token_id,
        use_cache=True,
        trunc_input=True,
    )
    tokens = tokens.numpy().astype("int64")
    lengths = response_lengths_from_tokens(tokens, stops)
    # generate() already writes pad after EOS; re-pad to be independent of that detail.
    tokens = np.where(np.arange(tokens.shape[1])[None, :] < lengths[:, None], tokens, pad_token_id)
    return build_output(input_ids, attention_mask, tokens, lengths)


# ----------------------------------------------------------------------------------------------
# Backend: PaddleNLP fused inference model (GPU, `paddlenlp_ops`)


class FusedRollout:
    """Rollout with PaddleNLP's fused inference transformer (`<Arch>ForCausalLMInferenceModel`).

    The inference model owns its own (fused-layout) weight buffers. Before every rollout they are
    overwritten in place from the training model's parameters: q/k/v packed GQA-aware by
    `pack_qkv_for_fused_inference`, gate|up concatenated, norms/embeddings/LM head copied. Prompts
    go in as token ids (left padding moved to the right with tensor ops), never as text.

    NOT VERIFIED in this repository's CI: `paddlenlp_ops` only builds for GPUs and the CPU
    wheel of Paddle cannot even import `paddlenlp.experimental.transformers`. The pure pieces it
    relies on (qkv split/pack, re-padding) are unit-tested on CPU.
    """

    def __init__(self, model, eos_token_id: StopTokens, pad_token_id: int):
        import copy

        import paddlenlp_ops  # noqa: F401  GPU kernels of the fused model
        from paddlenlp.experimental import transformers as inference_models
        from paddlenlp.transformers.model_utils import dtype_guard

        name = type(model).__name__ + "InferenceModel"
        inference_class = getattr(inference_models, name, None)
        if inference_class is None:
            raise UnsupportedModelError(f"PaddleNLP has no fused inference model {name}; use backend='decoder' or 'generate'")
        config = copy.deepcopy(model.config)
        config.quant_type = ""
        config.cachekv_int8_type = None
        self.dtype = str(model.get_input_embeddings().weight.dtype).replace("paddle.", "")
        with dtype_guard(self.dtype):
            self.inference_model = inference_class(config)
        self.inference_model.eval()
        # The fused kernel takes one EOS per row: it stops at the first stop id; the responses are
        # cut at whichever stop id comes first afterwards (`response_lengths_from_tokens`).
        self.stop_token_ids = stop_token_tuple(eos_token_id)
        self.model, self.eos_token_id, self.pad_token_id = model, self.stop_token_ids[0], pad_token_id

    @paddle.no_grad()
    def sync_weights(self) -> None:
        """Copy the training weights into the inference model's buffers, in place, on device."""
        from ppo.models.infer_model_utils import collect_decoder_weights, pack_qkv_for_fused_inference

        weights = collect_decoder_weights(self.model)
        base = getattr(self.inference_model, weights.architecture)
        block = base.transformer_block

        def copy_into(target, source):
            paddle.assign(source.astype(target.dtype), output=target)

        copy_into(base.embed_tokens.weight, weights.embed_tokens)
        copy_into(base.norm.weight, weights.final_norm)
        copy_into(self.inference_model.lm_head.weight, weights.lm_head)
        query_width = weights.num_heads * weights.head_dim
        for index, layer in enumerate(weights.layers):
            query, key = paddle.split(layer.query_key, [query_width, layer.query_key.shape[-1] - query_width], axis=-1)
            copy_into(block.ln_scales[index], layer.input_norm)
            copy_into(block.qkv_weights[index], pack_qkv_for_fused_inference(query, key, layer.value))
            if layer.query_key_bias is not None:
                copy_into(block.qkv_biases[index], paddle.concat([layer.query_key_bias, layer.value_bias]))
            copy_into(block.linear_weights[index], layer.o_proj)
            copy_into(block.ffn_ln_scales[index], layer.post_norm)
            copy_into(block.ffn1_weights[index], layer.gate_up)
            copy_into(block.ffn2_weights[index], layer.down_proj)

    @paddle.no_grad()
    def run(self, input_ids, attention_mask, settings: GenerationSettings) -> RolloutOutput:
        self.sync_weights()
        copies = settings.num_return_sequences
        prompt_ids, prompt_mask = input_ids, attention_mask
        if copies > 1:
            rows = paddle.arange(input_ids.shape[0], dtype="int64").repeat_interleave(copies)
            prompt_ids, prompt_mask = paddle.index_select(input_ids, rows), paddle.index_select(attention_mask, rows)
        inputs = self._fused_inputs(prompt_ids, prompt_mask, settings)

        # The fused loop only returns the last token; the logits processor sees every earlier one.
        seen = {}

        def record(all_input_ids, logits, decoding_step=None):
            seen["ids"] = all_input_ids
            return logits

        from paddlenlp.generation import LogitsProcessorList

        last_tokens = self.inference_model.generate(**inputs, logits_processors=LogitsProcessorList([record]))[0]
        width = inputs["input_ids"].shape[1]
        tokens = paddle.concat([seen["ids"][:, width:], last_tokens.astype("int64")], axis=-1).numpy()
        tokens = tokens[:, : settings.max_new_tokens]
        lengths = response_lengths_from_tokens(tokens, self.stop_token_ids)
        tokens = np.where(np.arange(tokens.shape[1])[None, :] < lengths[:, None], tokens, self.pad_token_id)
        return build_output(prompt_ids, prompt_mask, tokens, lengths)

    def _fused_inputs(self, input_ids, attention_mask, settings: GenerationSettings) -> dict:
        """The tensors PaddleNLP's `GenerationInferenceModel.generate` reads (its predictor builds
        the same from text; here from ids)."""
        from ppo.models.infer_model_utils import left_to_right_padding

        right_ids, lengths = left_to_right_padding(input_ids, attention_mask, self.pad_token_id)
        batch, width = right_ids.shape
        total = width + settings.max_new_tokens
        config = self.model.config
        column = paddle.arange(total, dtype="int64").unsqueeze(0)
        visible = column < lengths.unsqueeze(-1)  # [B, total]
        causal = paddle.tril(paddle.ones([total, total], dtype="bool"))
        encoder_mask = (causal.unsqueeze(0) & visible.unsqueeze(1) & visible.unsqueeze(2)).astype(self.dtype).unsqueeze(1)

        def per_row(value, dtype):
            return paddle.full([batch, 1], value, dtype=dtype)

        top_p = settings.top_p if settings.do_sample else 1e-6  # nucleus of one token = greedy
        return {
            "input_ids": right_ids,
            "position_ids": paddle.where(visible, column.expand([batch, total]), paddle.zeros([batch, total], "int64")),
            "attention_mask": encoder_mask,  # [B, 1, total, total], 1 = visible
            "tgt_generation_mask": paddle.ones([batch, 1, 1, total], dtype=self.dtype),
            "pre_ids": paddle.full([batch, total], -1, dtype="int64"),
            "cache_kvs": [paddle.zeros(shape, dtype=self.dtype) for shape in
                          self.inference_model.get_cache_kvs_shape(config, batch, total)],
            "eos_token_id": per_row(self.eos_token_id, "int64"),
            "top_p": per_row(top_p, "float32"),
            "temperature": per_row(settings.temperature, "float32"),
            "penalty_score": per_row(settings.repetition_penalty, "float32"),
            "frequency_score": per_row(0.0, "float32"),
            "presence_score": per_row(0.0, "float32"),
            "seq_len_encoder": lengths.astype("int32").unsqueeze(-1),
            "seq_len_decoder": lengths.astype("int32").unsqueeze(-1),
            "step_idx": per_row(0, "int64"),
            "tgt_ids": paddle.take_along_axis(right_ids, (lengths - 1).unsqueeze(-1), axis=1),
            "tgt_pos": (lengths - 1).unsqueeze(-1),
            "min_length": per_row(1, "int64"),
            "max_length": paddle.full([1, 1], settings.max_new_tokens, dtype="int64"),
            "stop_flags": per_row(False, "bool"),
            "stop_nums": paddle.full([1], batch, dtype="int64"),
        }
