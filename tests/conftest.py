"""Shared fixtures: tiny models built and saved locally, loaded through the real loaders.

Every test runs offline: a socket that connects anywhere but the loopback (the local S3 server, the
gloo rendezvous) fails the test, so "nothing is downloaded" is proven, not assumed.
"""

import ipaddress
import socket

import pytest
import torch

from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel
from composer_prx.model.text import load_text_encoder, save_word_level_encoder

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
_LOCAL_NAMES = {None, "", "localhost", socket.gethostname()}


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:  # a host name other than localhost
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or (mapped is not None and mapped.is_loopback)


def _check(address) -> None:
    if not _is_loopback(address):
        raise OSError(f"network access to {address!r} is blocked in the tests: every test must run offline "
                      "(local weights, the local S3 server on 127.0.0.1)")


def _guarded_connect(self, address):
    _check(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):  # DNS is network access too
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL_NAMES:
        _check((name, 0))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo

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
