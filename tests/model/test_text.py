import pytest
import torch

from composer_prx.model.text import TextEncoder, load_text_encoder


def test_loads_from_local_folder_and_encodes(text_encoder_dir):
    encoder = load_text_encoder(str(text_encoder_dir), max_length=6)
    emb, mask = encoder.encode(["a red circle", "a blue square at the bottom of a plain white image"])
    assert emb.shape == (2, 6, 32) and emb.dtype == torch.float32
    assert mask.tolist()[0] == [True, True, True, False, False, False]  # padded to the longest, truncated at 6
    assert mask[1].all()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.model.training


def test_shared_instance(text_encoder_dir):
    assert load_text_encoder(str(text_encoder_dir), 6) is load_text_encoder(str(text_encoder_dir) + "/", 6)


def test_missing_weights_error_names_weights_and_fix(tmp_path):
    with pytest.raises(OSError, match="could not be loaded.*save_pretrained"):
        TextEncoder.from_pretrained(str(tmp_path / "no_such_encoder"))
    with pytest.raises(OSError, match="not found locally"):
        TextEncoder.from_pretrained(str(tmp_path))  # a folder without a config


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="huggingface-cli download some-org/some-encoder"):
        TextEncoder.from_pretrained("some-org/some-encoder")


def test_single_string_is_rejected(text_encoder_dir):
    with pytest.raises(TypeError, match="list of captions"):
        load_text_encoder(str(text_encoder_dir), 6).encode("a red circle")


def _save_with_word_tokenizer(model, path, source_dir):
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(path)
    return str(path)


def test_t5_style_encoder_decoder_loads_encoder_only(tmp_path, text_encoder_dir):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                      decoder_start_token_id=0)
    path = _save_with_word_tokenizer(T5ForConditionalGeneration(config), tmp_path / "t5", text_encoder_dir)
    encoder = TextEncoder.from_pretrained(path, max_length=8)
    assert type(encoder.model).__name__ == "T5EncoderModel" and encoder.hidden_size == 16
    emb, mask = encoder.encode(["a red circle", "a blue square"])
    assert emb.shape == (2, 3, 16) and mask.all()


def test_decoder_only_gemma_style_encoder(tmp_path, text_encoder_dir):
    from transformers import GemmaConfig, GemmaModel

    config = GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0)
    path = _save_with_word_tokenizer(GemmaModel(config), tmp_path / "gemma", text_encoder_dir)
    encoder = TextEncoder.from_pretrained(path, max_length=16)
    emb, mask = encoder.encode(["a red circle in the top left corner"])  # 8 words
    assert emb.shape == (1, 8, 16) and mask.all() and encoder.hidden_size == 16
