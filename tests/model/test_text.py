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
