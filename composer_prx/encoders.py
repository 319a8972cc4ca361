"""Frozen vision teachers (DINOv2 / DINOv3 via transformers or timm), loaded once per process and shared.

One loader for every user (REPA, the DINO perceptual loss, DINO-MMD)::

    images [B, 3, H, W] in [-1, 1] ──► (x + 1) / 2 ──► bicubic+antialias to (h p, w p) ──► (x - mean) / std
        ──► ViT ──► [B, prefix + h w, D] ──► drop cls + registers ──► patch_tokens [B, h, w, D]
                                         └─► cls (after the final norm) ──► pooled [B, D]

A `VisionEncoder` is a plain object, never an ``nn.Module`` attribute of a model: it is outside every
module tree, so it is never in a state_dict, a checkpoint, an optimizer or an FSDP wrap (README,
Contracts for your own model, 5). Its parameters have requires_grad=False and it always runs in eval
mode (transformers' DINOv3 jitters its RoPE coordinates in train mode); gradients still flow to the
input images, so a perceptual loss can back-propagate through it.

Names: a hub id or a local folder (``save_pretrained``) of a transformers ``Dinov2Model``,
``Dinov2WithRegistersModel`` or ``DINOv3ViTModel``; or ``timm:<model_name>`` with ``weights=`` a
checkpoint file (timm converts the original Meta ``.pth`` files of DINOv2/DINOv3), ``"random"`` (random
init, for benches), or None (timm's hub weights).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["EncoderOutput", "IMAGENET_MEAN", "IMAGENET_STD", "VisionEncoder", "load_vision_encoder"]

# The normalisation of every DINO teacher; timm models report their own (pretrained_cfg), used when given.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRANSFORMERS_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")


class TeacherNotFoundError(FileNotFoundError):
    """The teacher's weights are neither a local path nor in the local cache."""


@dataclass
class EncoderOutput:
    """patch_tokens [B, h, w, D] (cls and registers stripped); pooled [B, D] (the final-norm cls token)."""

    patch_tokens: Tensor
    pooled: Tensor


