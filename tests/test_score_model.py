"""Score models: end-score position, normalisation, save/load, loading from a causal LM."""

import json
import logging
import os

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import AutoModelForCausalLM, BertConfig
from paddlenlp.utils.log import logger as paddlenlp_logger

from ppo.models import (
    AutoModelForScore,
    LlamaModelForScore,
    Qwen2ModelForScore,
    ScoreModelOutput,
    make_position_ids,
)
from ppo.tiny import EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def llama_score_model(tiny_llama_dir):
    model = AutoModelForScore.from_pretrained(tiny_llama_dir)
    model.eval()
    return model


def _encode(tokenizer, texts, padding_side):
    tokenizer.padding_side = padding_side
    batch = tokenizer(texts, padding=True, return_tensors="pd", return_attention_mask=True)
    return batch["input_ids"], batch["attention_mask"]


TEXTS = ["hello world, how are you today?", "a dog", "the red fox runs to the tree and back again"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_end_scores_sit_on_the_last_real_token(llama_score_model, tiny_tokenizer, padding_side):
    input_ids, attention_mask = _encode(tiny_tokenizer, TEXTS, padding_side)
    with paddle.no_grad():
        output = llama_score_model(input_ids, attention_mask, position_ids=make_position_ids(attention_mask))
    assert isinstance(output, ScoreModelOutput)
    mask = attention_mask.numpy()
    batch, length = mask.shape
    assert list(output.scores.shape) == [batch, length, 1] and list(output.end_scores.shape) == [batch, 1]
    for row in range(batch):
        last_real = int(np.nonzero(mask[row])[0].max())
        assert int(output.end_index[row]) == last_real
        assert float(output.end_scores[row, 0]) == float(output.scores[row, last_real, 0])
    if padding_side == "right":
        assert (output.end_index.numpy() < length - 1).any()  # some rows really are padded


def test_left_and_right_padding_give_the_same_end_scores(llama_score_model, tiny_tokenizer):
    right_ids, right_mask = _encode(tiny_tokenizer, TEXTS, "right")
    left_ids, left_mask = _encode(tiny_tokenizer, TEXTS, "left")
    with paddle.no_grad():
        right = llama_score_model(right_ids, right_mask).end_scores.numpy()
        # position_ids=None is computed from the mask, so left padding needs nothing extra.
        left = llama_score_model(left_ids, left_mask).end_scores.numpy()
    np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)


def test_pad_equal_to_eos_keeps_the_real_eos(llama_score_model):
    # Rows end with a real EOS; padding uses the EOS id as well. Only the mask tells them apart.
    input_ids = paddle.to_tensor([[1, 40, 41, EOS_ID, EOS_ID, EOS_ID], [1, 40, 41, 42, 43, EOS_ID]])
    attention_mask = paddle.to_tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with paddle.no_grad():
        output = llama_score_model(input_ids, attention_mask)
    assert output.end_index.tolist() == [3, 5]
    np.testing.assert_array_equal(output.end_scores.numpy()[0], output.scores.numpy()[0, 3])


def test_row_without_real_tokens_is_an_error(llama_score_model):
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        llama_score_model(paddle.to_tensor([[1, 5], [PAD_ID, PAD_ID]]), paddle.to_tensor([[1, 1], [0, 0]]))


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_causal_lm_checkpoint_loads_backbone_and_fresh_head(tiny_llama_dir):
    handler = _Capture()
    paddlenlp_logger.logger.addHandler(handler)
    try:
        score_model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="critic")
    finally:
        paddlenlp_logger.logger.removeHandler(handler)
    assert isinstance(score_model, LlamaModelForScore)
    assert score_model.config.score_type == "critic"
    assert any("score_head is freshly initialised" in message for message in handler.messages)

    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    backbone = causal_lm.llama.state_dict()
    for name, value in score_model.llama.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), backbone[name].numpy(), err_msg=name)
    head = score_model.score_head.weight.numpy()
    assert head.shape == (64, 1) and 0 < np.abs(head).std() < 0.1  # normal(0, 0.02), not zeros


