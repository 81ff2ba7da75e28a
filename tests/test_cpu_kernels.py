"""No CPU path calls a fused kernel, on any machine.

Paddle's CPU wheel has fused kernels that execute AVX-512 whatever the CPU (`fused_rms_norm`
dies with SIGILL on an AVX2-only AMD EPYC), so a green run on an AVX-512 machine proves nothing.
These tests replace every fused kernel entry point (`paddle._C_ops` fused/flash/RMSNorm/SwiGLU
ops and everything in `paddle.incubate.nn.functional`) with a function that raises, then run the
rollout decoder, an SFT step, an RM step, a PPO step and the evaluation loaders, the last four on
checkpoints whose configs ask for fused kernels (as a GPU-trained checkpoint may).
"""

import json
import os
import re
import shutil

import numpy as np
import paddle
import pytest

from ppo.models.kernels import FUSED_KERNEL_CONFIG_FLAGS, rms_norm, swiglu

# Names of `paddle._C_ops` kernels that must not run on CPU.
FUSED_OP_NAME = re.compile(r"fused|fusion|flash|rms_norm|swiglu|fast_ln|multihead|memory_efficient|fp8|rope")


class FusedKernelCalled(AssertionError):
    pass


def _raiser(name):
    def call(*args, **kwargs):
        raise FusedKernelCalled(f"a CPU path called the fused kernel {name}")

    return call


@pytest.fixture()
def fused_kernels_raise(monkeypatch):
    """Every fused kernel entry point raises FusedKernelCalled for the duration of a test."""
    import paddle.incubate.nn.functional as incubate_functional

    banned = []
    for name in dir(paddle._C_ops):
        if FUSED_OP_NAME.search(name) and callable(getattr(paddle._C_ops, name)):
            monkeypatch.setattr(paddle._C_ops, name, _raiser(f"paddle._C_ops.{name}"))
            banned.append(name)
    for name in dir(incubate_functional):
        if not name.startswith("_") and callable(getattr(incubate_functional, name)):
            monkeypatch.setattr(incubate_functional, name, _raiser(f"paddle.incubate.nn.functional.{name}"))
    assert {"rms_norm", "swiglu", "fused_rotary_position_embedding", "flash_attn"} <= set(banned)
    return banned


def _fused_flags_checkpoint(source_dir, target_dir):
    """A copy of a model directory whose config asks for every fused kernel."""
    shutil.copytree(source_dir, target_dir)
    config_path = os.path.join(target_dir, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update({flag: True for flag in FUSED_KERNEL_CONFIG_FLAGS})
    config["use_fast_layer_norm"] = False  # PaddleNLP's fused RMSNorm path reads it
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return str(target_dir)


@pytest.fixture(scope="module")
def fused_llama_dir(tmp_path_factory, tiny_llama_dir):
    return _fused_flags_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("fused") / "llama")


@pytest.fixture(scope="module")
def fused_qwen2_dir(tmp_path_factory, tiny_qwen2_dir):
    return _fused_flags_checkpoint(tiny_qwen2_dir, tmp_path_factory.mktemp("fused") / "qwen2")


# ------------------------------------------------------------------------------------------------
# The guard itself catches what it must (otherwise every test below would pass vacuously).


def test_guard_catches_fused_rms_norm_swiglu_and_fused_model_configs(fused_kernels_raise, fused_llama_dir):
    from paddle.incubate.nn.functional import fused_rms_norm
    from paddlenlp.transformers import AutoModelForCausalLM

    x = paddle.randn([2, 8])
    with pytest.raises(FusedKernelCalled):
        fused_rms_norm(x, paddle.ones([8]), None, 1e-6, 1)
    with pytest.raises(FusedKernelCalled):
        paddle.nn.functional.swiglu(x)
    # Loaded as is (not through this project's loaders), the checkpoint's fused RMSNorm flag sends
    # PaddleNLP's CPU forward into its fused path (which, with the kernels intact, imports a
    # GPU-only module or runs the AVX-512 kernel).
    model = AutoModelForCausalLM.from_pretrained(fused_llama_dir, dtype="float32")
    with pytest.raises((FusedKernelCalled, ImportError)):
        model(input_ids=paddle.to_tensor([[5, 6, 7]]))


