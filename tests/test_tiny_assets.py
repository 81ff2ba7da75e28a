import numpy as np
import paddle

from ppo.tiny import BOS_ID, EOS_ID, PAD_ID, build_tiny_causal_lm


def test_tokenizer_round_trip_and_special_ids(tiny_tokenizer):
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    text = "BEGINNING OF CONVERSATION: USER: hello ASSISTANT: thank you"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    # The template is learned as whole pieces, so prompts stay short.
    assert "▁CONVERSATION" in tiny_tokenizer.tokenize(text)


def test_saved_models_reload_with_identical_logits(tiny_llama_dir, tiny_qwen2_dir):
    from paddlenlp.transformers import AutoModelForCausalLM

    input_ids = paddle.to_tensor([[BOS_ID, 10, 11, 12, EOS_ID]])
    for architecture, path in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        fresh = build_tiny_causal_lm(architecture, seed=0)
        loaded = AutoModelForCausalLM.from_pretrained(path)
        fresh.eval(), loaded.eval()
        expected = fresh(input_ids)[0].numpy()
        np.testing.assert_allclose(loaded(input_ids)[0].numpy(), expected, atol=1e-6)
