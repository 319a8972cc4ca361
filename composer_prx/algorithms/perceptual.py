"""Perceptual losses on the predicted clean image (PixelGen, Ma et al.; PRX Part 3): LPIPS and DINO.

Only an x-prediction model has x_hat at every step, so the loss can compare it with x directly::

    FlowOutput (x_pred [B,3,H,W], x [B,3,H,W], t [B]) ──► S = {i : lo <= t_i <= hi}      (t_range)
        ──► x_hat[S], x[S] resized (`resolution`) ──► frozen net: x_hat with grad, x without
        ──► d [|S|] per-sample distance ──► term = mean_{i in S} d_i   (0 when S is empty)
        ──► state.loss = state.loss + weight * term  (AFTER_LOSS);  log loss/train/<name> = term

t_range is in composer_prx's convention (t = 0 clean, t = 1 noise, `composer_prx.flow`).  PixelGen
follows JiT (t = 0 noise, t = 1 clean) and applies its perceptual losses for t_JiT >= 0.3; with
t = 1 - t_JiT that is t <= 0.7 here: ``t_range=(0.0, 0.7)``.  The default (0, 1) is every sample, as
PRX's recipe runs them.  Samples outside the range are not fed to the net at all (they cost nothing).

`resolution`: None keeps the image size; an int is the shorter side after resizing (aspect kept;
224 = PRX's DINO setting on square images); a float in (0, 1] scales both sides (0.5 = PRX's LPIPS
at half resolution).  Resizing is bilinear with antialiasing, differentiable in x_hat.

The frozen nets (README, Contracts for your own model, 5) are plain objects held by the algorithm,
outside every module tree: never in a state_dict, a checkpoint, the optimizer or an FSDP wrap; loaded
once per process and shared by every user of the same weights; always in eval mode with
requires_grad=False, so gradients reach the denoiser through x_hat and never the nets' parameters.
They run in fp32 on CPU and under bf16 autocast on accelerators.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["DinoPerceptualLoss", "FrozenLpips", "LpipsLoss", "dino_distance", "load_lpips", "perceptual_term",
           "resize_for_net"]

# torchvision's ImageNet checkpoints of the LPIPS backbones (the files torchvision itself would download).
TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
                     "squeeze": "squeezenet1_1-b8a52dc0.pth"}
LPIPS_VERSION = "0.1"
LPIPS_EPS = 1e-10  # lpips.normalize_tensor's

Distance = Callable[[Tensor, Tensor], Tensor]
"""(x_hat [B, 3, h, w] with grad, x [B, 3, h, w]) -> per-sample distance [B]."""


# ---- the generic part: gate, resize, mean over the gated samples --------------------------------------
def _check_t_range(t_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got {t_range!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got {t_range!r}")
    return lo, hi


def _check_resolution(resolution: Any) -> int | float | None:
    if resolution is None:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)):
        raise ValueError(f"resolution must be None, an int side in pixels or a float scale in (0, 1], "
                         f"got {resolution!r}")
    if isinstance(resolution, int) and resolution < 16:
        raise ValueError(f"resolution (the shorter side in pixels) must be >= 16, got {resolution}")
    if isinstance(resolution, float) and not 0.0 < resolution <= 1.0:
        raise ValueError(f"resolution as a scale factor must be in (0, 1], got {resolution}")
    return resolution


def target_size(height: int, width: int, resolution: int | float | None) -> tuple[int, int]:
    """(h, w) the net sees: unchanged (None), shorter side = resolution (int), or scaled (float)."""
    if resolution is None:
        return height, width
    scale = resolution / min(height, width) if isinstance(resolution, int) else resolution
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_for_net(images: Tensor, resolution: int | float | None) -> Tensor:
    """[B, 3, H, W] -> [B, 3, h, w] (target_size), bilinear with antialiasing; identity when unchanged."""
    size = target_size(images.shape[-2], images.shape[-1], resolution)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _autocast(device: torch.device):
    """bf16 autocast on accelerators, nothing (fp32) on CPU."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def perceptual_term(x_pred: Tensor, x: Tensor, t: Tensor, distance: Distance,
                    t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """term = mean_{i : lo <= t_i <= hi} distance(x_hat_i, x_i) (0 when no sample is in range); shapes [B, ...] -> []."""
    lo, hi = t_range
    if lo > 0.0 or hi < 1.0:
        keep = (t >= lo) & (t <= hi)  # [B]
        if keep.device.type != "cpu" or not bool(keep.all()):  # gather only when some sample is out (host check)
            idx = keep.nonzero().squeeze(1)
            if idx.numel() == 0:
                return x_pred.sum() * 0.0  # keeps the graph (and FSDP's collectives) the same on every rank
            x_pred, x = x_pred.index_select(0, idx), x.index_select(0, idx)
    with _autocast(x_pred.device):
        per_sample = distance(x_pred, x.detach())
    return per_sample.float().mean()