def test_plain_kernels_equal_paddlenlp_math():
    paddle.seed(0)
    hidden, weight = paddle.randn([3, 5, 16]), paddle.rand([16]) + 0.5
    variance = (hidden.astype("float32") ** 2).mean(-1, keepdim=True)
    expected = paddle.rsqrt(variance + 1e-6) * hidden * weight
    np.testing.assert_allclose(rms_norm(hidden, weight, 1e-6).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    gate_up = paddle.randn([3, 8])
    gate, up = gate_up[:, :4], gate_up[:, 4:]
    np.testing.assert_allclose(swiglu(gate_up).numpy(), (paddle.nn.functional.silu(gate) * up).numpy(), rtol=1e-6)
    np.testing.assert_allclose(swiglu(gate, up).numpy(), (paddle.nn.functional.silu(gate) * up).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Every CPU path under the guard.


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_rollout_decoder_runs_without_fused_kernels(fused_kernels_raise, architecture):
    from ppo.infer_utils import RolloutEngine
    from ppo.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(architecture, seed=1)
    ids = paddle.to_tensor([[0, 5, 6, 7], [9, 10, 11, 12]], dtype="int64")
    mask = paddle.to_tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype="int64")
    for backend in ("decoder", "generate"):
        engine = RolloutEngine(model, eos_token_id=2, pad_token_id=0, backend=backend)
        assert engine.backend == backend
        out = engine.generate(ids, mask, max_new_tokens=4, do_sample=True, temperature=1.0, top_p=1.0)
        assert out.sequences.shape[0] == 2


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_kernel_data")
    prompts = ["what colour is the red cat", "tell me about the dog", "where is the blue bird", "name the fish"]
    pku = [
        {
            "prompt": prompt,
            "response_0": "it is red. thank you!",
            "response_1": "go away.",
            "is_response_0_safe": True,
            "is_response_1_safe": False,
            "better_response_id": 0,
            "safer_response_id": 0,
        }
        for prompt in prompts
    ]
    alpaca = [{"instruction": prompt, "input": "", "output": "it is red. thank you!"} for prompt in prompts]
    return {"pku": _write_jsonl(root / "pku.jsonl", pku), "alpaca": _write_jsonl(root / "alpaca.jsonl", alpaca)}


def _stage_config(tmp_path, name, values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values))
    return str(path)


COMMON_STAGE_KEYS = dict(
    max_length=32,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=4,
    max_steps=2,
    logging_steps=1,
    save_strategy="no",
    do_train=True,
    report_to="none",
    disable_tqdm=True,
)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_sft_and_reward_steps_on_a_fused_flag_checkpoint_run_without_fused_kernels(
    fused_kernels_raise, tmp_path, small_data, fused_llama_dir, fused_qwen2_dir, architecture
):
    from rm.run_reward import main as reward_main
    from sft.run_sft import main as sft_main

    model_dir = {"llama": fused_llama_dir, "qwen2": fused_qwen2_dir}[architecture]
    sft = sft_main([
        _stage_config(tmp_path, "sft", dict(
            COMMON_STAGE_KEYS, model_name_or_path=model_dir, output_dir=str(tmp_path / "sft"),
            train_datasets=f"alpaca:1:{small_data['alpaca']}", eval_datasets=f"alpaca:1:{small_data['alpaca']}",
        ))
    ])  # fmt: skip
    assert np.isfinite(sft["eval_loss"])
    reward = reward_main([
        _stage_config(tmp_path, "rm", dict(
            COMMON_STAGE_KEYS, model_name_or_path=model_dir, output_dir=str(tmp_path / "rm"),
            train_datasets=f"PKU-SafeRLHF/train:1:{small_data['pku']}", eval_datasets=f"PKU-SafeRLHF/test:1:{small_data['pku']}",
        ))
    ])  # fmt: skip
    assert 0.0 <= reward["eval_accuracy"] <= 1.0


