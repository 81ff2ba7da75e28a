"""The cheaper passes of an RL step against the computations they replace: the LM head on
response positions only, inputs trimmed to a batch's own longest response, the fused log-softmax,
larger scoring chunks, and the rollout engine's log-probs as the old log-probs."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppo.infer_utils import RolloutEngine
from ppo.models import AutoModelForScore
from ppo.models.ppo_model_utils import ResponseWindow, gather_log_probs, make_position_ids, token_entropy
from ppo.models.response_head import ColumnSlicedHead, causal_lm_of, head_on_columns, supports_column_head
from ppo.run_ppo import build_trainer
from ppo.tiny import build_tiny_causal_lm
from ppo.trainer_utils import logits_of, response_log_probs, response_values
from tests.test_ppo_trainer import make_arguments, ppo_assets  # noqa: F401 (fixture)

PAD = 3
PROMPT = 5


def rollout_like(vocab: int, response_lengths, width: int, seed: int = 0):
    """[B, P+width] ids: left-padded prompts (row i has i pad tokens), responses of the given
    lengths, pad after; the attention mask as the rollout engine builds it."""
    rng = np.random.default_rng(seed)
    rows = len(response_lengths)
    ids = rng.integers(4, vocab, size=(rows, PROMPT + width))
    mask = np.ones_like(ids, dtype=bool)
    for row, length in enumerate(response_lengths):
        mask[row, : min(row, PROMPT - 1)] = False
        mask[row, PROMPT + length :] = False
    ids = np.where(mask, ids, PAD)
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)


def full_width_log_probs(model, ids, mask, temperature):
    """The computation the fast path replaced: every position's logits, log-softmax, gather."""
    with paddle.no_grad():
        logits = logits_of(model(input_ids=ids, attention_mask=mask.astype("int64"), position_ids=make_position_ids(mask)))
    log_probs = F.log_softmax(logits[:, :-1].astype("float64") / temperature, axis=-1)
    return paddle.take_along_axis(log_probs, ids[:, 1:].unsqueeze(-1), axis=-1).squeeze(-1), logits[:, :-1] / temperature


def response_columns(mask, prompt_length=PROMPT):  # [B, L-1] bool: per-token columns of response tokens
    return np.concatenate([np.zeros([mask.shape[0], prompt_length - 1], bool), mask.numpy()[:, prompt_length:]], axis=1)


@pytest.fixture(scope="module")
def llama():
    model = build_tiny_causal_lm("llama", seed=0)
    model.eval()
    return model


def test_response_window_columns_and_layout():
    _, mask = rollout_like(100, [3, 1, 0], width=6)
    window = ResponseWindow.of(mask, PROMPT)
    assert (window.start, window.end, window.width, window.per_token_width) == (4, 7, 3, 10)
    values = paddle.arange(6, dtype="float32").reshape([2, 3]) + 1
    full = window.to_full(values).numpy()
    assert full.shape == (2, 10) and (full[:, 4:7] == values.numpy()).all() and full[:, :4].sum() == full[:, 7:].sum() == 0
    # No response token at all still gives one column (masked out everywhere).
    assert ResponseWindow.of(rollout_like(100, [0, 0], width=4)[1], PROMPT).width == 1
    with pytest.raises(ValueError, match="prompt_length"):
        ResponseWindow.of(mask, mask.shape[1])


def test_head_on_columns_gives_the_full_logits_columns_and_restores_the_head(llama):
    ids, mask = rollout_like(llama.config.vocab_size, [6, 4, 2], width=6)
    kwargs = dict(input_ids=ids, attention_mask=mask.astype("int64"), position_ids=make_position_ids(mask))
    head = llama.lm_head
    with paddle.no_grad():
        full = logits_of(llama(**kwargs))
        with head_on_columns(llama, 4, 9) as narrowed:
            assert narrowed and isinstance(llama.lm_head, ColumnSlicedHead)
            sliced = logits_of(llama(**kwargs))
    assert llama.lm_head is head
    assert sliced.shape == [3, 5, llama.config.vocab_size]
    np.testing.assert_allclose(sliced.numpy(), full[:, 4:9].numpy(), rtol=1e-5, atol=1e-5)


