"""Tensor- and pipeline-parallel weight conversion and the Pipe models' losses.

Most tests need no communication: TP split/merge through PaddleNLP's mappings, pipeline stage
layouts from Paddle's `SegmentLayers`, Pipe <-> plain names, and the pipeline batches + last-stage
losses against the non-pipeline computation. Tests that need `fleet.init` run this file as a
worker in a child process (so the hybrid-parallel state never leaks into the rest of the suite):
one process with pipeline degree 1 builds real Pipe models; two 2-process CPU launches
(tensor parallel 2, pipeline parallel 2; marked slow, ~15-25 s each) build real TP/PP models
from single checkpoints and check checkpoint merging and the eval-mode weight sync
(`pytest -m "slow and distributed" tests/test_parallel_conversion.py`). Forward passes through TP layers or
across stages are not possible on CPU (no c_identity kernel; gloo has no send/recv on the calc
stream), so those only run the weight logic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from ppo.data.base import IGNORE_INDEX  # noqa: E402
from ppo.experience import Experience  # noqa: E402
from ppo.models import LlamaModelForScore, Qwen2ModelForScore, make_position_ids  # noqa: E402
from ppo.models.model_pp import (  # noqa: E402
    LlamaPolicyPipe,
    LlamaValuePipe,
    PolicyLossConfig,
    PolicyPipeLoss,
    Qwen2PolicyPipe,
    Qwen2ValuePipe,
    ValueLossConfig,
    ValuePipeLoss,
    causal_lm_pipe_specs,
    pipe_family,
    pipe_model_class,
)
from ppo.models.parallel_utils import (  # noqa: E402
    check_pipeline_ppo_arguments,
    check_tensor_parallel_degree,
    eval_model_config,
    find_parallel_shard_files,
    merge_parallel_checkpoint,
    merge_state_dicts,
    split_state_dict,
)
from ppo.models.pp_model_utils import (  # noqa: E402
    PipelineLayout,
    prepare_policy_pipeline_inputs,
    prepare_value_pipeline_inputs,
    stack_micro_batches,
)
from ppo.models.ppo_model_utils import (  # noqa: E402
    actor_clipped_loss,
    critic_clipped_loss,
    gather_log_probs,
    supervised_lm_loss,
)
from ppo.tiny import tiny_config_kwargs  # noqa: E402

CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}
CAUSAL_LM_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
SCORE_CLASSES = {"llama": LlamaModelForScore, "qwen2": Qwen2ModelForScore}


def tiny_config(architecture: str, **overrides):
    extra = {key: overrides.pop(key) for key in list(overrides) if key not in tiny_config_kwargs.__code__.co_varnames}
    config = CONFIG_CLASSES[architecture](**tiny_config_kwargs(**overrides))
    # Set after construction: PaddleNLP's base config resets fuse_attention_* passed as kwargs.
    for key, value in extra.items():
        setattr(config, key, value)
    config.dtype = "float32"
    return config


def build_model(architecture: str, kind: str, seed: int = 0, **overrides):
    config = tiny_config(architecture, **overrides)
    paddle.seed(seed)
    model_class = SCORE_CLASSES[architecture] if kind == "score" else CAUSAL_LM_CLASSES[architecture]
    model = model_class(config)
    # Random values everywhere (biases and norms start as constants): every slice is distinct.
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():
        parameter.set_value(rng.normal(0.0, 0.05, parameter.shape).astype("float32"))
    return model


def numpy_state(model):
    return {key: value.numpy() for key, value in model.state_dict().items()}


# =============================================================================================
# Tensor parallel: split then merge
# =============================================================================================


def expected_shard_shape(key: str, full_shape, config, degree: int):
    """The shape each TP layer of PaddleNLP holds on one rank (independent of the mappings)."""
    rows, cols = (full_shape + [None])[:2]
    kv_split = config.num_key_value_heads % degree == 0
    if key.endswith("embed_tokens.weight"):
        return [rows // degree, cols]  # VocabParallelEmbedding: vocabulary rows
    if key.endswith("lm_head.weight"):
        return [rows, cols // degree]  # column-parallel over the vocabulary
    if key.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")):
        return [rows, cols // degree]  # ColumnParallelLinear
    if key.endswith(("q_proj.bias",)):
        return [rows // degree]
    if key.endswith(("k_proj.weight", "v_proj.weight")):
        return [rows, cols // degree] if kv_split else list(full_shape)  # Llama replicates K/V otherwise
    if key.endswith(("k_proj.bias", "v_proj.bias")):
        return [rows // degree] if kv_split else list(full_shape)
    if key.endswith("gate_up_fused_proj.weight"):
        return [rows, cols // degree]
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return [rows // degree, cols]  # RowParallelLinear
    return list(full_shape)  # norms, score head: replicated


TP_CASES = [
    # (architecture, kind, degree, config overrides)
    ("llama", "score", 2, {}),
    ("llama", "score", 4, {}),
    ("llama", "causal", 2, {}),
    ("llama", "causal", 4, {}),
    ("llama", "score", 2, {"num_key_value_heads": 2}),  # GQA, K/V split
    ("llama", "causal", 4, {"num_key_value_heads": 2}),  # GQA, K/V replicated (2 heads, 4 ranks)
    ("llama", "causal", 2, {"fuse_attention_ffn": True}),  # gate/up fused: naive 2-fuse action
    ("qwen2", "score", 2, {}),
    ("qwen2", "score", 4, {}),
    ("qwen2", "causal", 2, {"num_key_value_heads": 2}),
    ("qwen2", "causal", 4, {}),
]


@pytest.mark.parametrize("architecture,kind,degree,overrides", TP_CASES)
def test_tensor_parallel_split_then_merge_is_exact(architecture, kind, degree, overrides):
    model = build_model(architecture, kind, **overrides)
    config, full = model.config, numpy_state(model)
    shards = split_state_dict(type(model), config, full, degree)

    assert len(shards) == degree
    for key, value in full.items():
        expected = expected_shard_shape(key, list(value.shape), config, degree)
        for rank, shard in enumerate(shards):
            assert list(shard[key].shape) == expected, (key, rank)
        if expected == list(value.shape):
            assert all(np.array_equal(shard[key], value) for shard in shards), key  # replicated copies
        else:
            assert not np.array_equal(shards[0][key], shards[1][key]), key  # really different slices
    if kind == "score":
        assert "score_head.weight" in full and all(shard["score_head.weight"].shape == full["score_head.weight"].shape for shard in shards)

    merged = merge_state_dicts(type(model), config, shards)
    assert sorted(merged) == sorted(full)
    for key, value in full.items():
        assert merged[key].dtype == value.dtype and np.array_equal(merged[key], value), key


def test_fused_gate_up_shard_holds_this_ranks_gate_and_up_slices():
    fused = build_model("llama", "causal", fuse_attention_ffn=True)
    fused_state = numpy_state(fused)
    key = "llama.layers.0.mlp.gate_up_fused_proj.weight"
    gate, up = np.split(fused_state[key], 2, axis=-1)
    shards = split_state_dict(type(fused), fused.config, fused_state, 2)
    for rank, shard in enumerate(shards):
        expected = np.concatenate([np.split(gate, 2, axis=-1)[rank], np.split(up, 2, axis=-1)[rank]], axis=-1)
        assert np.array_equal(shard[key], expected)


def test_score_model_mapping_is_the_backbones_without_lm_head():
    config = tiny_config("llama")
    config.tensor_parallel_degree, config.tensor_parallel_rank = 2, 0
    backbone = LlamaForCausalLM._get_tensor_parallel_mappings(config)
    score = LlamaModelForScore._get_tensor_parallel_mappings(config)
    assert "lm_head.weight" in backbone and "lm_head.weight" not in score
    assert set(score) == set(backbone) - {"lm_head.weight"}
    assert not any("score_head" in key for key in score)  # replicated


def test_merge_refuses_replicated_weights_that_differ_between_ranks():
    model = build_model("llama", "score")
    shards = split_state_dict(type(model), model.config, numpy_state(model), 2)
    shards[1]["llama.norm.weight"] = shards[1]["llama.norm.weight"] + 1.0
    with pytest.raises(ValueError, match="llama.norm.weight.*differs"):
        merge_state_dicts(type(model), model.config, shards)
    del shards[1]["llama.norm.weight"]
    with pytest.raises(ValueError, match="different parameters"):
        merge_state_dicts(type(model), model.config, shards)


@pytest.mark.parametrize(
    "architecture,degree,overrides,message",
    [
        ("llama", 3, {}, "num_attention_heads=4"),
        ("qwen2", 4, {"num_key_value_heads": 2}, "num_key_value_heads=2"),
        ("llama", 4, {"num_key_value_heads": 2, "fuse_attention_qkv": True}, "fuse_attention_qkv"),
        ("llama", 0, {}, "integer >= 1"),
    ],
)
def test_impossible_tensor_parallel_degrees_are_explained(architecture, degree, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel_degree(tiny_config(architecture, **overrides), degree)


def _save_parallel_dir(tmp_path, model, tokenizer_dir, tp_degree, pp_degree, mapping=None):
    """A directory laid out as PaddleNLP saves without merging: model_state.tpXX[_ppYY].pdparams
    per rank with plain names, plus the config (with the training TP degree) and tokenizer."""
    from paddlenlp.transformers import AutoTokenizer

    directory = tmp_path / f"tp{tp_degree}_pp{pp_degree}"
    config = model.config
    config.tensor_parallel_degree = tp_degree
    config.save_pretrained(str(directory))
    config.tensor_parallel_degree = 1
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(directory))
    shards = split_state_dict(type(model), model.config, model.state_dict(), tp_degree)
    for tp, shard in enumerate(shards):
        stages = [shard] if pp_degree == 1 else [
            {mapping.to_plain(name): value for name, value in stage.items()} for stage in mapping.split_by_stage(shard)
        ]
        for pp, stage in enumerate(stages):
            variant = "_".join(part for part in (f"tp{tp:02d}" if tp_degree > 1 else "", f"pp{pp:02d}" if pp_degree > 1 else "") if part)
            paddle.save({k: paddle.to_tensor(v) for k, v in stage.items()}, str(directory / f"model_state.{variant}.pdparams"))
    return str(directory)


@pytest.mark.parametrize("kind,tp_degree,pp_degree", [("score", 2, 1), ("causal", 2, 2), ("causal", 1, 2)])
def test_parallel_checkpoint_merges_into_one_loadable_model_dir(tmp_path, tiny_tokenizer_dir, kind, tp_degree, pp_degree):
    from paddlenlp.transformers import AutoModelForCausalLM

    from ppo.models import AutoModelForScore

    model = build_model("llama", kind, seed=3, num_key_value_heads=2)
    model.eval()
    mapping = (LlamaValuePipe if kind == "score" else LlamaPolicyPipe).name_mapping_for(model.config, pp_degree) if pp_degree > 1 else None
    source = _save_parallel_dir(tmp_path, model, tiny_tokenizer_dir, tp_degree, pp_degree, mapping)
    assert len(find_parallel_shard_files(source)) == tp_degree * pp_degree

    output = merge_parallel_checkpoint(source, str(tmp_path / "merged"))
    loader = AutoModelForScore if kind == "score" else AutoModelForCausalLM
    reloaded = loader.from_pretrained(output, dtype="float32")
    reloaded.eval()
    assert reloaded.config.tensor_parallel_degree == 1
    assert os.path.exists(os.path.join(output, "sentencepiece.bpe.model"))
    for key, value in model.state_dict().items():
        assert np.array_equal(reloaded.state_dict()[key].numpy(), value.numpy()), key
    input_ids = paddle.to_tensor([[1, 40, 41, 42, 43], [3, 3, 1, 50, 51]], dtype="int64")
    attention_mask = input_ids != 3
    with paddle.no_grad():
        if kind == "score":
            before = model(input_ids, attention_mask).scores
            after = reloaded(input_ids, attention_mask).scores
        else:
            before = model(input_ids, attention_mask=attention_mask, position_ids=make_position_ids(attention_mask))[0]
            after = reloaded(input_ids, attention_mask=attention_mask, position_ids=make_position_ids(attention_mask))[0]
    assert np.array_equal(before.numpy(), after.numpy())


def test_merging_an_incomplete_checkpoint_names_the_missing_ranks(tmp_path, tiny_tokenizer_dir):
    model = build_model("llama", "causal")
    mapping = LlamaPolicyPipe.name_mapping_for(model.config, 2)
    source = _save_parallel_dir(tmp_path, model, tiny_tokenizer_dir, 2, 2, mapping)
    os.remove(os.path.join(source, "model_state.tp01_pp01.pdparams"))
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        merge_parallel_checkpoint(source, str(tmp_path / "merged"))
    with pytest.raises(FileNotFoundError, match="per-rank weight files"):
        merge_parallel_checkpoint(str(tmp_path), str(tmp_path / "merged"))


def test_eval_model_config_per_eval_mode():
    config = tiny_config("llama")
    config.tensor_parallel_degree, config.tensor_parallel_rank = 2, 1
    config.sequence_parallel, config.tensor_parallel_output = True, True
    single = eval_model_config(config, "single")
    assert (single.tensor_parallel_degree, single.tensor_parallel_rank) == (1, 0)
    kept = eval_model_config(config, "tensor_parallel")
    assert (kept.tensor_parallel_degree, kept.tensor_parallel_rank) == (2, 1)
    for derived in (single, kept):
        assert not derived.sequence_parallel and not derived.tensor_parallel_output
    assert config.tensor_parallel_degree == 2 and config.sequence_parallel  # the training config is untouched
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        eval_model_config(config, "pipeline")


def test_pipeline_ppo_arguments_need_an_eval_mode_and_dynamic_shapes():
    from types import SimpleNamespace

    check_pipeline_ppo_arguments(SimpleNamespace(pipeline_parallel_degree=1, eval_mode=None, pipeline_parallel_config=""))
    ready = dict(pipeline_parallel_degree=2, eval_mode="single", pipeline_parallel_config="disable_p2p_cache_shape")
    check_pipeline_ppo_arguments(SimpleNamespace(**ready))
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        check_pipeline_ppo_arguments(SimpleNamespace(**{**ready, "eval_mode": None}))
    with pytest.raises(ValueError, match="disable_p2p_cache_shape"):
        check_pipeline_ppo_arguments(SimpleNamespace(**{**ready, "pipeline_parallel_config": "disable_partial_send_recv"}))


# =============================================================================================
# Pipeline parallel: stage layouts and names
# =============================================================================================

LAYOUT_CASES = [
    # (num_hidden_layers, pp_degree, virtual_pp_degree)
    (2, 1, 1),
    (2, 2, 1),
    (4, 2, 1),
    (4, 4, 1),
    (6, 4, 1),  # not divisible: PaddleNLP falls back to uniform segmentation
    (7, 2, 1),
    (4, 1, 2),
    (4, 2, 2),
    (8, 2, 4),
    (12, 3, 2),
    (16, 4, 2),
]


@pytest.mark.parametrize("num_layers,pp_degree,virtual", LAYOUT_CASES)
def test_pipeline_stages_cover_every_layer_exactly_once(num_layers, pp_degree, virtual):
    config = tiny_config("llama", num_hidden_layers=num_layers)
    specs = causal_lm_pipe_specs(config)
    mapping = LlamaPolicyPipe.name_mapping_for(config, pp_degree, virtual)
    layout = mapping.layout

    held = [index for stage in range(pp_degree) for chunk in layout.chunks(stage) for index in chunk]
    assert sorted(held) == list(range(len(specs)))  # every layer once
    for stage in range(pp_degree):
        chunks = layout.chunks(stage)
        assert len(chunks) == virtual
        decoder_layers = [i for chunk in chunks for i in chunk if specs[i].layer_class.__name__.endswith("DecoderLayerPipe")]
        assert decoder_layers, f"stage {stage} holds no decoder layer"
        for chunk in chunks:
            for index in chunk:
                assert layout.locate(index) == (stage, chunk.start)
    assert layout.locate(0)[0] == 0  # embedding in the first stage
    assert layout.locate(len(specs) - 1)[0] == pp_degree - 1  # head in the last stage
    if num_layers % (pp_degree * virtual) == 0:  # split by decoder layers: equal counts
        counts = {len([i for chunk in layout.chunks(s) for i in chunk if 0 < i <= num_layers]) for s in range(pp_degree)}
        assert counts == {num_layers // pp_degree}


def test_virtual_stages_interleave_segments_across_stages():
    layout = LlamaPolicyPipe.name_mapping_for(tiny_config("llama", num_hidden_layers=8), 2, 2).layout
    # segments of 2 decoder layers: stage 0 holds segments 0 and 2, stage 1 holds 1 and 3
    assert [list(chunk) for chunk in layout.chunks(0)] == [[0, 1, 2], [5, 6]]
    assert [list(chunk) for chunk in layout.chunks(1)] == [[3, 4], [7, 8, 9, 10]]
    assert layout.pipe_name(6, "self_attn.q_proj.weight") == "5.1.self_attn.q_proj.weight"
    assert layout.parse_pipe_name("5.1.self_attn.q_proj.weight") == (6, "self_attn.q_proj.weight")


@pytest.mark.parametrize(
    "num_layers,pp_degree,virtual,message",
    [(6, 4, 2, "layer:"), (6, 4, 1, None), (1, 4, 1, None), (3, 8, 1, "cannot fill")],
)
def test_impossible_pipeline_layouts_are_explained(num_layers, pp_degree, virtual, message):
    config = tiny_config("llama", num_hidden_layers=num_layers)
    if message is None:
        LlamaPolicyPipe.name_mapping_for(config, pp_degree, virtual)  # uniform fallback works
        return
    with pytest.raises(ValueError, match=message):
        LlamaPolicyPipe.name_mapping_for(config, pp_degree, virtual)


def test_layout_rejects_malformed_boundaries():
    with pytest.raises(ValueError, match="boundaries"):
        PipelineLayout((0, 3, 5), pp_degree=1)
    with pytest.raises(ValueError, match="never decrease"):
        PipelineLayout((0, 4, 3), pp_degree=2)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("role", ["policy", "value"])
@pytest.mark.parametrize("pp_degree,virtual", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_pipe_and_plain_names_are_a_bijection(architecture, role, pp_degree, virtual):
    config = tiny_config(architecture, num_hidden_layers=4)
    plain_model = build_model(architecture, "score" if role == "value" else "causal", num_hidden_layers=4)
    plain = plain_model.state_dict()
    mapping = pipe_model_class(architecture, role).name_mapping_for(config, pp_degree, virtual)

    pipe_names = [mapping.to_pipe(name) for name in plain]
    assert len(set(pipe_names)) == len(plain)
    assert [mapping.to_plain(name) for name in pipe_names] == list(plain)

    stages = mapping.split_by_stage(plain)
    assert len(stages) == pp_degree and all(stages)
    assert sum(len(stage) for stage in stages) == len(plain)
    rejoined = mapping.join_stages(stages)
    assert sorted(rejoined) == sorted(plain)
    assert all(rejoined[name] is plain[name] for name in plain)

    # PaddleNLP's naming: global layer index, then the layer's own parameter name
    num_layers = config.num_hidden_layers
    prefix = pipe_family(architecture).prefix
    if virtual == 1:
        assert mapping.to_pipe(f"{prefix}.embed_tokens.weight") == "0.embed_tokens.weight"
        assert mapping.to_pipe(f"{prefix}.layers.2.mlp.up_proj.weight") == "3.mlp.up_proj.weight"
        assert mapping.to_pipe(f"{prefix}.norm.weight") == f"{num_layers + 1}.norm.weight"
        head = "score_head.weight" if role == "value" else "lm_head.weight"
        assert mapping.to_pipe(head) == f"{num_layers + 2}.weight"


def test_name_mapping_rejects_names_it_cannot_place():
    mapping = LlamaPolicyPipe.name_mapping_for(tiny_config("llama"), 1)
    with pytest.raises(KeyError, match="belongs to no layer"):
        mapping.to_pipe("bert.pooler.weight")
    with pytest.raises(ValueError, match="tied word embeddings"):
        mapping.to_plain("shared_layers.llama_shared_weight.embed_tokens.weight")
    with pytest.raises(ValueError, match="holds only norm"):
        mapping.to_plain("3.embed_tokens.weight")
    with pytest.raises(ValueError, match="not a Pipe parameter name"):
        mapping.to_plain("99.weight")
    two_stage = LlamaPolicyPipe.name_mapping_for(tiny_config("llama"), 2)
    with pytest.raises(ValueError, match="belongs to stage"):
        two_stage.join_stages([{"4.weight": 0}, {}])


def test_plain_weights_through_pipe_names_and_back_give_identical_logits():
    original = build_model("llama", "causal", seed=1, num_hidden_layers=4)
    original.eval()
    mapping = LlamaPolicyPipe.name_mapping_for(original.config, 2, 2)
    stages = mapping.split_by_stage({name: value.numpy() for name, value in original.state_dict().items()})
    fresh = build_model("llama", "causal", seed=2, num_hidden_layers=4)
    fresh.eval()
    missing, unexpected = fresh.set_state_dict(mapping.join_stages(stages))
    assert not missing and not unexpected
    input_ids = paddle.to_tensor([[3, 1, 70, 71, 72, 73], [1, 80, 81, 82, 83, 84]], dtype="int64")
    attention_mask = input_ids != 3
    position_ids = make_position_ids(attention_mask)
    with paddle.no_grad():
        expected = original(input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
        actual = fresh(input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
    assert np.array_equal(expected.numpy(), actual.numpy())


# =============================================================================================
# Pipeline batches and last-stage losses vs the non-pipeline computation
# =============================================================================================


def make_experience(model, prompt_pad=(0, 2, 1), response_lengths=(5, 3, 4), seed=0) -> Experience:
    """A scored rollout of the tiny model: left-padded prompts (P=4), right-padded responses (T=5),
    old log-probs a little off the current policy so that ratios move and clipping happens."""
    rng = np.random.default_rng(seed)
    batch, prompt_length, response_length = len(prompt_pad), 4, 5
    ids = rng.integers(10, 500, size=(batch, prompt_length + response_length))
    mask = np.ones_like(ids, dtype=bool)
    for row, (pad, length) in enumerate(zip(prompt_pad, response_lengths)):
        mask[row, :pad] = False
        mask[row, prompt_length + length :] = False
    ids = np.where(mask, ids, 3)
    input_ids, attention_mask = paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)
    with paddle.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, position_ids=make_position_ids(attention_mask))[0]
        log_probs = gather_log_probs(logits[:, :-1], input_ids[:, 1:])
    shape = [batch, ids.shape[1] - 1]
    noise = lambda scale: paddle.to_tensor(rng.normal(0.0, scale, shape).astype("float32"))  # noqa: E731
    return Experience.build(
        input_ids,
        attention_mask,
        prompt_length,
        old_log_probs=log_probs + noise(0.3),
        reference_log_probs=log_probs + noise(0.1),
        old_values=noise(1.0),
        reward_scores=paddle.to_tensor(rng.normal(0.0, 1.0, [batch]).astype("float32")),
        kl_coeff=0.05,
        clip_range_score=5.0,
        gamma=1.0,
        gae_lambda=0.95,
    )


def make_ptx_batch(length: int, seed: int = 1) -> dict:
    """A right-padded supervised batch with the prompt part of the labels masked."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 500, size=(2, length))
    mask = np.ones_like(ids, dtype="int64")
    mask[1, length - 2 :] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX
    return {"input_ids": paddle.to_tensor(ids), "attention_mask": paddle.to_tensor(mask), "labels": paddle.to_tensor(labels)}