class _PerceptualLoss(Algorithm):
    """AFTER_LOSS: state.loss += weight * term(FlowOutput); logs the unweighted term as loss/train/<name>."""

    name = ""

    def __init__(self, weight: float, t_range: tuple[float, float], resolution: int | float | None):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{type(self).__name__} weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.t_range = _check_t_range(t_range)
        self.resolution = _check_resolution(resolution)

    def distance(self, x_pred: Tensor, x: Tensor) -> Tensor:
        """[B, 3, H, W] x2 -> [B]."""
        raise NotImplementedError

    def term(self, outputs: Any) -> Tensor:
        """The unweighted loss term of one FlowOutput (README, Contracts for your own model, 1)."""
        for field in ("x_pred", "x", "t"):
            if not hasattr(outputs, field):
                raise TypeError(f"{type(self).__name__} reads x_pred, x and t from the model's forward output "
                                f"(a FlowOutput, README, Contracts for your own model, 1); got {type(outputs).__name__}")
        return perceptual_term(outputs.x_pred, outputs.x, outputs.t, self.distance, self.t_range)

    def load_net(self, device: torch.device) -> None:
        """Load the frozen net on `device` (at INIT: missing weights fail before the first step)."""
        raise NotImplementedError

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOSS) and self.weight > 0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.load_net(next(state.model.parameters()).device)
            return
        term = self.term(state.outputs)
        state.loss = state.loss + self.weight * term
        logger.log_metrics({f"loss/train/{self.name}": term.detach()})