class Wrapper(paddle.nn.Layer):
    """Stands for paddle.DataParallel / fleet wrappers: the model under `_layers`."""

    def __init__(self, layers):
        super().__init__()
        self._layers = layers

    def forward(self, **kwargs):
        return self._layers(**kwargs)


def test_head_is_found_inside_wrappers_and_unsupported_models_are_left_alone(llama, tiny_llama_dir):
    assert causal_lm_of(Wrapper(Wrapper(llama))) is llama
    score_model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="critic")
    assert not supports_column_head(score_model)
    with head_on_columns(score_model, 0, 2) as narrowed:
        assert not narrowed
    llama.config.sequence_parallel = True
    try:
        assert not supports_column_head(llama)
    finally:
        llama.config.sequence_parallel = False


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_log_probs_equal_the_full_width_recomputation(llama, temperature):
    # The longest response (5) is shorter than the batch's response columns (8): inputs are trimmed.
    ids, mask = rollout_like(llama.config.vocab_size, [5, 3, 1, 0], width=8)
    window = ResponseWindow.of(mask, PROMPT)
    with paddle.no_grad():
        log_probs, logits = response_log_probs(llama, ids, mask, make_position_ids(mask), window, temperature)
    assert window.width == 5 and log_probs.shape == [4, 5] and logits.shape == [4, 5, llama.config.vocab_size]
    expected, expected_logits = full_width_log_probs(llama, ids, mask, temperature)
    columns = response_columns(mask)
    np.testing.assert_allclose(window.to_full(log_probs).numpy()[columns], expected.numpy()[columns], atol=2e-5)
    # The entropy of the narrowed logits is the full one at the same positions.
    entropy = token_entropy(logits).numpy()
    full_entropy = token_entropy(window.tokens(expected_logits)).numpy()
    np.testing.assert_allclose(entropy[columns[:, 4:9]], full_entropy[columns[:, 4:9]], atol=2e-5)


def test_response_log_probs_gradient_equals_the_full_width_one(llama):
    ids, mask = rollout_like(llama.config.vocab_size, [4, 2], width=6)
    columns = paddle.to_tensor(response_columns(mask))
    window = ResponseWindow.of(mask, PROMPT)

    def gradient(loss_of):
        llama.clear_gradients()
        loss_of().backward()
        return llama.llama.layers[0].self_attn.q_proj.weight.grad.numpy().copy(), llama.lm_head.weight.grad.numpy().copy()

    def fast():
        log_probs, _ = response_log_probs(llama, ids, mask, make_position_ids(mask), window, 1.0)
        return (window.to_full(log_probs) * columns.astype("float32")).sum()

    def slow():
        logits = logits_of(llama(input_ids=ids, attention_mask=mask.astype("int64"), position_ids=make_position_ids(mask)))
        log_probs = F.log_softmax(logits[:, :-1], axis=-1)
        picked = paddle.take_along_axis(log_probs, ids[:, 1:].unsqueeze(-1), axis=-1).squeeze(-1)
        return (picked * columns.astype("float32")).sum()

    for fast_grad, slow_grad in zip(gradient(fast), gradient(slow)):
        np.testing.assert_allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-6)
    llama.clear_gradients()


def test_response_values_equal_the_full_width_scores(tiny_llama_dir):
    critic = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="critic")
    critic.eval()
    ids, mask = rollout_like(critic.config.vocab_size, [2, 4, 1], width=7)
    window = ResponseWindow.of(mask, PROMPT)
    with paddle.no_grad():
        values = response_values(critic, ids, mask, make_position_ids(mask), window)
        full = critic(input_ids=ids, attention_mask=mask.astype("int64"), position_ids=make_position_ids(mask)).scores[:, :-1, 0]
    columns = response_columns(mask)
    np.testing.assert_allclose(window.to_full(values).numpy()[columns], full.numpy()[columns], atol=1e-5)