def test_qwen2_is_picked_from_the_config(tiny_qwen2_dir, tiny_tokenizer):
    model = AutoModelForScore.from_pretrained(tiny_qwen2_dir)
    assert isinstance(model, Qwen2ModelForScore)
    model.eval()
    input_ids, attention_mask = _encode(tiny_tokenizer, TEXTS, "left")
    with paddle.no_grad():
        output = model(input_ids, attention_mask)
    assert output.end_index.tolist() == [input_ids.shape[1] - 1] * len(TEXTS)


def test_unsupported_model_type_lists_supported_types():
    with pytest.raises(ValueError, match=r"supported model types: \['llama', 'qwen2'\]"):
        AutoModelForScore.from_config(BertConfig())


def test_bad_score_config_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="allowed"):
        AutoModelForScore.from_pretrained(tiny_llama_dir, score_type="value")
    with pytest.raises(ValueError, match="allowed"):
        AutoModelForScore.from_pretrained(tiny_llama_dir, normalizer_type="MinMax")
    with pytest.raises(ValueError, match="needs a normalizer_type"):
        AutoModelForScore.from_pretrained(tiny_llama_dir, do_normalize=True)


def test_normalisation_follows_score_type(tiny_llama_dir, tiny_tokenizer):
    input_ids, attention_mask = _encode(tiny_tokenizer, TEXTS, "right")
    stats = {"mean": [0.5], "var": [4.0], "count": 10}
    outputs = {}
    for score_type in ("reward", "cost", "critic"):
        model = AutoModelForScore.from_pretrained(
            tiny_llama_dir, score_type=score_type, do_normalize=True, normalizer_type="RunningMeanStd", **stats
        )
        model.eval()
        with paddle.no_grad():
            outputs[score_type] = (
                model(input_ids, attention_mask, normalize=False).end_scores.numpy(),
                model(input_ids, attention_mask).end_scores.numpy(),
            )
    std = np.sqrt(4.0 + 1e-8)
    raw, normalised = outputs["reward"]
    np.testing.assert_allclose(normalised, (raw - 0.5) / std, rtol=1e-5)
    raw, normalised = outputs["cost"]
    np.testing.assert_allclose(normalised, raw / std, rtol=1e-5)
    raw, normalised = outputs["critic"]
    np.testing.assert_array_equal(normalised, raw)


def test_save_and_reload_keep_scores_and_normalizer_statistics(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForScore.from_pretrained(
        tiny_llama_dir, normalizer_type="ExponentialMovingAverage", momentum=0.8, do_normalize=True
    )
    paddle.seed(1)
    with paddle.no_grad():  # a trained-looking head, so a fresh random head could not pass by chance
        model.score_head.weight.set_value(paddle.randn(model.score_head.weight.shape))
    model.update_normalizer(np.array([[1.0], [2.0], [4.0]]))
    model.update_normalizer(np.array([[0.0], [10.0]]))
    model.eval()
    input_ids, attention_mask = _encode(tiny_tokenizer, TEXTS, "right")
    with paddle.no_grad():
        before = model(input_ids, attention_mask).end_scores.numpy()

    model.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert saved["architectures"] == ["LlamaModelForScore"]
    assert saved["normalizer_type"] == "ExponentialMovingAverage" and saved["momentum"] == 0.8
    assert saved["count"] == 5
    np.testing.assert_allclose(saved["mean"], model.normalizer.mean)
    np.testing.assert_allclose(saved["var"], model.normalizer.var)

    reloaded = AutoModelForScore.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert reloaded.config.do_normalize is True
    np.testing.assert_array_equal(reloaded.normalizer.mean, model.normalizer.mean)
    np.testing.assert_array_equal(reloaded.normalizer.var, model.normalizer.var)
    assert reloaded.normalizer.count == 5
    with paddle.no_grad():
        after = reloaded(input_ids, attention_mask).end_scores.numpy()
    np.testing.assert_array_equal(after, before)


def test_score_dim_and_bias(tiny_llama_dir, tmp_path):
    model = AutoModelForScore.from_pretrained(tiny_llama_dir, score_dim=3, score_bias=True)
    assert model.score_head.weight.shape == [64, 3] and model.score_head.bias is not None
    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForScore.from_pretrained(str(tmp_path))
    assert reloaded.config.score_dim == 3 and reloaded.score_head.bias is not None
    np.testing.assert_array_equal(reloaded.score_head.bias.numpy(), model.score_head.bias.numpy())
