"""REPA (Yu et al., ICLR 2025): align a denoiser block's tokens to a frozen vision teacher's patch tokens.

    x_t ──► b_0 .. b_k ──► h [B, N or N_keep, C] ──► projector (Linear-SiLU-Linear-SiLU-Linear) ──► z [B, K, D]
    x (clean, [-1, 1]) ──► resize to the token grid (h, w) ──► teacher (no grad) ──► y [B, h w, D] ──► y[keep_idx]
    L_repa = -mean_{b, n} cos(z_bn, y_bn)        state.loss += weight * L_repa      (logged: loss/train/repa)

`block` is the index of the block whose OUTPUT is aligned (0-based; the recipe's "8th block" is 7).
While TREAD routes and `block` lies inside the route, the block's output holds only the kept tokens:
REPA reads ``denoiser.routing`` (README, Contracts for your own model, 4) and aligns them against the
same indices of the teacher's grid. Its forward hook is prepended, so at a route's last block it runs
before TREAD scatters the tokens back, whatever the algorithm order.

The projector is ``model.repa_projector``, an ordinary submodule of the model: in the optimizer from
step 0 (Adam under Muon: groups.py sends "*repa*" to Adam), in the state_dict and checkpoints, and
sharded by FSDP2 with the rest of the model. It must exist before the optimizer is built:
``Repa.prepare(model)`` / `attach_repa_projector` adds it (train.py calls ``prepare`` for every algorithm
that has one before building the optimizer); `Repa` raises at Event.INIT when it is missing or its
parameters are not in the optimizer. The teacher is a shared `VisionEncoder` outside the module tree.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import Tensor, nn

from composer_prx.algorithms.tread import find_denoiser, trained_routes

log = logging.getLogger(__name__)

__all__ = ["Repa", "RepaProjector", "attach_repa_projector", "denoiser_width", "projector_flops", "repa_loss",
           "token_grid"]

PROJECTOR_NAME = "repa_projector"


class RepaProjector(nn.Module):
    """Linear(C, H) -> SiLU -> Linear(H, H) -> SiLU -> Linear(H, D): denoiser tokens [.., C] -> teacher space [.., D]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)


def projector_flops(tokens: int, width: int, hidden: int, teacher_dim: int) -> float:
    """Forward matmul FLOPs of the projector MLP on `tokens` tokens: 2 tokens (C H + H^2 + H D)."""
    return 2.0 * tokens * (width * hidden + hidden * hidden + hidden * teacher_dim)


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """-mean cosine similarity over tokens: projected [B, K, D], target [B, K, D] -> scalar."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) patch grid of `n_tokens` image tokens of an H x W image (h w = N, h / w = H / W)."""
    patch = math.sqrt(height * width / n_tokens)
    h, w = round(height / patch), round(width / patch)
    if h * w != n_tokens:
        raise ValueError(f"REPA cannot lay {n_tokens} image tokens on a grid for a {height}x{width} image")
    return h, w


