"""Matrix-arithmetic FLOPs of one PPO step, counted from the model shapes (pure: no Paddle).

A matmul of [m, k] x [k, n] costs 2·m·k·n FLOPs (a multiply and an add per term). For a Llama
decoder with hidden d, L layers, h query heads of width e = d/h, g key/value heads, intermediate
f and vocabulary V:

    weight matmuls per token and layer   W = d·h·e (q) + 2·d·g·e (k, v) + h·e·d (o) + 3·d·f (gate, up, down)
    forward over n tokens                2·n·L·W
    output head over m positions         2·m·d·c       c = V for the LM head, 1 for a score head
    attention over p (query, key) pairs  4·L·h·e·p     QKᵀ and AV, 2·h·e FLOPs each per pair
    backward                             2 × forward   gradients w.r.t. activations and weights

with p = T(T+1)/2 per causal sequence of T tokens (a query sees itself and the keys before it).

Only what a step has to compute is counted, so the resulting time is a floor:
  * generation with a KV cache runs the prompt and then every new token but the last through
    the layers (P + N - 1 tokens per row) and needs logits at N positions;
  * a policy forward over prompt + response (T = P + N) needs logits only at the N positions
    that predict response tokens; the critic needs its value at those N positions, the reward
    model one score per sequence;
  * norms, RoPE, softmax, SiLU, sampling, losses and the optimizer are O(tokens·d) and left out.

The phases are those `bench_ppo.py` runs: one rollout, four scoring forwards (actor, reference,
reward, critic), then one update of actor and critic (forward + backward) over the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

# Which measured phase of bench_ppo.py each counted pass belongs to.
BENCH_PHASE = {
    "generation": "generation",
    "actor_scoring_forward": "scoring",
    "reference_forward": "scoring",
    "reward_forward": "scoring",
    "critic_scoring_forward": "scoring",
    "actor_train_forward": "actor",
    "actor_train_backward": "actor",
    "critic_train_forward": "critic",
    "critic_train_backward": "critic",
}
# The passes a step can drop: the rollout engine can return the old log-probs itself (TRL takes
# them from generation too), and the critic's first training forward can give the old values
# (`ppo.values_from_update`), so the floor is also given without them.
OPTIONAL_PASSES = ("actor_scoring_forward", "critic_scoring_forward")


@dataclass(frozen=True)
class Decoder:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_shapes(cls, shapes: dict) -> "Decoder":
        """From a `LlamaConfig`-style dict (a `SHAPES` entry); KV heads default to the heads."""
        return cls(
            hidden=shapes["hidden_size"],
            layers=shapes["num_hidden_layers"],
            heads=shapes["num_attention_heads"],
            kv_heads=shapes.get("num_key_value_heads") or shapes["num_attention_heads"],
            intermediate=shapes["intermediate_size"],
            vocab=shapes["vocab_size"],
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def layer_weight_params(model: Decoder) -> int:
    """Weights a token meets in the matmuls of one layer (W above)."""
    d, e = model.hidden, model.head_dim
    return d * model.heads * e + 2 * d * model.kv_heads * e + model.heads * e * d + 3 * d * model.intermediate


def parameter_count(model: Decoder, tied_embeddings: bool) -> int:
    """All parameters of the causal LM (layers, the two RMSNorm weights per layer, final norm,
    embeddings and, when untied, the LM head) — for checking the shapes against a published count."""
    d = model.hidden
    embeddings = model.vocab * d * (1 if tied_embeddings else 2)
    return model.layers * (layer_weight_params(model) + 2 * d) + d + embeddings


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over `length` tokens."""
    return length * (length + 1) // 2


def forward_flops(model: Decoder, tokens: int, head_positions: int, head_width: int, attention_pairs: int) -> int:
    """One forward: `tokens` through every layer, an output head of `head_width` columns at
    `head_positions` positions, attention over `attention_pairs` (query, key) pairs."""
    body = 2 * tokens * model.layers * layer_weight_params(model)
    head = 2 * head_positions * model.hidden * head_width
    attention = 4 * model.layers * model.heads * model.head_dim * attention_pairs
    return body + head + attention


