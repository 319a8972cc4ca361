"""Frozen vision teachers: tiny random real-architecture models saved to disk and loaded through the real path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer_prx.encoders import IMAGENET_MEAN, IMAGENET_STD, TeacherNotFoundError, load_vision_encoder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _save_transformers(kind: str, path) -> nn.Module:
    from transformers import (DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model,
                              Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

    torch.manual_seed(0)
    if kind == "dinov2":
        net = Dinov2Model(Dinov2Config(patch_size=14, image_size=56, **TINY))
    elif kind == "dinov2_reg":  # the registers config defaults to patch 16: the real models use 14
        net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=56, num_register_tokens=4, **TINY))
    else:
        net = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **TINY))
    net.save_pretrained(path)
    return net.eval()


@pytest.mark.parametrize("kind, prefix, patch", [("dinov2", 1, 14), ("dinov2_reg", 5, 14), ("dinov3", 5, 16)])
def test_transformers_layout_grid_and_grad(tmp_path, kind, prefix, patch):
    net = _save_transformers(kind, tmp_path / kind)
    enc = load_vision_encoder(str(tmp_path / kind))
    assert (enc.patch_size, enc.dim, enc.num_prefix_tokens, enc.depth) == (patch, 32, prefix, 2)
    assert load_vision_encoder(str(tmp_path / kind)) is enc  # loaded once, shared
    images = torch.rand(2, 3, 50, 90) * 2 - 1
    out = enc.encode(images, grid=(3, 5))  # any aspect ratio: resized to (3 p, 5 p)
    assert out.patch_tokens.shape == (2, 3, 5, 32) and out.pooled.shape == (2, 32)
    # the reference: our normalisation + resize, then the saved net itself; patches follow cls + registers
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(3 * patch, 5 * patch), mode="bicubic",
                                        antialias=True, align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    hidden = net(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out.patch_tokens, hidden[:, prefix:].reshape(2, 3, 5, 32))
    torch.testing.assert_close(out.pooled, hidden[:, 0])
    # gradients reach the images, never the teacher
    images.requires_grad_(True)
    enc.encode(images, grid=(2, 2)).patch_tokens.square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in enc.net.parameters())
    enc.net.train()  # e.g. someone calls .train(): encode still runs in eval mode
    again = enc.encode(images.detach(), grid=(3, 5))
    assert not enc.net.training
    torch.testing.assert_close(again.patch_tokens, out.patch_tokens)


def test_timm_dinov3_from_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_dinov3", pretrained=False, dynamic_img_size=True, num_classes=0,
                               embed_dim=32, depth=2, num_heads=2).eval()
    # a reduced-width model of the same family, saved and loaded back through pretrained_cfg_overlay(file=...)
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    enc = load_vision_encoder("timm:vit_small_patch16_dinov3", weights="random")
    assert (enc.patch_size, enc.dim, enc.num_prefix_tokens) == (16, 384, 5)
    small = dict(embed_dim=32, depth=2, num_heads=2)
    tiny = load_vision_encoder("timm:vit_small_patch16_dinov3", weights="random", model_kwargs=small)
    with pytest.raises(AssertionError):  # random weights differ from the source ...
        torch.testing.assert_close(tiny.net.state_dict(), source.state_dict())
    loaded = load_vision_encoder("timm:vit_small_patch16_dinov3", weights=str(tmp_path / "tiny.pth"), model_kwargs=small)
    torch.testing.assert_close(loaded.net.state_dict(), source.state_dict())  # ... the file's are the source's
    images = torch.rand(1, 3, 64, 96) * 2 - 1
    out = loaded.encode(images, grid=(2, 3))
    tokens = source.forward_features(loaded.preprocess(images, (2, 3)))
    torch.testing.assert_close(out.patch_tokens, tokens[:, 5:].reshape(1, 2, 3, 32))
    assert loaded.flops(4, 4) > loaded.flops(2, 2) > 0


def test_missing_teacher_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherNotFoundError) as err:
        load_vision_encoder("facebook/dinov2-does-not-exist")
    message = str(err.value)
    assert "\n" not in message and "facebook/dinov2-does-not-exist" in message and "local folder" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the hub is unreachable here (tests block the network): no retries
    with pytest.raises(TeacherNotFoundError, match="unreachable"):
        load_vision_encoder("facebook/dinov2-does-not-exist")
    with pytest.raises(TeacherNotFoundError, match="weights=FILE"):
        load_vision_encoder("timm:vit_small_patch16_dinov3")
    with pytest.raises(TeacherNotFoundError, match="no such file"):
        load_vision_encoder("timm:vit_small_patch16_dinov3", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="timm has no model"):
        load_vision_encoder("timm:not_a_model", weights="random")


def test_encoder_stays_outside_the_module_tree(tmp_path):
    _save_transformers("dinov2", tmp_path / "t")
    enc = load_vision_encoder(str(tmp_path / "t"))
    model = nn.Linear(2, 2)
    model.teacher = enc  # a plain object: not registered as a submodule
    assert list(model.state_dict()) == ["weight", "bias"] and len(list(model.parameters())) == 2