# ---- LPIPS ------------------------------------------------------------------------------------------
class FrozenLpips:
    """The lpips package's LPIPS net, frozen and always in eval mode (its heads' Dropout never runs).

    __call__(x_hat [B, 3, H, W], x [B, 3, H, W], both in [-1, 1]) -> d [B]
        d = sum_l mean_hw sum_c w_lc (phi_l(x_hat) - phi_l(x))_c^2   (phi_l unit-normalised over channels)
    """

    def __init__(self, net: nn.Module, name: str):
        net.eval()
        net.requires_grad_(False)
        self.net = net
        self.name = name

    def __repr__(self) -> str:
        return f"FrozenLpips({self.name})"

    def flops(self, height: int, width: int) -> int:
        """Forward FLOPs of the backbone + heads on one [1, 3, height, width] image (torch's FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        image = torch.zeros(1, 3, height, width, device=next(self.net.parameters()).device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.net.net(self.net.scaling_layer(image))
        return int(counter.get_total_flops())

    def __call__(self, x_pred: Tensor, x: Tensor) -> Tensor:
        """The lpips package's LPIPS.forward, computed leaner (same value; tests check it against the package):
        channels-last convolutions, x's features without autograd, and each layer's distance in one
        autograd node (_LayerDistance) instead of about ten."""
        net = self.net
        if net.training:
            net.eval()  # someone called .train(): the heads' Dropout must stay off
        pred = net.net(net.scaling_layer(x_pred).contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            true = net.net(net.scaling_layer(x).contiguous(memory_format=torch.channels_last))
        heads = [lin.model[-1].weight.flatten() for lin in net.lins]
        return sum(_LayerDistance.apply(f0, f1, w) for f0, f1, w in zip(pred, true, heads))


class _LayerDistance(torch.autograd.Function):
    """One LPIPS layer: d_b = mean_hw sum_c w_c (a_c - b_c)^2 with a = f0 / (||f0||_c + eps), b likewise for f1.

    Gradient to f0 only (f1 is the real image's): with g = 2 w (a - b) / HW per pixel,
    dd/df0 = (g - a <a, g>_c) / (||f0||_c + eps)   (the Jacobian of a = f0 / ||f0|| is (I - a a^T) / ||f0||;
    eps's effect on it is below fp32, lpips' own eps being 1e-10).  A pixel whose features are all zero gets
    no gradient (the package's autograd gives NaN there).  Computed in fp32 or wider.
    """

    @staticmethod
    def forward(ctx, f0: Tensor, f1: Tensor, w: Tensor) -> Tensor:
        ctx.dtype = f0.dtype
        wide = torch.promote_types(f0.dtype, torch.float32)  # bf16 features (autocast) -> fp32
        f0, f1, w = f0.to(wide), f1.to(wide), w.to(wide)[:, None, None]
        with torch.autocast(f0.device.type, enabled=False):  # the reductions stay in `wide`
            n0 = torch.linalg.vector_norm(f0, dim=1, keepdim=True).add_(LPIPS_EPS)
            a = f0 / n0
            n1 = torch.linalg.vector_norm(f1, dim=1, keepdim=True).add_(LPIPS_EPS)
            diff = torch.addcdiv(a, f1, n1, value=-1)
            weighted = diff * w
            ctx.save_for_backward(a, weighted, n0)
            return torch.linalg.vecdot(weighted, diff, dim=1).mean((1, 2))

    @staticmethod
    def backward(ctx, grad_d: Tensor):
        a, weighted, n0 = ctx.saved_tensors
        g = weighted * (2 * grad_d.to(a.dtype) / (a.shape[2] * a.shape[3]))[:, None, None, None]
        along = torch.linalg.vecdot(a, g, dim=1).unsqueeze(1)  # <a, g> over channels
        inverse = n0.reciprocal().masked_fill_(n0 <= LPIPS_EPS, 0.0)  # an all-zero feature pixel: no gradient
        return torch.addcmul(g, a, along, value=-1).mul_(inverse).to(ctx.dtype), None, None


_LPIPS_CACHE: dict[tuple, FrozenLpips] = {}


def default_backbone_path(net: str) -> str:
    """Where torchvision keeps its downloaded checkpoint of the LPIPS backbone `net`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_FILES[net])


def _heads_path(net: str) -> str:
    import lpips

    return os.path.join(os.path.dirname(inspect.getfile(lpips)), "weights", f"v{LPIPS_VERSION}", f"{net}.pth")


def _strict_load(module: nn.Module, state: dict, what: str, path: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not {what}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")


def load_lpips(net: str = "vgg", backbone_path: str | None = None, device: torch.device | str | None = None) -> FrozenLpips:
    """LPIPS (Zhang et al. 2018) with its shipped v0.1 heads, built without any download; cached per process.

    backbone_path: torchvision's ImageNet checkpoint of the backbone (vgg16-397923af.pth for "vgg",
    alexnet-owt-7be5be79.pth for "alex"; only its `features.*` keys are read) or a full LPIPS state dict
    (keys ``net.*`` and ``lin*``, heads included).  Default: torchvision's own download location.
    """
    if net not in TORCHVISION_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(TORCHVISION_FILES)}, got {net!r}")
    path = os.path.abspath(os.path.expanduser(backbone_path or default_backbone_path(net)))
    device = torch.device(device or "cpu")
    key = (net, path, str(device))
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS ({net}) needs its ImageNet backbone weights at {path}, which does not exist: put torchvision's "
            f"{TORCHVISION_FILES[net]} (https://download.pytorch.org/models/{TORCHVISION_FILES[net]}) there or set "
            f"algorithms.lpips.backbone_path to a local copy of it or of a full LPIPS state dict")
    import lpips

    # Built on the meta device (no random init of the unused VGG classifier, no download), then every
    # tensor is loaded below with a strict key check.  use_dropout=True always: the shipped heads' keys are
    # lin*.model.1.* (after the Dropout); with use_dropout=False lpips' non-strict load silently leaves
    # the heads random.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")  # pretrained= deprecation
        model = lpips.LPIPS(pretrained=False, net=net, version=LPIPS_VERSION, lpips=True, pnet_rand=True,
                            use_dropout=True, verbose=False)
    model.to_empty(device="cpu")
    model.scaling_layer = lpips.ScalingLayer()  # its constant buffers, lost on the meta device
    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("net.") for k in state):  # a full LPIPS state dict
        state = {k: v for k, v in state.items() if not k.startswith("scaling_layer.")}
        _strict_load(model, state | {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")},
                     f"a full LPIPS ({net}) state dict", path)
    else:  # torchvision backbone: features.<i>.<p> -> slice<k>.<i>.<p>
        backbone = {}
        for slice_key in model.net.state_dict():
            index_and_param = slice_key.split(".", 1)[1]
            if f"features.{index_and_param}" not in state:
                raise ValueError(f"{path} is not torchvision's {net} checkpoint ({TORCHVISION_FILES[net]}): it has "
                                 f"no key features.{index_and_param}")
            backbone[slice_key] = state[f"features.{index_and_param}"]
        _strict_load(model.net, backbone, f"torchvision's {net} backbone", path)
        heads_path = _heads_path(net)
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        _strict_load(model.lins, {k.removeprefix("lin").split(".", 1)[0] + "." + k.split(".", 1)[1]: v
                                  for k, v in heads.items()}, f"the LPIPS v{LPIPS_VERSION} {net} heads", heads_path)
    frozen = FrozenLpips(model.to(device, memory_format=torch.channels_last), f"lpips-{net}:{path}")
    _LPIPS_CACHE[key] = frozen
    log.info("loaded LPIPS %s (backbone %s) on %s", net, path, device)
    return frozen


class LpipsLoss(_PerceptualLoss):
    """LPIPS(x_hat, x) added to the flow loss: loss += weight * mean_{i in t_range} LPIPS(x_hat_i, x_i).

    weight 0.1 and `resolution=0.5` (half resolution) are PRX's settings; net "vgg" (VGG16) is the
    recipe's, "alex" is cheaper.  LPIPS is the spatially pooled (image-level) distance.
    """

    name = "lpips"

    def __init__(self, weight: float = 0.1, net: str = "vgg", backbone_path: str | None = None,
                 t_range: tuple[float, float] = (0.0, 1.0), resolution: int | float | None = None):
        super().__init__(weight, t_range, resolution)
        if net not in TORCHVISION_FILES:
            raise ValueError(f"LpipsLoss net must be one of {sorted(TORCHVISION_FILES)}, got {net!r}")
        self.net = net
        self.backbone_path = backbone_path
        self._lpips: FrozenLpips | None = None  # a plain object: never part of a module tree

    def __repr__(self) -> str:
        return (f"LpipsLoss(weight={self.weight}, net={self.net!r}, t_range={self.t_range}, "
                f"resolution={self.resolution})")

    def lpips_on(self, device: torch.device) -> FrozenLpips:
        if self._lpips is None or next(self._lpips.net.parameters()).device != device:
            self._lpips = load_lpips(self.net, self.backbone_path, device)
        return self._lpips

    def load_net(self, device: torch.device) -> None:
        self.lpips_on(device)

    def distance(self, x_pred: Tensor, x: Tensor) -> Tensor:
        lpips_net = self.lpips_on(x_pred.device)
        return lpips_net(resize_for_net(x_pred, self.resolution), resize_for_net(x, self.resolution))


# ---- DINO ---------------------------------------------------------------------------------------------
def dino_distance(pred_tokens: Tensor, true_tokens: Tensor) -> Tensor:
    """d = 1 - cos(f(x_hat), f(x)) over the last dim, averaged over any token dims: [B, ..., D] -> [B].

    Computed as ||f(x_hat)/|f(x_hat)| - f(x)/|f(x)|||^2 / 2 (the same value), exactly 0 when x_hat = x.
    """
    diff = F.normalize(pred_tokens.float(), dim=-1) - F.normalize(true_tokens.float(), dim=-1)
    d = 0.5 * diff.pow(2).sum(-1)  # [B, ...]
    return d.flatten(1).mean(1) if d.dim() > 1 else d


class DinoPerceptualLoss(_PerceptualLoss):
    """DINO-feature distance of x_hat and x on the full image: loss += weight * mean_{i in t_range} d_i.

    pooled=False (default; PixelGen's P-DINO, as PRX runs it):
        d_i = 1/|P| sum_{p in P} (1 - cos(f_p(x_hat_i), f_p(x_i))),  f_p = the patch tokens [h, w, D] of the
        frozen DINOv2 on the whole image resized to `resolution` (no crop);
    pooled=True (image-level alternative):  d_i = 1 - cos(g(x_hat_i), g(x_i)),  g = its pooled CLS token [D].
    weight 0.01, resolution 224 (shorter side) and ViT-B/14 with registers are PRX's settings.  The teacher
    comes from `composer_prx.encoders.load_vision_encoder`, so REPA naming the same model shares the object.
    """

    name = "dino_perceptual"

    def __init__(self, weight: float = 0.01, teacher: str = "facebook/dinov2-with-registers-base",
                 t_range: tuple[float, float] = (0.0, 1.0), resolution: int | float | None = 224,
                 pooled: bool = False, teacher_weights: str | None = None, teacher_dtype: str = "float32"):
        super().__init__(weight, t_range, resolution)
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"DinoPerceptualLoss teacher must be a hub id, a local path or 'timm:<model>', "
                             f"got {teacher!r}")
        if not isinstance(pooled, bool):
            raise ValueError(f"DinoPerceptualLoss pooled must be True or False, got {pooled!r}")
        from composer_prx.encoders import teacher_dtype as parse_dtype

        self.teacher_name, self.teacher_weights = teacher, teacher_weights
        self.teacher_dtype = parse_dtype(teacher_dtype, "DinoPerceptualLoss", ("float32", "bfloat16"))
        self.pooled = pooled
        self._teacher: Any = None  # a VisionEncoder: a plain object, never part of a module tree

    def __repr__(self) -> str:
        return (f"DinoPerceptualLoss(weight={self.weight}, teacher={self.teacher_name!r}, t_range={self.t_range}, "
                f"resolution={self.resolution}, pooled={self.pooled})")

    def teacher_on(self, device: torch.device) -> Any:
        """The shared VisionEncoder on `device` (the same object REPA gets for the same arguments)."""
        if self._teacher is None or self._teacher.device != device:
            from composer_prx.encoders import load_vision_encoder

            self._teacher = load_vision_encoder(self.teacher_name, weights=self.teacher_weights,
                                                dtype=self.teacher_dtype, device=device)
        return self._teacher

    def load_net(self, device: torch.device) -> None:
        self.teacher_on(device)

    def grid(self, height: int, width: int, patch_size: int) -> tuple[int, int]:
        """Teacher patch grid for an image: target_size / patch, at least 1 x 1."""
        h, w = target_size(height, width, self.resolution)
        return max(1, h // patch_size), max(1, w // patch_size)

    def distance(self, x_pred: Tensor, x: Tensor) -> Tensor:
        teacher = self.teacher_on(x_pred.device)
        grid = self.grid(x_pred.shape[-2], x_pred.shape[-1], teacher.patch_size)
        pred = teacher.encode(x_pred, grid=grid)
        with torch.no_grad():
            true = teacher.encode(x, grid=grid)
        if self.pooled:
            return dino_distance(pred.pooled, true.pooled)
        return dino_distance(pred.patch_tokens, true.patch_tokens)