def ppo_step_flops(
    model: Decoder, batch: int, prompt_len: int, new_tokens: int, with_critic: bool = True, with_actor_scoring: bool = True,
    with_critic_scoring: bool = True,
) -> Dict[str, int]:
    """FLOPs of each pass of one PPO step (keys of `BENCH_PHASE`): `batch` responses of
    `new_tokens` to prompts of `prompt_len` tokens, one update over all of them. The reward
    model and critic share the policy's backbone shapes, with a 1-column head. Critic-free
    algorithms (GRPO, RLOO) have no critic passes (`with_critic`); with the rollout's old
    log-probs there is no actor scoring forward (`with_actor_scoring`), with old values from the
    critic's update no critic scoring forward (`with_critic_scoring`)."""
    total = prompt_len + new_tokens
    rolled = prompt_len + new_tokens - 1  # the last sampled token is never fed back
    generation = forward_flops(model, batch * rolled, batch * new_tokens, model.vocab, batch * causal_pairs(rolled))

    def over_sequences(head_positions: int, head_width: int) -> int:
        return forward_flops(model, batch * total, head_positions, head_width, batch * causal_pairs(total))

    policy = over_sequences(batch * new_tokens, model.vocab)
    critic = over_sequences(batch * new_tokens, 1)
    reward = over_sequences(batch, 1)
    passes = {
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
    dropped = (
        ([] if with_critic else [name for name in passes if name.startswith("critic")])
        + ([] if with_actor_scoring else ["actor_scoring_forward"])
        + ([] if with_critic_scoring else ["critic_scoring_forward"])
    )
    return {name: flops for name, flops in passes.items() if name not in dropped}


def prompt_pass_flops(model: Decoder, batch: int, prompt_len: int) -> int:
    """The part of the generation pass that runs as one batched forward: the prompts, with
    logits at their last position only. The rest of generation is one row per sequence a step."""
    return forward_flops(model, batch * prompt_len, batch, model.vocab, batch * causal_pairs(prompt_len))


def by_bench_phase(passes: Dict[str, int]) -> Dict[str, int]:
    """Sum the passes into bench_ppo.py's measured phases (generation, scoring, actor, critic)."""
    phases: Dict[str, int] = {}
    for name, flops in passes.items():
        phases[BENCH_PHASE[name]] = phases.get(BENCH_PHASE[name], 0) + flops
    return phases


def floor_report(
    passes: Dict[str, int],
    gflops_per_second: float,
    measured: Dict[str, float],
    step_seconds: float,
    streaming_generation_seconds: Optional[float] = None,
) -> dict:
    """Floor seconds (FLOPs at the measured GEMM rate) per phase and per step, and the share of
    it a run reached (floor / measured time: 1.0 would mean every FLOP ran at the probe's rate).

    Decoding a few rows multiplies them by every weight once per token, so generation is bound by
    how fast the weights stream from memory, not by the GEMM rate. `streaming_generation_seconds`
    (the prompt pass at the GEMM rate plus the measured time of the decode steps' weight matmuls)
    gives a second floor with generation at the larger of its two bounds."""
    rate = gflops_per_second * 1e9
    phase_floor = {phase: flops / rate for phase, flops in by_bench_phase(passes).items()}
    floor = sum(passes.values()) / rate
    essential = sum(flops for name, flops in passes.items() if name not in OPTIONAL_PASSES) / rate
    report = {
        "floor_seconds": floor,
        "floor_seconds_without_optional_passes": essential,
        "share_of_floor": floor / step_seconds,
        "phase_floor_seconds": phase_floor,
        "phase_share_of_floor": {phase: phase_floor[phase] / seconds for phase, seconds in measured.items() if seconds > 0},
    }
    if streaming_generation_seconds is not None:
        generation = max(phase_floor.get("generation", 0.0), streaming_generation_seconds)
        streaming_floor = floor - phase_floor.get("generation", 0.0) + generation
        report["streaming_floor_seconds"] = streaming_floor
        report["share_of_streaming_floor"] = streaming_floor / step_seconds
        if measured.get("generation"):
            report["generation_share_of_streaming_floor"] = generation / measured["generation"]
    return report