def first_micro_batch(pipeline_inputs):
    inputs, labels = pipeline_inputs
    return tuple(column[0] for column in inputs), tuple(column[0] for column in labels)


@pytest.fixture(scope="module")
def tiny_causal_lm():
    model = build_model("llama", "causal", seed=5)
    model.eval()
    return model


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("ptx_length", [None, 6, 12])
def test_policy_pipeline_loss_equals_the_non_pipeline_actor_step(tiny_causal_lm, reduction, ptx_length):
    model = tiny_causal_lm
    experience = make_experience(model)
    ptx_batch = make_ptx_batch(ptx_length) if ptx_length else None
    loss_config = PolicyLossConfig(clip_range_ratio=0.2, temperature=0.7, ptx_coeff=4.0, reduction=reduction)

    with paddle.no_grad():
        # Non-pipeline: what the actor trainer computes (PPO rows and ptx rows in separate forwards).
        logits = model(
            experience.input_ids, attention_mask=experience.attention_mask, position_ids=experience.position_ids
        )[0]
        log_probs = gather_log_probs(logits[:, :-1] / loss_config.temperature, experience.input_ids[:, 1:])
        expected = actor_clipped_loss(
            log_probs, experience.old_log_probs, experience.advantages, experience.action_mask, 0.2, reduction
        )
        if ptx_batch is not None:
            ptx_logits = model(ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"])[0]
            expected = expected + 4.0 * supervised_lm_loss(ptx_logits, ptx_batch["labels"])

        # Pipeline: one micro-batch with the supervised rows appended, loss in the "last stage".
        inputs, labels = first_micro_batch(prepare_policy_pipeline_inputs({"experience": experience, "ptx_batch": ptx_batch}))
        input_ids, attention_mask, row_indices, position_ids = inputs
        assert row_indices is None and attention_mask.dtype == paddle.bool and position_ids.dtype == paddle.int64
        assert len(labels) == (5 if ptx_batch is not None else 4)
        pipe_logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
        actual = PolicyPipeLoss(loss_config)(pipe_logits, labels)

    assert abs(float(actual) - float(expected)) < 1e-5 * max(1.0, abs(float(expected)))
    # The batch exercises the clip: without it the actor loss would differ.
    args = (log_probs, experience.old_log_probs, experience.advantages, experience.action_mask)
    assert abs(float(actor_clipped_loss(*args, 1e6, reduction)) - float(actor_clipped_loss(*args, 0.2, reduction))) > 1e-4


def test_value_pipeline_loss_equals_the_non_pipeline_critic_step(tiny_causal_lm):
    critic = build_model("llama", "score", seed=6)
    critic.eval()
    experience = make_experience(tiny_causal_lm)
    loss_config = ValueLossConfig(clip_range_value=0.5)
    with paddle.no_grad():
        values = critic(experience.input_ids, experience.attention_mask, experience.position_ids).scores[:, :-1, 0]
        expected = critic_clipped_loss(values, experience.old_values, experience.returns, experience.action_mask, 0.5)
        inputs, labels = first_micro_batch(prepare_value_pipeline_inputs({"experience": experience, "stats": None}))
        scores = critic(inputs[0], inputs[1], inputs[3]).scores
        actual = ValuePipeLoss(loss_config)(scores, labels)
    assert abs(float(actual) - float(expected)) < 1e-6 * max(1.0, abs(float(expected)))


def test_micro_batches_travel_as_lists_and_share_one_label_structure(tiny_causal_lm):
    short = make_experience(tiny_causal_lm, seed=0)
    longer = make_experience(tiny_causal_lm, prompt_pad=(1, 0), response_lengths=(5, 2), seed=1)
    ptx = make_ptx_batch(12)
    inputs, labels = prepare_policy_pipeline_inputs(
        [{"experience": short, "ptx_batch": ptx}, {"experience": longer, "ptx_batch": None}]
    )
    assert len(inputs) == 4 and all(len(column) == 2 for column in inputs)
    assert inputs[2] == [None, None]  # attn_mask_startend_row_indices slot stays empty
    assert len(labels) == 5 and all(len(column) == 2 for column in labels)
    assert list(inputs[0][0].shape) == [3 + 2, 12]  # experience rows + ptx rows, padded to 12
    assert list(inputs[0][1].shape) == [2, 9]
    assert bool((labels[4][1] == IGNORE_INDEX).all())  # no ptx in the second micro-batch: ptx loss 0
    assert not bool(labels[3][0][3:].any())  # ptx rows carry no action
    for column in inputs[:2] + inputs[3:] + labels:
        assert all(tensor.ndim == 2 for tensor in column)  # the engine slices data[begin:end, :]

    value_micro_batch = ((short.input_ids,), (short.old_values, short.returns, short.action_mask))
    policy_micro_batch = ((short.input_ids,), (short.input_ids, short.old_log_probs, short.advantages, short.action_mask))
    with pytest.raises(ValueError, match="different label structures"):
        stack_micro_batches([value_micro_batch, policy_micro_batch])
    with pytest.raises(ValueError, match="'experience' entry"):
        prepare_policy_pipeline_inputs({"input_ids": short.input_ids})
    with pytest.raises(KeyError, match="labels"):
        prepare_policy_pipeline_inputs({"experience": short, "ptx_batch": {"input_ids": ptx["input_ids"]}})


def test_loss_configs_and_pipe_classes_validate_their_inputs():
    with pytest.raises(ValueError, match="clip_range_ratio"):
        PolicyLossConfig(clip_range_ratio=0.0)
    with pytest.raises(ValueError, match="token-mean"):
        PolicyLossConfig(clip_range_ratio=0.2, reduction="mean")
    with pytest.raises(ValueError, match="clip_range_value"):
        ValueLossConfig(clip_range_value=-1.0)
    with pytest.raises(ValueError, match="available: .*llama/policy"):
        pipe_model_class("bert", "policy")
    with pytest.raises(ValueError, match="policy pipeline labels"):
        PolicyPipeLoss(PolicyLossConfig(0.2))(paddle.zeros([1, 3, 8]), (paddle.zeros([1, 3]),))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        LlamaPolicyPipe(tiny_config("llama", tie_word_embeddings=True), loss_config=PolicyLossConfig(0.2))
    with pytest.raises(TypeError, match="PolicyLossConfig"):
        LlamaPolicyPipe(tiny_config("llama"), loss_config=None)
    with pytest.raises(TypeError, match="ValueLossConfig"):
        LlamaValuePipe(tiny_config("llama"), loss_config=PolicyLossConfig(0.2))
    assert pipe_model_class("qwen2", "value") is Qwen2ValuePipe and pipe_model_class("qwen2", "policy") is Qwen2PolicyPipe


# =============================================================================================
# Real Pipe / TP models under fleet (child processes running this file as a worker)
# =============================================================================================


def _init_fleet(mp_degree: int, pp_degree: int, virtual_pp_degree: int = 1) -> None:
    from paddle.distributed import fleet

    # CPU builds of Paddle never set ParallelEnv._device_id, which PipelineLayer reads once and
    # only stores; a class-level default lets the Pipe layers be built on CPU.
    if not hasattr(paddle.distributed.ParallelEnv(), "_device_id"):
        paddle.distributed.ParallelEnv._device_id = 0
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": mp_degree, "pp_degree": pp_degree, "sharding_degree": 1}
    strategy.pipeline_configs = {"accumulate_steps": 1, "micro_batch_size": 1}
    fleet.init(is_collective=True, strategy=strategy)


def _save_model(model, directory: str) -> str:
    model.save_pretrained(directory)
    return directory


def _check(name: str, condition: bool, detail: str = "") -> None:
    if not condition:
        raise AssertionError(f"CHECK {name} failed {detail}")
    print(f"CHECK {name} ok", flush=True)


def _same_state(name: str, actual: dict, expected: dict) -> None:
    _check(f"{name}-keys", sorted(actual) == sorted(expected), f"{sorted(set(actual) ^ set(expected))[:5]}")
    bad = [key for key in expected if not np.array_equal(np.asarray(actual[key]), np.asarray(expected[key]))]
    _check(f"{name}-values", not bad, f"{bad[:5]}")


def _worker_single_stage(work_dir: str) -> None:
    """pipeline degree 1: real Pipe models against the plain models and PaddleNLP's own naming."""
    _init_fleet(mp_degree=1, pp_degree=1)
    paddle.set_device("cpu")
    for architecture in ("llama", "qwen2"):
        causal = build_model(architecture, "causal", seed=11)
        causal_dir = _save_model(causal, os.path.join(work_dir, f"{architecture}_causal"))
        score = build_model(architecture, "score", seed=12)
        score_dir = _save_model(score, os.path.join(work_dir, f"{architecture}_score"))
        causal.eval(), score.eval()

        # Policy: structure and names
        loss_config = PolicyLossConfig(clip_range_ratio=0.2, temperature=0.8, ptx_coeff=2.0)
        policy_class = pipe_model_class(architecture, "policy")
        policy = policy_class.from_pretrained(causal_dir, loss_config=loss_config, dtype="float32")
        policy.eval()
        specs = policy_class.pipe_layer_specs(policy.config)
        _check(f"{architecture}-policy-layer-classes", [d.layer_func for d in policy.get_sequential_layers()] == [s.layer_class for s in specs])
        _check(
            f"{architecture}-policy-prefixes",
            policy.get_sequential_name_prefixes() == {str(i): s.name_prefix for i, s in enumerate(specs)},
        )
        mapping = policy.name_mapping()
        raw = paddle.nn.Layer.state_dict(policy)
        paddlenlp_named = policy.state_dict()  # PaddleNLP's own Pipe -> plain renaming
        _check(f"{architecture}-policy-names-match-paddlenlp", sorted(mapping.to_plain(k) for k in raw) == sorted(paddlenlp_named))
        _check(f"{architecture}-policy-names-cover-plain-model", sorted(paddlenlp_named) == sorted(causal.state_dict()))
        _same_state(f"{architecture}-policy-loaded", {mapping.to_plain(k): v.numpy() for k, v in raw.items()}, numpy_state(causal))

        # Policy: forward and last-stage loss against the plain model
        experience = make_experience(causal)
        ptx_batch = make_ptx_batch(12)
        inputs, labels = first_micro_batch(prepare_policy_pipeline_inputs({"experience": experience, "ptx_batch": ptx_batch}))
        with paddle.no_grad():
            pipe_logits = policy(inputs)
            plain_logits = causal(inputs[0], attention_mask=inputs[1], position_ids=inputs[3])[0]
        _check(f"{architecture}-policy-logits", np.allclose(pipe_logits.numpy(), plain_logits.numpy(), atol=1e-5))
        policy.train()
        # `_loss_fn` is what Paddle's pipeline engine calls in the last stage with (output, labels).
        pipe_loss = policy._loss_fn[0](policy(inputs), labels)
        expected = PolicyPipeLoss(loss_config)(plain_logits, labels)
        _check(f"{architecture}-policy-loss", abs(float(pipe_loss) - float(expected)) < 1e-5, f"{float(pipe_loss)} vs {float(expected)}")
        pipe_loss.backward()
        embedding_grad = raw["0.embed_tokens.weight"].grad
        _check(f"{architecture}-policy-backward", embedding_grad is not None and float(embedding_grad.abs().sum()) > 0)

        # Value: scores, loss, and a checkpoint the plain score model loads
        value_class = pipe_model_class(architecture, "value")
        value = value_class.from_pretrained(score_dir, loss_config=ValueLossConfig(clip_range_value=0.5), dtype="float32")
        value.eval()
        value_mapping = value.name_mapping()
        _same_state(
            f"{architecture}-value-loaded",
            {value_mapping.to_plain(k): v.numpy() for k, v in paddle.nn.Layer.state_dict(value).items()},
            numpy_state(score),
        )
        inputs, labels = first_micro_batch(prepare_value_pipeline_inputs({"experience": experience}))
        with paddle.no_grad():
            pipe_scores = value(inputs)
            plain_scores = score(inputs[0], inputs[1], inputs[3]).scores
            pipe_value_loss = value._loss_fn[0](pipe_scores, labels)
            plain_value_loss = critic_clipped_loss(plain_scores[:, :-1, 0], *labels, 0.5)
        _check(f"{architecture}-value-scores", np.allclose(pipe_scores.numpy(), plain_scores.numpy(), atol=1e-5))
        _check(f"{architecture}-value-loss", abs(float(pipe_value_loss) - float(plain_value_loss)) < 1e-5)
        saved = _save_model(value, os.path.join(work_dir, f"{architecture}_value_pipe_saved"))
        reloaded = SCORE_CLASSES[architecture].from_pretrained(saved, dtype="float32")
        _same_state(f"{architecture}-value-saved", numpy_state(reloaded), numpy_state(score))

    # Virtual stages: chunked names ("0.1.self_attn...") agree with PaddleNLP's renaming
    config = tiny_config("llama", num_hidden_layers=4)
    config.virtual_pp_degree = 2
    paddle.seed(0)
    chunked = LlamaPolicyPipe(config, loss_config=PolicyLossConfig(0.2))
    raw_names = list(paddle.nn.Layer.state_dict(chunked))
    mapping = chunked.name_mapping()
    _check("virtual-names-are-chunked", raw_names[0] == "0.0.embed_tokens.weight" and any(n.startswith("3.0.") for n in raw_names), str(raw_names[:3]))
    _check("virtual-names-match-paddlenlp", sorted(mapping.to_plain(n) for n in raw_names) == sorted(chunked.state_dict()))
    _check("virtual-layout-matches-offline", mapping.layout == LlamaPolicyPipe.name_mapping_for(config, 1, 2).layout)

    # Tied word embeddings: the value model has no LM head, so its embedding is an ordinary layer
    tied_value = Qwen2ValuePipe(tiny_config("qwen2", tie_word_embeddings=True), loss_config=ValueLossConfig(0.5))
    names = list(paddle.nn.Layer.state_dict(tied_value))
    plain_names = sorted(tied_value.name_mapping().to_plain(name) for name in names)
    _check("tied-value-embedding-unshared", not any(n.startswith("shared_layers") for n in names) and plain_names == sorted(tied_value.state_dict()))


def _worker_tensor_parallel(work_dir: str) -> None:
    """2 ranks, tensor parallel 2: PaddleNLP's TP models built from single checkpoints hold exactly
    our offline shards; their checkpoints merge back; eval-mode sync gathers or keeps shards."""
    import paddle.distributed as dist
    from paddle.distributed import fleet

    from ppo.models.parallel_utils import eval_model_config, sync_eval_model_from_pipeline

    _init_fleet(mp_degree=2, pp_degree=1)
    mp_rank, rank = fleet.get_hybrid_communicate_group().get_model_parallel_rank(), dist.get_rank()
    causal_dir, score_dir = os.path.join(work_dir, "causal"), os.path.join(work_dir, "score")
    full_causal = numpy_state(LlamaForCausalLM.from_pretrained(causal_dir, dtype="float32"))
    full_score = numpy_state(LlamaModelForScore.from_pretrained(score_dir, dtype="float32"))

    # The plain score model split on load by PaddleNLP with the score-model mappings
    config = LlamaModelForScore.config_class.from_pretrained(score_dir)
    config.tensor_parallel_degree, config.tensor_parallel_rank = 2, mp_rank
    tp_score = LlamaModelForScore.from_pretrained(score_dir, config=config, dtype="float32")
    score_shard = split_state_dict(LlamaModelForScore, config, full_score, 2)[mp_rank]
    _same_state("tp-score-loaded-shard", numpy_state(tp_score), score_shard)
    merged_dir, per_rank_dir = os.path.join(work_dir, "score_merged"), os.path.join(work_dir, "score_per_rank")
    tp_score.save_pretrained(merged_dir, merge_tensor_parallel=True, is_main_process=rank == 0)
    tp_score.save_pretrained(per_rank_dir, is_main_process=rank == 0)

    # A Pipe policy / value model on one stage with TP layers, synced into the rollout models
    # As in PaddleNLP's run scripts, the config read with the checkpoint carries the TP degree/rank:
    # from_pretrained splits the weights before the Pipe constructor looks at the topology.
    policy_config = LlamaConfig.from_pretrained(causal_dir)
    policy_config.tensor_parallel_degree, policy_config.tensor_parallel_rank = 2, mp_rank
    policy = LlamaPolicyPipe.from_pretrained(causal_dir, config=policy_config, loss_config=PolicyLossConfig(0.2), dtype="float32")
    shard = split_state_dict(LlamaForCausalLM, policy.config, full_causal, 2)[mp_rank]
    mapping = policy.name_mapping()
    _same_state("tp-policy-loaded-shard", {mapping.to_plain(k): v.numpy() for k, v in paddle.nn.Layer.state_dict(policy).items()}, shard)
    single = LlamaForCausalLM(eval_model_config(policy.config, "single"))
    sync_eval_model_from_pipeline(policy, single, "single")
    _same_state("tp-eval-single", numpy_state(single), full_causal)
    kept = LlamaForCausalLM(eval_model_config(policy.config, "tensor_parallel"))
    sync_eval_model_from_pipeline(policy, kept, "tensor_parallel")
    _same_state("tp-eval-tensor-parallel", numpy_state(kept), shard)
    value = LlamaValuePipe.from_pretrained(score_dir, config=config, loss_config=ValueLossConfig(0.5), dtype="float32")
    value_single = LlamaModelForScore(eval_model_config(value.config, "single"))
    sync_eval_model_from_pipeline(value, value_single, "single")
    _same_state("tp-value-eval-single", numpy_state(value_single), full_score)

    dist.barrier()
    if rank == 0:
        _same_state("tp-score-saved-merged", numpy_state(LlamaModelForScore.from_pretrained(merged_dir, dtype="float32")), full_score)
        _check("tp-score-per-rank-files", sorted(find_parallel_shard_files(per_rank_dir)) == [(0, 0), (1, 0)])
        merged = merge_parallel_checkpoint(per_rank_dir, os.path.join(work_dir, "score_per_rank_merged"))
        _same_state("tp-score-offline-merged", numpy_state(LlamaModelForScore.from_pretrained(merged, dtype="float32")), full_score)
    dist.barrier()


def _worker_pipeline_parallel(work_dir: str) -> None:
    """2 ranks, pipeline parallel 2: each stage holds what the offline layout predicts; eval-mode
    sync rebuilds the full model on every rank; per-stage checkpoints merge back."""
    import paddle.distributed as dist
    from paddle.distributed import fleet

    from ppo.models.parallel_utils import eval_model_config, sync_eval_model_from_pipeline

    _init_fleet(mp_degree=1, pp_degree=2)
    stage, rank = fleet.get_hybrid_communicate_group().get_stage_id(), dist.get_rank()
    causal_dir, score_dir = os.path.join(work_dir, "causal"), os.path.join(work_dir, "score")
    plain_causal = LlamaForCausalLM.from_pretrained(causal_dir, dtype="float32")
    plain_causal.eval()
    full_causal = numpy_state(plain_causal)
    full_score = numpy_state(LlamaModelForScore.from_pretrained(score_dir, dtype="float32"))

    policy = LlamaPolicyPipe.from_pretrained(causal_dir, loss_config=PolicyLossConfig(0.2), dtype="float32")
    mapping = policy.name_mapping()
    _check("pp-layout-matches-offline", mapping.layout == LlamaPolicyPipe.name_mapping_for(policy.config, 2).layout)
    expected_stage = mapping.split_by_stage(full_causal)[stage]
    _same_state("pp-stage-weights", {k: v.numpy() for k, v in paddle.nn.Layer.state_dict(policy).items()}, expected_stage)

    for eval_mode in ("single", "tensor_parallel"):  # identical without tensor parallel
        rollout_model = LlamaForCausalLM(eval_model_config(policy.config, eval_mode))
        rollout_model.eval()
        sync_eval_model_from_pipeline(policy, rollout_model, eval_mode)
        _same_state(f"pp-eval-{eval_mode}", numpy_state(rollout_model), full_causal)
    input_ids = paddle.to_tensor([[3, 1, 70, 71, 72], [1, 80, 81, 82, 83]], dtype="int64")
    attention_mask = input_ids != 3
    with paddle.no_grad():
        args = dict(attention_mask=attention_mask, position_ids=make_position_ids(attention_mask))
        same = np.array_equal(rollout_model(input_ids, **args)[0].numpy(), plain_causal(input_ids, **args)[0].numpy())
    _check("pp-eval-logits", same)

    value = LlamaValuePipe.from_pretrained(score_dir, loss_config=ValueLossConfig(0.5), dtype="float32")
    value_single = LlamaModelForScore(eval_model_config(value.config, "single"))
    sync_eval_model_from_pipeline(value, value_single, "single")
    _same_state("pp-value-eval-single", numpy_state(value_single), full_score)

    per_stage_dir = os.path.join(work_dir, "policy_per_stage")
    # Like PaddleNLP's Trainer, name the files per stage: save_pretrained alone adds the suffix
    # only under tensor parallel, so every stage would write the same model_state.pdparams.
    from paddlenlp.transformers.utils import weight_name_suffix

    policy.save_pretrained(per_stage_dir, variant=weight_name_suffix(), is_main_process=rank == 0)
    dist.barrier()
    if rank == 0:
        _check("pp-per-stage-files", sorted(find_parallel_shard_files(per_stage_dir)) == [(0, 0), (0, 1)])
        merged = merge_parallel_checkpoint(per_stage_dir, os.path.join(work_dir, "policy_merged"))
        _same_state("pp-offline-merged", numpy_state(LlamaForCausalLM.from_pretrained(merged, dtype="float32")), full_causal)
    dist.barrier()


def _run(command, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("PADDLE_TRAINERS_NUM", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_real_pipe_models_match_the_plain_models_on_one_stage(tmp_path):
    result = _run([sys.executable, __file__, "single-stage", str(tmp_path)], cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith("CHECK")]
    assert len(checks) == 2 * 15 + 4 and all(line.endswith(" ok") for line in checks), checks


def _launch_worker(tmp_path, worker: str):
    """Run `worker` of this file on 2 CPU processes; {log name: CHECK lines}."""
    build_model("llama", "causal", seed=21, num_hidden_layers=4, num_key_value_heads=2).save_pretrained(str(tmp_path / "causal"))
    build_model("llama", "score", seed=22, num_hidden_layers=4, num_key_value_heads=2).save_pretrained(str(tmp_path / "score"))
    log_dir = tmp_path / "logs"
    command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir), "--nproc_per_node", "2",
               __file__, worker, str(tmp_path)]
    result = _run(command, cwd=str(tmp_path), timeout=600)
    logs = {path.name: path.read_text(errors="replace") for path in sorted(log_dir.glob("workerlog.*"))}
    assert result.returncode == 0, "\n".join(text[-2500:] for text in logs.values()) or result.stderr[-3000:]
    return {name: [line for line in text.splitlines() if line.startswith("CHECK")] for name, text in logs.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_models_load_save_and_sync_on_cpu(tmp_path):
    checks = _launch_worker(tmp_path, "tensor-parallel")
    assert sorted(checks) == ["workerlog.0", "workerlog.1"]
    for name, lines in checks.items():
        expected = 10 + (5 if name == "workerlog.0" else 0)
        assert len(lines) == expected and all(line.endswith(" ok") for line in lines), (name, lines)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_stages_sync_and_merge_on_cpu(tmp_path):
    checks = _launch_worker(tmp_path, "pipeline-parallel")
    assert sorted(checks) == ["workerlog.0", "workerlog.1"]
    for name, lines in checks.items():
        expected = 10 + (3 if name == "workerlog.0" else 0)
        assert len(lines) == expected and all(line.endswith(" ok") for line in lines), (name, lines)


if __name__ == "__main__":
    _workers = {
        "single-stage": _worker_single_stage,
        "tensor-parallel": _worker_tensor_parallel,
        "pipeline-parallel": _worker_pipeline_parallel,
    }
    _workers[sys.argv[1]](sys.argv[2])
