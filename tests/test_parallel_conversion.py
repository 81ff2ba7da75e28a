"""Tensor- and pipeline-parallel weight conversion and the Pipe models' losses.

Most tests need no communication: TP split/merge through PaddleNLP's mappings, pipeline stage
layouts from Paddle's `SegmentLayers`, Pipe <-> plain names, and the pipeline batches + last-stage
losses against the non-pipeline computation. Tests that need `fleet.init` run this file as a
worker in a child process (so the hybrid-parallel state never leaks into the rest of the suite):
one process with pipeline degree 1 builds real Pipe models; a 4-process CPU launch
(tensor parallel 2 x pipeline parallel 2) builds real TP/PP stages from a single checkpoint and
checks checkpoint merging and the eval-mode weight sync. Forward passes through TP layers or
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
    value_pipe_specs,
)
from ppo.models.parallel_utils import (  # noqa: E402
    check_tensor_parallel_degree,
    eval_model_config,
    find_parallel_shard_files,
    merge_parallel_checkpoint,
    merge_state_dicts,
    split_state_dict,
)
from ppo.models.pp_model_utils import (  # noqa: E402
    PipelineLayout,
    pipe_name_mapping,
    pipeline_layout,
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
