"""Shared fixtures: tiny models built and saved locally, loaded through the real loaders."""

import pytest
import torch

from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel
from composer_prx.model.text import load_text_encoder, save_word_level_encoder

CAPTIONS = [
    "a red circle in the top left corner",
    "a blue square at the bottom",
    "a green triangle in the center of a plain white image",
]


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    return save_word_level_encoder(tmp_path_factory.mktemp("text_encoder"), CAPTIONS, hidden=32, layers=1, heads=2)


@pytest.fixture
def tiny_dit_cfg():
    return DiTConfig(patch_size=4, hidden_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, bottleneck_dim=16, text_dim=32)


@pytest.fixture
def tiny_model(text_encoder_dir, tiny_dit_cfg):
    torch.manual_seed(0)
    return PRXModel(PixelDiT(tiny_dit_cfg), load_text_encoder(str(text_encoder_dir), max_length=16))


def image_batch(n=4, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
            "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}