class VisionEncoder:
    """A frozen ViT teacher with its patch size, width, prefix-token count and normalisation.

    encode(images [B, 3, H, W] in [-1, 1], grid=(h, w)) -> EncoderOutput with a teacher grid of exactly
    h x w patches (the images are resized to (h p, w p), antialiased bicubic, any aspect ratio).
    """

    def __init__(self, net: nn.Module, *, name: str, backend: str, patch_size: int, dim: int,
                 num_prefix_tokens: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        net.eval()
        net.requires_grad_(False)
        self.net = net
        self.name = name
        self.backend = backend
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self.num_prefix_tokens = int(num_prefix_tokens)
        first = next(net.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.depth = sum(len(m) for m in net.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                         and _is_block_list(m))  # transformer blocks (for flops)
        self.forward_calls = 0  # teacher forwards run so far (REPA's `until` is checked against it)

    def __repr__(self) -> str:
        return (f"VisionEncoder({self.name!r}, backend={self.backend}, patch_size={self.patch_size}, dim={self.dim}, "
                f"prefix_tokens={self.num_prefix_tokens}, dtype={self.dtype}, device={self.device})")

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid the teacher sees for an H x W image without resizing: (H // p, W // p), at least 1."""
        return max(1, height // self.patch_size), max(1, width // self.patch_size)

    def preprocess(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """[-1, 1] images [B, 3, H, W] -> normalised teacher input [B, 3, h p, w p] (bicubic, antialiased)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"vision teacher input must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        h, w = grid
        size = (h * self.patch_size, w * self.patch_size)
        x = (images.float() + 1.0) * 0.5  # [B, 3, H, W] in [0, 1]
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    def encode(self, images: Tensor, grid: tuple[int, int] | None = None) -> EncoderOutput:
        """Patch tokens [B, h, w, D] and pooled [B, D] of `images` [B, 3, H, W] in [-1, 1]."""
        if grid is None:
            grid = self.grid_for(images.shape[-2], images.shape[-1])
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"teacher grid must be positive (h, w), got {grid}")
        if self.net.training:
            self.net.eval()
        x = self.preprocess(images, (h, w))
        tokens = self._tokens(x)  # [B, prefix + h w, D]
        self.forward_calls += 1
        n_patches = tokens.shape[1] - self.num_prefix_tokens
        if n_patches != h * w:
            raise RuntimeError(
                f"teacher {self.name} returned {n_patches} patch tokens for a {h}x{w} grid; expected {h * w}"
            )
        patch = tokens[:, self.num_prefix_tokens:].reshape(tokens.shape[0], h, w, tokens.shape[-1])
        return EncoderOutput(patch_tokens=patch, pooled=tokens[:, 0])

    def _tokens(self, x: Tensor) -> Tensor:
        if self.backend == "timm":
            return self.net.forward_features(x)
        return self.net(pixel_values=x).last_hidden_state

    def flops(self, h: int, w: int) -> float:
        """Forward matmul FLOPs at an h x w grid: 2 N (sum of Linear in*out) + 4 N^2 D per block + patch conv."""
        linear = sum(m.in_features * m.out_features for m in self.net.modules() if isinstance(m, nn.Linear))
        return float(vit_matmul_flops(h, w, linear_macs=linear, dim=self.dim, depth=self.depth,
                                      patch_size=self.patch_size, prefix_tokens=self.num_prefix_tokens))


def vit_matmul_flops(h: int, w: int, *, linear_macs: int, dim: int, depth: int, patch_size: int,
                     prefix_tokens: int) -> int:
    """Forward matmul FLOPs of a ViT on an h x w patch grid, N = prefix + h w tokens:
    2 N linear_macs (the sum of in*out over its Linear layers; 4D^2 + 2DM per block for a plain MLP)
    + 4 N^2 D per block (q k^T, p v) + 2 h w 3 p^2 D (patch embedding)."""
    n_tokens = prefix_tokens + h * w
    return 2 * n_tokens * linear_macs + 4 * n_tokens * n_tokens * dim * depth + 2 * h * w * 3 * patch_size ** 2 * dim


def _is_block_list(blocks: nn.ModuleList) -> bool:
    """True for the transformer-block list of a ViT (blocks holding Linear layers, not a list of Linears)."""
    return not isinstance(blocks[0], nn.Linear) and any(isinstance(m, nn.Linear) for m in blocks[0].modules())


_CACHE: dict[tuple, VisionEncoder] = {}


def _missing(name: str, why: str) -> TeacherNotFoundError:
    return TeacherNotFoundError(
        f"vision teacher weights {name!r} are not available here ({why}); download them where there is internet "
        f"(e.g. `huggingface-cli download {name}` or `model.save_pretrained(DIR)`) and pass the local folder "
        "or file instead of the hub id (README, REPA and frozen vision teachers)"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_transformers(name: str) -> VisionEncoder:
    from transformers import AutoConfig, AutoModel

    local = os.path.exists(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    # the local cache first; the hub only when it answers at once (offline, its client retries for ~a minute)
    attempts = [True] if local or offline else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local_only)
            break
        except (OSError, ValueError) as err:
            last = err
            if local_only and not local and not offline and not _hub_reachable():
                raise _missing(name, "not a local path, not in the Hugging Face cache, and the hub is unreachable") from err
    else:
        if not local and offline:
            why = "not a local path, not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        else:
            why = f"{type(last).__name__}: {str(last).splitlines()[0]}"
        raise _missing(name, why) from last
    if config.model_type not in _TRANSFORMERS_TYPES:
        raise ValueError(
            f"vision teacher {name!r} is a {config.model_type!r} model; supported transformers teachers: "
            f"{list(_TRANSFORMERS_TYPES)} (or a timm ViT as 'timm:<model_name>')"
        )
    try:
        net = AutoModel.from_pretrained(name, local_files_only=local_only)
    except OSError as err:
        raise _missing(name, f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    return VisionEncoder(net, name=name, backend="transformers", patch_size=config.patch_size,
                         dim=config.hidden_size, num_prefix_tokens=1 + registers)


def _load_timm(name: str, weights: str | None, model_kwargs: dict[str, Any]) -> VisionEncoder:
    import timm

    model_name = name.removeprefix("timm:")
    if model_name not in timm.list_models():
        raise ValueError(f"timm has no model {model_name!r} (timm {timm.__version__}); DINOv3 needs timm >= 1.0.20")
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "num_classes": 0, **model_kwargs}
    if weights == "random":
        kwargs["pretrained"] = False
    elif weights is not None:
        if not os.path.isfile(weights):
            raise _missing(weights, f"no such file for timm model {model_name}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(weights)))
    else:
        if not _hub_reachable():
            raise _missing(name, "timm's hub weights and the hub is unreachable; pass weights=FILE (timm or Meta .pth)")
        kwargs["pretrained"] = True
    try:
        net = timm.create_model(model_name, **kwargs)
    except (OSError, RuntimeError) as err:
        if weights is None:
            raise _missing(name, f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
        raise
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    patch = net.patch_embed.patch_size
    return VisionEncoder(net, name=name, backend="timm", patch_size=patch[0] if isinstance(patch, tuple) else patch,
                         dim=net.embed_dim, num_prefix_tokens=net.num_prefix_tokens,
                         mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


def teacher_dtype(name: str, owner: str, allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> torch.dtype:
    """The torch dtype a frozen net's `teacher_dtype` setting names; a clear error for any other name."""
    if name not in allowed:
        raise ValueError(f"{owner} teacher_dtype must be one of {sorted(allowed)}, got {name!r}")
    return getattr(torch, name)


def load_vision_encoder(
    name_or_path: str,
    *,
    backend: str | None = None,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> VisionEncoder:
    """The frozen teacher `name_or_path` (hub id, local folder, or ``timm:<model_name>``), cached per process.

    backend: "transformers" or "timm" (default: "timm" for a ``timm:`` name, else "transformers");
    weights (timm only): a checkpoint file (timm or original Meta .pth), "random", or None for timm's hub
    weights; model_kwargs (timm only): passed to timm.create_model (e.g. a reduced depth for tests).
    The same arguments return the same object.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"vision teacher must be a hub id, a local path or 'timm:<model_name>', got {name_or_path!r}")
    if backend is None:
        backend = "timm" if name_or_path.startswith("timm:") else "transformers"
    if backend not in ("transformers", "timm"):
        raise ValueError(f"vision teacher backend must be 'transformers' or 'timm', got {backend!r}")
    if backend == "transformers" and weights is not None:
        raise ValueError("weights= is for timm teachers; a transformers teacher is a hub id or a local folder")
    if backend == "transformers" and model_kwargs:
        raise ValueError("model_kwargs= is for timm teachers; a transformers teacher's config comes with its folder")
    model_kwargs = dict(model_kwargs or {})
    resolved = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
    if weights not in (None, "random"):
        weights = os.path.abspath(weights)
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (resolved, backend, weights, tuple(sorted(model_kwargs.items())), dtype, str(device))
    encoder = _CACHE.get(key)
    if encoder is None:
        encoder = _load_transformers(resolved) if backend == "transformers" else _load_timm(resolved, weights, model_kwargs)
        encoder.net.to(device=device, dtype=dtype)
        encoder.dtype, encoder.device = dtype, device
        encoder.mean, encoder.std = encoder.mean.to(device), encoder.std.to(device)
        _CACHE[key] = encoder
        log.info("loaded %s", encoder)
    return encoder