def denoiser_width(denoiser: nn.Module, block: int) -> int:
    """The token width C of `denoiser.blocks[block]`: cfg.hidden_dim / hidden_size, else the block's last Linear."""
    cfg = getattr(denoiser, "cfg", None)
    for source in (cfg, denoiser):
        for attr in ("hidden_dim", "hidden_size", "dim", "width"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    linears = [m for m in denoiser.blocks[block].modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"REPA cannot tell the token width of {type(denoiser).__name__}; pass width=")
    return linears[-1].out_features


def attach_repa_projector(model: nn.Module, teacher_dim: int, *, width: int, hidden: int = 2048) -> RepaProjector:
    """Register ``model.repa_projector`` (width -> teacher_dim) unless one of those sizes is there; return it."""
    existing = getattr(model, PROJECTOR_NAME, None)
    if isinstance(existing, RepaProjector):
        first, last = existing.net[0], existing.net[-1]
        if (first.in_features, first.out_features, last.out_features) != (width, hidden, teacher_dim):
            raise ValueError(
                f"model.repa_projector maps {first.in_features} -> {last.out_features} (hidden {first.out_features}); "
                f"this REPA needs {width} -> {teacher_dim} (hidden {hidden})"
            )
        return existing
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = None, None
    projector = RepaProjector(width, teacher_dim, hidden).to(device=device, dtype=dtype)
    setattr(model, PROJECTOR_NAME, projector)
    return projector


_EVENTS = (Event.INIT, Event.FIT_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.BATCH_END, Event.FIT_END)


class Repa(Algorithm):
    """REPA representation alignment during training (see the module docstring for the data flow).

    Args:
        teacher: a `load_vision_encoder` name (hub id, local folder, ``timm:<model>``); the recipe's is DINOv3.
        block: index of the block whose output is aligned (0-based; recipe: 7, the 8th block's output).
            Negative counts from the end.
        weight: loss weight (recipe 0.5).
        hidden: projector hidden width (2048 at full scale).
        until: a Composer time string ("100000ba", "0.8dur"); from then on REPA computes nothing (no teacher
            forward) and the projector receives no gradient. None: always on.
        teacher_weights / teacher_dtype: timm weights file (or "random"); the teacher's dtype ("float32", "bfloat16").
        width: the denoiser token width (default: read from the denoiser).
    """

    def __init__(self, teacher: str, block: int = 7, weight: float = 0.5, hidden: int = 2048,
                 until: str | None = None, teacher_weights: str | None = None, teacher_dtype: str = "float32",
                 width: int | None = None):
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"REPA teacher must be a hub id, a local path or 'timm:<model>', got {teacher!r}")
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"REPA block must be an int block index (the 8th block's output is 7), got {block!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"REPA weight must be a positive number (recipe 0.5), got {weight!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"REPA hidden must be a positive int (2048 at full scale), got {hidden!r}")
        self.until = None
        if until is not None:
            try:
                self.until = Time.from_timestring(until) if isinstance(until, str) else Time(int(until), TimeUnit.BATCH)
            except ValueError as err:
                raise ValueError(f"REPA until={until!r} is not a Composer time string such as '100000ba' or '0.8dur'") from err
        from composer_prx.encoders import teacher_dtype as parse_dtype

        self.teacher_name, self.teacher_weights = teacher, teacher_weights
        self.teacher_dtype = parse_dtype(teacher_dtype, "REPA")
        self.block, self.weight, self.hidden, self.width = block, float(weight), hidden, width
        self.teacher = None  # VisionEncoder, loaded at prepare / INIT
        self.teacher_forwards = 0
        self._hook = None
        self._terms: list[float] = []
        self._armed = False
        self._captured: tuple[Tensor, Tensor | None, int] | None = None

    def __repr__(self) -> str:
        return f"Repa(teacher={self.teacher_name!r}, block={self.block}, weight={self.weight}, until={self.until})"

    # ---- setup ---------------------------------------------------------------------------------
    def _load_teacher(self, device: torch.device | None):
        from composer_prx.encoders import load_vision_encoder

        self.teacher = load_vision_encoder(self.teacher_name, weights=self.teacher_weights, dtype=self.teacher_dtype,
                                           device=device)
        return self.teacher

    def _resolve_block(self, denoiser: nn.Module) -> int:
        depth = len(denoiser.blocks)
        index = self.block + depth if self.block < 0 else self.block
        if not 0 <= index < depth:
            raise ValueError(
                f"REPA block {self.block} is out of range for a denoiser with {depth} blocks "
                f"(valid: -{depth} .. {depth - 1}; the recipe's 8th block is 7)"
            )
        return index

    def prepare(self, model: nn.Module) -> RepaProjector:
        """Register ``model.repa_projector`` before the optimizer is built (train.py calls this)."""
        denoiser = find_denoiser(model)
        index = self._resolve_block(denoiser)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = None
        teacher = self._load_teacher(device)
        width = self.width or denoiser_width(denoiser, index)
        return attach_repa_projector(model, teacher.dim, width=width, hidden=self.hidden)

    def _check_optimizer(self, state: State) -> None:
        projector = getattr(state.model, PROJECTOR_NAME, None)
        if not isinstance(projector, RepaProjector):
            raise ValueError(
                "REPA needs model.repa_projector before the optimizer is built, so that it trains from step 0: "
                "call repa.prepare(model) before creating the optimizer (README, REPA and frozen vision teachers)"
            )
        in_optimizer = {id(p) for opt in state.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, p in projector.named_parameters() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"REPA: model.repa_projector parameters {missing} are not in the optimizer; call repa.prepare(model) "
                "BEFORE building the optimizer from model.parameters() (README, REPA and frozen vision teachers)"
            )

    # ---- events --------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in _EVENTS

    def _active(self, state: State) -> bool:
        if self.until is None:
            return True
        if self.until.unit == TimeUnit.DURATION:
            return state.get_elapsed_duration() < self.until
        return state.timestamp.get(self.until.unit) < self.until

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._check_optimizer(state)
            if self.teacher is None:
                self._load_teacher(next(state.model.parameters()).device)
        elif event == Event.FIT_START:
            self.attach(state.model)
        elif event == Event.BEFORE_FORWARD:
            self._captured = None
            self._armed = self._active(state)
        elif event == Event.AFTER_LOSS:
            term = self.take_loss(state.model, state.outputs.x)
            if term is not None:
                state.loss = state.loss + self.weight * term
                self._terms.append(float(term.detach()))
        elif event == Event.BATCH_END and self._terms:  # the mean over the batch's micro-batches
            logger.log_metrics({"loss/train/repa": sum(self._terms) / len(self._terms)})
            self._terms = []
        elif event == Event.FIT_END:
            self.detach()

    def attach(self, model: nn.Module) -> None:
        """Hook the aligned block's output (prepended: before TREAD's scatter); log whether it is routed."""
        denoiser = find_denoiser(model)
        index = self._resolve_block(denoiser)
        routes = trained_routes(model) or []
        routed = [r for r in routes if r.start <= index <= r.end]
        log.info("REPA aligns the output of block %d of %d to %s%s", index, len(denoiser.blocks), self.teacher,
                 f"; the block is inside TREAD route {routed[0]}: only kept tokens are aligned" if routed
                 else "; the block is not routed: all tokens are aligned")
        if self._hook is None:
            self._hook = denoiser.blocks[index].register_forward_hook(self._capture(denoiser, index), prepend=True)

    def detach(self) -> None:
        """Remove the hook; forwards are no longer captured."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._armed, self._captured = False, None

    def arm(self) -> None:
        """Capture the aligned block's output in the next training forward (the Trainer does this per micro-batch)."""
        self._armed, self._captured = True, None

    def take_loss(self, model: nn.Module, images: Tensor) -> Tensor | None:
        """L_repa of the captured forward against the teacher's tokens of its clean `images`; None if nothing captured."""
        self._armed = False
        if self._captured is None:
            return None
        hidden, keep_idx, n_tokens = self._captured
        self._captured = None
        return self.loss_term(model, images, hidden, keep_idx, n_tokens)

    def _capture(self, denoiser: nn.Module, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self._armed and module.training and torch.is_grad_enabled()) or self._captured is not None:
                return
            routing = getattr(denoiser, "routing", None)
            keep_idx, n_tokens = None, output.shape[1]
            if routing is not None and routing.route_start <= index <= routing.route_end:
                keep_idx, n_tokens = routing.keep_idx, routing.n_tokens
                if output.shape[1] != keep_idx.shape[1]:
                    raise RuntimeError(
                        f"REPA: block {index} inside TREAD route {routing.route_start} -> {routing.route_end} "
                        f"returned {output.shape[1]} tokens, expected the {keep_idx.shape[1]} kept ones"
                    )
            self._captured = (output, keep_idx, n_tokens)

        return hook

    def loss_term(self, model: nn.Module, images: Tensor, hidden: Tensor, keep_idx: Tensor | None,
                  n_tokens: int) -> Tensor:
        """L_repa of block tokens hidden [B, K, C] (keep_idx [B, K] of the N = h w tokens, or None: all) vs images."""
        h, w = token_grid(n_tokens, images.shape[-2], images.shape[-1])
        if self.teacher is None or self.teacher.device != images.device:  # e.g. the Trainer moved the model
            self._load_teacher(images.device)
        with torch.no_grad():
            target = self.teacher.encode(images, grid=(h, w)).patch_tokens  # [B, h, w, D]
        self.teacher_forwards += 1
        target = target.reshape(target.shape[0], h * w, -1).to(hidden.dtype)  # [B, N, D]
        if keep_idx is not None:
            target = target.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]))  # [B, K, D]
        projector = getattr(model, PROJECTOR_NAME)
        return repa_loss(projector(hidden), target)