def test_ppo_step_and_evaluation_loaders_run_without_fused_kernels(fused_kernels_raise, tmp_path, small_data, fused_llama_dir):
    from ppo.arguments import PPODataArguments, PPOModelArguments, PPOTrainingArguments
    from ppo.demo.evaluate import load_causal_lm, load_reward_model
    from ppo.models import AutoModelForScore
    from ppo.run_ppo import build_trainer

    saved_reward = str(tmp_path / "saved_reward")
    AutoModelForScore.from_pretrained(fused_llama_dir, score_type="reward").save_pretrained(saved_reward)
    for name in os.listdir(fused_llama_dir):
        if "token" in name or name.endswith(".model"):
            shutil.copy(os.path.join(fused_llama_dir, name), saved_reward)
    reward_dir = _fused_flags_checkpoint(saved_reward, tmp_path / "reward")

    trainer = build_trainer(
        PPOModelArguments(actor_model_name_or_path=fused_llama_dir, reward_model_name_or_path=reward_dir),
        PPODataArguments(
            train_datasets=f"PKU-SafeRLHF/train:1:{small_data['pku']}",
            ptx_datasets=f"alpaca:1:{small_data['alpaca']}",
            max_length=24,
        ),
        PPOTrainingArguments(
            output_dir=str(tmp_path / "ppo"), max_steps=1, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
            logging_steps=1, save_strategy="no", evaluation_strategy="no", report_to=["none"], disable_tqdm=True,
            critic_warmup_ratio=0.0,
        ),
    )  # fmt: skip
    trainer.train()
    with open(os.path.join(tmp_path, "ppo", "ppo_metrics.jsonl"), encoding="utf-8") as handle:
        metrics = [json.loads(line) for line in handle]
    assert np.isfinite(metrics[-1]["train/actor_loss"])

    ids = paddle.to_tensor([[5, 6, 7]])
    logits = load_causal_lm(fused_llama_dir)(input_ids=ids, return_dict=True).logits
    scores = load_reward_model(reward_dir)(input_ids=ids, attention_mask=paddle.ones_like(ids)).end_scores
    assert np.isfinite(logits.numpy()).all() and np.isfinite(scores.numpy()).all()


def test_plain_kernels_trace_under_to_static(fused_kernels_raise):
    """A traced tensor has no place; the kernels then follow the process's device (CPU here)."""

    def block(hidden, weight, gate_up):
        return rms_norm(hidden, weight, 1e-6).sum() + swiglu(gate_up).sum()

    hidden, weight, gate_up = paddle.randn([2, 8]), paddle.ones([8]), paddle.randn([2, 6])
    traced = paddle.jit.to_static(block, full_graph=True)
    np.testing.assert_allclose(traced(hidden, weight, gate_up).numpy(), block(hidden, weight, gate_up).numpy(), rtol=1e-5)


def test_paddlenlp_rms_norm_on_cpu_squares_instead_of_pow_and_matches_it():
    from paddlenlp.transformers import LlamaConfig
    from paddlenlp.transformers.llama.modeling import LlamaRMSNorm
    from paddlenlp.transformers.qwen2.modeling import Qwen2RMSNorm

    from ppo.models import kernels

    assert LlamaRMSNorm.forward is kernels._rms_norm_forward and Qwen2RMSNorm.forward is kernels._rms_norm_forward
    norm = LlamaRMSNorm(LlamaConfig(hidden_size=64, rms_norm_eps=1e-5))
    x = paddle.randn([2, 5, 64])
    original = kernels._PADDLENLP_RMS_NORM_FORWARD[LlamaRMSNorm](norm, x)
    np.testing.assert_allclose(norm(x).numpy(), original.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kernels.rms_norm(x, norm.weight, 1e-5).numpy(), original.numpy(), rtol=1e-6, atol=1e-6)