def test_fused_log_probs_are_closer_to_float64_than_logsumexp():
    paddle.seed(0)
    logits = paddle.randn([2, 16, 20000]) * 4
    labels = paddle.randint(0, 20000, [2, 16])
    exact = (paddle.take_along_axis(logits.astype("float64"), labels.unsqueeze(-1), -1).squeeze(-1)
             - paddle.logsumexp(logits.astype("float64"), axis=-1)).numpy()  # fmt: skip
    fused = gather_log_probs(logits, labels).numpy()
    assert np.abs(fused - exact).max() < 2e-5
    with pytest.raises(ValueError, match="token ids in"):
        gather_log_probs(logits, labels + 20000)


def test_rollout_log_probs_match_the_recomputed_old_log_probs(llama):
    """The engine's log-probs (our KV-cached decoder) against the trainer's forward over the
    finished sequences: equal within float32 rounding."""
    ids, mask = rollout_like(llama.config.vocab_size, [0, 0, 0], width=0)
    paddle.seed(5)
    out = RolloutEngine(llama, eos_token_id=2, pad_token_id=PAD, backend="decoder").generate(
        ids, mask.astype("int64"), max_new_tokens=12, num_return_sequences=2, temperature=0.8, return_log_probs=True
    )
    window = ResponseWindow.of(out.attention_mask, out.prompt_length)
    with paddle.no_grad():
        recomputed, _ = response_log_probs(llama, out.sequences, out.attention_mask, make_position_ids(out.attention_mask), window, 0.8)
    response = out.attention_mask[:, out.prompt_length :].numpy()[:, : window.width]
    difference = np.abs(recomputed.numpy() - out.log_probs.numpy()[:, : window.width])[response]
    assert difference.max() < 1e-4, difference.max()


def test_trainer_scores_with_rollout_log_probs_and_larger_chunks(ppo_assets, tmp_path):  # noqa: F811
    """old_log_probs_from_rollout: the scored old log-probs are the engine's, within float32
    rounding of the actor's scoring forward; scoring in one chunk of all rows gives the same
    scores as chunks of per_device_train_batch_size."""
    from ppo.experience import PromptBatch

    trainer = build_trainer(*make_arguments(ppo_assets, tmp_path / "out", top_p=1.0))
    assert trainer.scoring_chunk_rows(40) % trainer.args.per_device_train_batch_size == 0
    batch = PromptBatch.from_collated(next(trainer.prompt_batches))
    trainer.args.old_log_probs_from_rollout = True
    rollout = trainer.generate(batch, trainer.args.num_return_sequences)
    assert rollout.log_probs is not None
    one_chunk = trainer.score_rollout(rollout, {})
    trainer.args.old_log_probs_from_rollout = False
    rollout.log_probs = None
    trainer.scoring_chunk_rows = lambda sequence_length: trainer.args.per_device_train_batch_size
    chunked = trainer.score_rollout(rollout, {})
    columns = response_columns(rollout.attention_mask, rollout.prompt_length)
    window = ResponseWindow.of(rollout.attention_mask, rollout.prompt_length)
    for name in ("old_log_probs", "reference_log_probs", "old_values"):
        np.testing.assert_allclose(one_chunk[name].numpy()[columns], chunked[name].numpy()[columns], atol=1e-4, err_msg=name)
        outside = one_chunk[name].numpy().copy()
        outside[:, window.start : window.end] = 0
        assert (outside == 0).all(), name  # prompt columns and columns past the longest response
    np.testing.assert_allclose(one_chunk["reward_scores"].numpy(), chunked["reward_scores"].numpy(), atol=1e-5)
