"""The benchmarks' FLOP count (benchmarks/flops.py) against hand counts, and the `--shapes` entries
against the models they build."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flops  # noqa: E402
from shapes import SHAPES, build_causal_lm, llama_config  # noqa: E402

# d 8, 2 layers, 2 heads of 4, 1 KV head, intermediate 16, vocabulary 32.
TINY = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, vocab_size=32)


def test_layer_weights_by_hand():
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate, up 8x16 + down 16x8
    assert flops.layer_weight_params(flops.Decoder.from_shapes(TINY)) == 64 + 32 + 32 + 64 + 128 + 128 + 128


def test_ppo_step_flops_by_hand():
    model = flops.Decoder.from_shapes(TINY)
    passes = flops.ppo_step_flops(model, batch=1, prompt_len=2, new_tokens=2)
    weights = 2 * 576  # FLOPs per token and layer
    attention_pair = 4 * 2 * 4  # QK and AV, 2 heads of 4, per (query, key) pair and layer
    # Generation: prompt 2 + 1 fed-back token = 3 tokens through 2 layers, logits at 2
    # positions, causal pairs 1 + 2 + 3.
    generation = 3 * 2 * weights + 2 * 2 * 8 * 32 + 6 * 2 * attention_pair
    # Over the whole sequence of 4: pairs 1 + 2 + 3 + 4; LM head at the 2 response positions.
    body = 4 * 2 * weights + 10 * 2 * attention_pair
    policy = body + 2 * 2 * 8 * 32
    critic = body + 2 * 2 * 8  # 1-column value head at the 2 response positions
    reward = body + 2 * 1 * 8  # one score per sequence
    assert generation == 8320 and policy == 10880
    assert passes == {
        "generation": generation,
        "actor_scoring_forward": policy,
        "reference_forward": policy,
        "reward_forward": reward,
        "critic_scoring_forward": critic,
        "actor_train_forward": policy,
        "actor_train_backward": 2 * policy,
        "critic_train_forward": critic,
        "critic_train_backward": 2 * critic,
    }
    assert flops.by_bench_phase(passes) == {
        "generation": generation,
        "scoring": 2 * policy + reward + critic,
        "actor": 3 * policy,
        "critic": 3 * critic,
    }


def test_critic_free_and_rollout_log_prob_steps_drop_their_passes():
    model = flops.Decoder.from_shapes(TINY)
    full = flops.ppo_step_flops(model, batch=2, prompt_len=3, new_tokens=2)
    grpo = flops.ppo_step_flops(model, batch=2, prompt_len=3, new_tokens=2, with_critic=False, with_actor_scoring=False)
    assert set(full) - set(grpo) == {
        "critic_scoring_forward", "critic_train_forward", "critic_train_backward", "actor_scoring_forward",
    }  # fmt: skip
    assert all(grpo[name] == full[name] for name in grpo)
    assert "critic" not in flops.by_bench_phase(grpo)
    # Old values from the critic's update: its training passes stay, its scoring forward goes.
    shortcut = flops.ppo_step_flops(model, batch=2, prompt_len=3, new_tokens=2, with_critic_scoring=False)
    assert set(full) - set(shortcut) == {"critic_scoring_forward"}
    assert flops.by_bench_phase(shortcut)["critic"] == flops.by_bench_phase(full)["critic"]


def test_floor_report_divides_by_the_rate():
    passes = {"generation": 2e9, "actor_scoring_forward": 1e9, "actor_train_forward": 1e9}
    report = flops.floor_report(passes, gflops_per_second=10.0, measured={"generation": 0.4, "scoring": 0.2, "actor": 0.0}, step_seconds=2.0)
    assert report["floor_seconds"] == pytest.approx(0.4)
    assert report["floor_seconds_without_optional_passes"] == pytest.approx(0.3)  # no actor scoring forward
    assert report["share_of_floor"] == pytest.approx(0.2)
    assert report["phase_floor_seconds"] == pytest.approx({"generation": 0.2, "scoring": 0.1, "actor": 0.1})
    assert report["phase_share_of_floor"] == pytest.approx({"generation": 0.5, "scoring": 0.5})  # a 0 s phase has no share


def test_prompt_pass_is_the_batched_part_of_generation():
    model = flops.Decoder.from_shapes(TINY)
    weights, attention_pair = 2 * 576, 4 * 2 * 4
    # 2 prompt tokens through 2 layers, causal pairs 1 + 2, logits at the last position only.
    assert flops.prompt_pass_flops(model, batch=1, prompt_len=2) == 2 * 2 * weights + 3 * 2 * attention_pair + 2 * 1 * 8 * 32
    assert flops.prompt_pass_flops(model, batch=3, prompt_len=2) == 3 * flops.prompt_pass_flops(model, batch=1, prompt_len=2)


def test_streaming_floor_takes_the_larger_generation_bound():
    passes = {"generation": 2e9, "actor_train_forward": 1e9}
    measured = {"generation": 1.0, "actor": 0.5}
    # Memory-bound generation (0.8 s > its 0.2 s FLOP floor) replaces the FLOP floor.
    slow = flops.floor_report(passes, 10.0, measured, step_seconds=2.0, streaming_generation_seconds=0.8)
    assert slow["floor_seconds"] == pytest.approx(0.3)
    assert slow["streaming_floor_seconds"] == pytest.approx(0.9)
    assert slow["share_of_streaming_floor"] == pytest.approx(0.45)
    assert slow["generation_share_of_streaming_floor"] == pytest.approx(0.8)
    # A streaming bound under the FLOP floor leaves the floor as it is.
    fast = flops.floor_report(passes, 10.0, measured, step_seconds=2.0, streaming_generation_seconds=0.05)
    assert fast["streaming_floor_seconds"] == pytest.approx(fast["floor_seconds"])
    assert "streaming_floor_seconds" not in flops.floor_report(passes, 10.0, measured, step_seconds=2.0)


def test_smollm2_shapes_match_the_published_parameter_count():
    # SmolLM2-135M-Instruct: 134,515,008 parameters (tied embeddings).
    assert flops.parameter_count(flops.Decoder.from_shapes(SHAPES["smollm2"]), tied_embeddings=True) == 134_515_008


def test_smollm2_config_carries_the_architecture():
    config = llama_config(SHAPES["smollm2"], max_position_embeddings=96)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (576, 30, 9, 3)
    assert (config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (1536, 49152, True)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5


def test_flop_count_matches_the_built_model_weights():
    """The weight matmuls counted per token are the model's 2-D weights: layers plus the (tied) LM head."""
    shapes = dict(TINY, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
    model = build_causal_lm(shapes, max_position_embeddings=8)
    assert model.lm_head.weight is model.llama.embed_tokens.weight
    decoder = flops.Decoder.from_shapes(shapes)
    layer_weights = sum(int(p.numel()) for name, p in model.named_parameters() if ".layers." in name and len(p.shape) == 2)
    assert layer_weights == decoder.layers * flops.layer_weight_params(decoder)
    total = sum(int(p.numel()) for p in model.parameters())
    assert total == flops.parameter_count(decoder, tied_embeddings=True)
