"""TREAD token routing (Krause et al., ICCV 2025): a random share of image tokens skips a span of blocks.

For a route (s, e, r) on a denoiser with blocks b_0 .. b_{L-1}, per sample a random set K of
N - floor(r N) token indices is kept; the other tokens jump from the input of block s to the output
of block e unchanged:

    x [B, N, C] ──► b_0 .. b_{s-1} ──► x_s ─┬─ gather K ──► x_s[K] [B, |K|, C], ctx.select(K)
                                             │                     │
                                             │          b_s .. b_e (kept tokens only)
                                             │                     │
                                             └── scatter ◄─────────┘
    x_{e+1}[i] = (b_e ∘ .. ∘ b_s)(x_s[K], ctx[K])[i]   for i in K
    x_{e+1}[i] = x_s[i]                                 for i not in K   ──► b_{e+1} .. ──► x_pred

Routed blocks cost ~ (1 - r) of their dense FLOPs; nothing is dropped, so the loss sees every token.
While tokens are routed, ``denoiser.routing`` holds a `Routing` (kept indices [B, |K|], N, s, e)
and is ``None`` otherwise (README, Contracts for your own model, 4): a hook on block k reads it
together with the block's output to know which tokens that output holds (at block e, a forward hook registered before
TREAD's sees the kept tokens and the Routing, one registered after sees all N tokens and None).

How it attaches (README, Contracts for your own model, 3; no model method is replaced): forward
pre-hooks and forward hooks on the denoiser and on ``denoiser.blocks[s] .. [e]``; every block is called as
``block(x, ctx)`` and ``ctx.select(idx [B, K])`` restricts the per-token context. The denoiser is
``model.denoiser`` when present, else ``model`` itself when it has an ``nn.ModuleList`` ``blocks``,
else the shallowest submodule that has one (it must be unique).

Selections are drawn from a dedicated ``torch.Generator`` (never the global RNG), once per denoiser
forward and per route; an activation-checkpoint recomputation of a block reuses the selection of
the forward it recomputes (recomputation must come before the next denoiser forward, as in any
training step; reentrant checkpoints must wrap the blocks before TREAD attaches, which `Tread` does
at FIT_START, else the first routed forward raises). `Tread` reseeds its generator from (seed, rank, batch, micro-batch), so
a resumed run routes exactly like an uninterrupted one.

Training routing (`Tread`, `apply_tread`) records its resolved routes as ``denoiser.tread_routes``;
sampling-time self-guidance ("Guiding Token-Sparse Diffusion Models", Krause et al. 2025) routes
those by default through `tread_routing`:  out = routed + w (dense - routed), both with the prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import typing
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

__all__ = ["Route", "Routing", "Tread", "TreadHandle", "apply_tread", "find_denoiser", "kept_tokens", "parse_routes",
           "plan_routes", "record_routes", "tokens_per_block", "trained_routes", "tread_routing"]


@dataclass(frozen=True)
class Route:
    """Tokens skip from the input of block `start` to the output of block `end` (inclusive).

    Negative indices count from the end (-2 = penultimate block); `ratio` is the share of image
    tokens that skip, in [0, 1).
    """

    start: int = 1
    end: int = -2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TREAD route {name} must be an int block index, got {value!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"TREAD ratio must be a float in [0, 1), got {self.ratio!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"TREAD ratio (share of tokens that skip the route) must be in [0, 1), got {self.ratio}; "
                "0.5 is the recipe's value"
            )
        if (self.start >= 0) == (self.end >= 0) and self.start > self.end:
            raise ValueError(f"TREAD route start {self.start} is after its end {self.end}; give start <= end")

    def resolve(self, depth: int) -> Route:
        """The same route with non-negative block indices for a denoiser of `depth` blocks."""
        start = self.start + depth if self.start < 0 else self.start
        end = self.end + depth if self.end < 0 else self.end
        if not (0 <= start < depth and 0 <= end < depth):
            raise ValueError(
                f"TREAD route ({self.start} -> {self.end}) is out of range for a denoiser with {depth} blocks; "
                f"indices must lie in [-{depth}, {depth - 1}]"
            )
        if start > end:
            raise ValueError(
                f"TREAD route ({self.start} -> {self.end}) resolves to blocks {start} -> {end} on a denoiser "
                f"with {depth} blocks: start is after end"
            )
        return Route(start, end, float(self.ratio))


@dataclass
class Routing:
    """What `denoiser.routing` holds while tokens are routed (README, Contracts for your own model, 4).

    keep_idx [B, N_keep] long: indices (into the N tokens entering block route_start) of the tokens
    that run through blocks route_start .. route_end (inclusive); n_tokens = N.
    """

    keep_idx: Tensor
    n_tokens: int
    route_start: int
    route_end: int


def _parse_route(spec: Route | Mapping | Sequence) -> Route:
    if isinstance(spec, Route):
        return spec
    if isinstance(spec, Mapping):
        allowed = {"route_start", "route_end", "ratio"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(
                f"TREAD route {dict(spec)} has unknown keys {sorted(unknown)}; valid keys: {sorted(allowed)}"
            )
        return Route(spec.get("route_start", 1), spec.get("route_end", -2), spec.get("ratio", 0.5))
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 3:
        return Route(*spec)
    raise ValueError(
        f"TREAD route {spec!r} must be a Route, a mapping with route_start/route_end/ratio, "
        "or a (route_start, route_end, ratio) triple"
    )


def parse_routes(spec: Route | Mapping | Sequence) -> list[Route]:
    """One route (a Route, a route_start/route_end/ratio mapping or a triple) or a list of them -> [Route]."""
    if isinstance(spec, (Route, Mapping)) or (
        isinstance(spec, Sequence) and len(spec) == 3 and all(not isinstance(v, (Sequence, Mapping, Route)) for v in spec)
    ):
        return [_parse_route(spec)]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"TREAD routes must be a route or a non-empty list of routes, got {spec!r}")
    return [_parse_route(item) for item in spec]


def find_denoiser(model: nn.Module) -> nn.Module:
    """The module whose `blocks` get routed: `model.denoiser` if present, else `model` if it has an
    nn.ModuleList `blocks`, else the unique shallowest submodule that has one (DDP is unwrapped)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    denoiser = getattr(model, "denoiser", None)
    if isinstance(denoiser, nn.Module):
        return denoiser
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return model
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "blocks", None), nn.ModuleList):
            continue
        depth = name.count(".")
        if best and depth > best[0][0].count("."):
            continue
        if best and depth < best[0][0].count("."):
            best = []
        best.append((name, module))
    if len(best) == 1:
        return best[0][1]
    if not best:
        raise ValueError(
            f"TREAD found no denoiser in {type(model).__name__}: it needs `model.denoiser` or a module with an "
            "nn.ModuleList `blocks` whose blocks are called as block(x [B, N, C], ctx) "
            "(README, Contracts for your own model, 3)"
        )
    raise ValueError(
        f"TREAD found several candidate denoisers {[name for name, _ in best]} in {type(model).__name__}; "
        "expose the one to route as `model.denoiser`"
    )


def _check_blocks(denoiser: nn.Module) -> nn.ModuleList:
    """Fail early, naming the block, when `denoiser.blocks` cannot follow the protocol."""
    blocks = getattr(denoiser, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"TREAD needs `{type(denoiser).__name__}.blocks` to be a non-empty nn.ModuleList, got "
            f"{type(blocks).__name__}"
        )
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, block in enumerate(blocks):
        signature = inspect.signature(block.forward)
        try:
            signature.bind(None, None)
        except TypeError as err:
            raise ValueError(
                f"TREAD: block {i} ({type(block).__name__}.forward{signature}) cannot be called as "
                f"block(x, ctx) ({err}); the denoiser protocol (README, Contracts for your own model, 3) needs "
                "that signature"
            ) from err
        params = list(signature.parameters.values())
        if len(params) < 2 or params[0].kind not in positional or params[1].kind not in positional:
            continue  # e.g. forward(*args, **kwargs) of a wrapper: checked at the first routed call
        try:
            hints = typing.get_type_hints(block.forward)
        except (NameError, TypeError, AttributeError):
            continue  # unresolvable annotations: checked at the first routed call instead
        ctx_type = hints.get(params[1].name)
        if isinstance(ctx_type, type) and ctx_type is not object and not callable(getattr(ctx_type, "select", None)):
            raise ValueError(
                f"TREAD: block {i} ({type(block).__name__}) takes {params[1].name}: {ctx_type.__name__}, which has "
                "no select(idx [B, K]) method; the denoiser protocol (README, Contracts for your own model, 3) "
                "needs ctx.select "
                "to restrict per-token fields (e.g. RoPE) to the kept tokens"
            )
    return blocks


def kept_tokens(n_tokens: int, ratio: float) -> int:
    """Tokens that run through a route: N - floor(ratio N)."""
    return n_tokens - int(ratio * n_tokens)


def tokens_per_block(depth: int, n_tokens: int, routes: Sequence[Route | Mapping | Sequence]) -> list[int]:
    """Image tokens each of `depth` blocks processes when `routes` route n_tokens tokens (non-overlapping)."""
    seen = [n_tokens] * depth
    for route in (_parse_route(r).resolve(depth) for r in routes):
        for block in range(route.start, route.end + 1):
            seen[block] = kept_tokens(n_tokens, route.ratio)
    return seen


def draw_keep_idx(batch: int, n_tokens: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Sorted indices [B, N - floor(ratio N)] of kept tokens, a fresh random subset per sample."""
    n_keep = kept_tokens(n_tokens, ratio)
    scores = torch.rand(batch, n_tokens, generator=generator, device=generator.device)  # [B, N]
    return scores.argsort(dim=1)[:, :n_keep].sort(dim=1).values


def _x_ctx(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    x = args[0] if len(args) > 0 else kwargs.get("x")
    ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
    return x, ctx


def _with_x_ctx(args: tuple, kwargs: dict, x: Any, ctx: Any) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    if len(args) > 0:
        args[0] = x
    else:
        kwargs["x"] = x
    if len(args) > 1:
        args[1] = ctx
    else:
        kwargs["ctx"] = ctx
    return tuple(args), kwargs


_ROUTERS: weakref.WeakKeyDictionary[nn.Module, list[TreadHandle]] = weakref.WeakKeyDictionary()


class TreadHandle:
    """Routing attached to one denoiser by hooks; `remove()` detaches it. Made by `apply_tread`.

    always=False routes only forwards that train (denoiser.training and autograd recording);
    always=True routes every forward. `enabled` pauses it; `generator` draws the selections.
    """

    def __init__(self, denoiser: nn.Module, routes: list[Route], generator: torch.Generator, always: bool):
        self.denoiser = denoiser
        self.routes = routes
        self.generator = generator
        self.always = always
        self.enabled = True
        self._paused = 0  # > 0 while a tread_routing context on the same denoiser takes over
        self._active = False  # decided once per denoiser forward
        self._grad_at_start = False
        self._keep: dict[int, Tensor] = {}  # route -> keep_idx of the current forward (reused on recompute)
        self._stash: dict[int, tuple[Tensor, Tensor, Any]] = {}  # route -> (full x, keep_idx, selected ctx)
        self.last_keep_fraction: float | None = None
        blocks = denoiser.blocks
        hooks: list[RemovableHandle] = [denoiser.register_forward_pre_hook(self._on_denoiser_forward)]
        for r, route in enumerate(routes):
            hooks.append(blocks[route.start].register_forward_pre_hook(self._make_gather(r), with_kwargs=True))
            for i in range(route.start + 1, route.end + 1):
                hooks.append(blocks[i].register_forward_pre_hook(self._make_swap_ctx(r), with_kwargs=True))
            hooks.append(blocks[route.end].register_forward_hook(self._make_scatter(r), with_kwargs=True))
        self._hooks = hooks
        if not hasattr(denoiser, "routing"):
            denoiser.routing = None
        _ROUTERS.setdefault(denoiser, []).append(self)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Inside: forwards are dense; the hooks stay attached (no re-planning between calls)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def remove(self) -> None:
        """Remove every hook and forget the stashed tensors; the denoiser is dense again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._keep.clear()
        self._stash.clear()
        self._active = False
        self.denoiser.routing = None
        routers = _ROUTERS.get(self.denoiser, [])
        if self in routers:
            routers.remove(self)

    # ---- hooks ---------------------------------------------------------------------------------
    def _on_denoiser_forward(self, module: nn.Module, args: tuple) -> None:
        self._grad_at_start = torch.is_grad_enabled()
        self._active = (
            self.enabled and self._paused == 0 and (self.always or (module.training and self._grad_at_start))
        )
        self._keep.clear()
        self._stash.clear()
        module.routing = None

    def _make_gather(self, r: int):
        route = self.routes[r]

        def gather(module: nn.Module, args: tuple, kwargs: dict):
            if not self._active:
                return None
            x, ctx = _x_ctx(args, kwargs)
            if not isinstance(x, Tensor) or x.dim() != 3:
                raise TypeError(
                    f"TREAD: block {route.start} got x of {type(x).__name__} "
                    f"{tuple(x.shape) if isinstance(x, Tensor) else ''}; the protocol needs image tokens [B, N, C]"
                )
            if not callable(getattr(ctx, "select", None)):
                raise TypeError(
                    f"TREAD: block {route.start} got ctx of type {type(ctx).__name__}, which has no select(idx); "
                    "the denoiser protocol (README, Contracts for your own model, 3) needs ctx.select(idx [B, K])"
                )
            batch, n_tokens, dim = x.shape
            keep_idx = self._keep.get(r)
            if keep_idx is None or keep_idx.shape[0] != batch:
                keep_idx = draw_keep_idx(batch, n_tokens, route.ratio, self.generator).to(x.device)
                self._keep[r] = keep_idx
            ctx_kept = ctx.select(keep_idx)
            x_kept = x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim))  # [B, K, C]
            self._stash[r] = (x, keep_idx, ctx_kept)
            self.last_keep_fraction = keep_idx.shape[1] / n_tokens
            self.denoiser.routing = Routing(keep_idx, n_tokens, route.start, route.end)
            return _with_x_ctx(args, kwargs, x_kept, ctx_kept)

        return gather

    def _make_swap_ctx(self, r: int):
        route = self.routes[r]

        def swap_ctx(module: nn.Module, args: tuple, kwargs: dict):
            if not self._active or r not in self._stash:
                return None
            x, _ = _x_ctx(args, kwargs)
            _, keep_idx, ctx_kept = self._stash[r]
            if x.shape[1] != keep_idx.shape[1]:
                raise RuntimeError(
                    f"TREAD: a block inside route {route.start} -> {route.end} got {x.shape[1]} tokens, expected "
                    f"the {keep_idx.shape[1]} kept ones; the denoiser must call its blocks in order as "
                    "x = block(x, ctx)"
                )
            return _with_x_ctx(args, kwargs, x, ctx_kept)

        return swap_ctx

    def _make_scatter(self, r: int):
        route = self.routes[r]

        def scatter(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if not self._active or r not in self._stash:
                return None
            if self._grad_at_start and not torch.is_grad_enabled():
                raise RuntimeError(
                    f"TREAD: block {route.end} runs without autograd inside a training forward, i.e. inside a "
                    "reentrant activation checkpoint that wraps TREAD's hooks; the skipped tokens' gradient would be "
                    "lost. Attach TREAD after wrapping the blocks (Tread does so at FIT_START) or use "
                    "non-reentrant checkpointing"
                )
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"TREAD: block {route.end} returned {type(output).__name__}; the protocol needs it to return "
                    "the image tokens [B, K, C]"
                )
            x_full, keep_idx, _ = self._stash[r]
            index = keep_idx.unsqueeze(-1).expand(-1, -1, output.shape[-1])
            self.denoiser.routing = None
            return x_full.to(output.dtype).scatter(1, index, output)  # [B, N, C]

        return scatter


def _plan(model: nn.Module, routes: list[Route]) -> tuple[nn.Module, list[Route]]:
    """Find the denoiser, check its blocks, resolve and order the routes; ValueError naming any problem."""
    if not routes:
        raise ValueError("TREAD needs at least one route")
    denoiser = find_denoiser(model)
    blocks = _check_blocks(denoiser)
    resolved = sorted((route.resolve(len(blocks)) for route in routes), key=lambda route: route.start)
    for before, after in zip(resolved, resolved[1:]):
        if after.start <= before.end:
            raise ValueError(
                f"TREAD routes {before.start} -> {before.end} and {after.start} -> {after.end} overlap; "
                "routes must cover disjoint block spans"
            )
    return denoiser, resolved


def apply_tread(
    model: nn.Module,
    route_start: int = 1,
    route_end: int = -2,
    ratio: float = 0.5,
    *,
    routes: Sequence[Route | Mapping | Sequence] | None = None,
    generator: torch.Generator | None = None,
    always: bool = False,
) -> TreadHandle:
    """Attach TREAD routing to `model`'s denoiser (see the module docstring); returns the handle.

    One route (route_start, route_end, ratio) or several non-overlapping `routes`. Without a
    generator, selections come from a CPU generator seeded with 0.
    """
    parsed = [_parse_route(spec) for spec in routes] if routes is not None else [Route(route_start, route_end, ratio)]
    denoiser, resolved = _plan(model, parsed)
    live = [handle for handle in _ROUTERS.get(denoiser, []) if handle._paused == 0]
    if live:
        raise ValueError(
            f"{type(denoiser).__name__} already has TREAD routing attached ({live[0].routes}); "
            "call .remove() on its handle first (use tread_routing for a temporary sampling route)"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if not always:  # a training route: what self-guidance routes by default
        denoiser.tread_routes = resolved
    return TreadHandle(denoiser, resolved, generator, always)


def plan_routes(model: nn.Module, routes: Sequence[Route | Mapping | Sequence]) -> list[Route]:
    """`routes` resolved against `model`'s denoiser (non-negative, ordered, checked); ValueError naming a problem."""
    return _plan(model, [_parse_route(spec) for spec in routes])[1]


def record_routes(model: nn.Module, routes: Sequence[Route | Mapping | Sequence]) -> list[Route]:
    """Record `routes` (resolved) as the ones `model`'s denoiser was trained with: ``denoiser.tread_routes``."""
    resolved = plan_routes(model, routes)
    find_denoiser(model).tread_routes = resolved
    return resolved


def trained_routes(model: nn.Module) -> list[Route] | None:
    """The routes recorded by `Tread` / `apply_tread` / `record_routes` on `model`'s denoiser, or None."""
    return getattr(find_denoiser(model), "tread_routes", None)


@contextlib.contextmanager
def tread_routing(
    denoiser: nn.Module,
    route_start: int = 1,
    route_end: int = -2,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    routes: Sequence[Route | Mapping | Sequence] | None = None,
) -> Iterator[TreadHandle]:
    """Inside: every forward of `denoiser` routes (fresh selection per call from `generator`); outside: none.

    One route or several `routes`. Other TREAD routing attached to the same denoiser (a training
    `Tread`) is paused inside; ``handle.suspended()`` gives dense forwards without re-planning.
    Self-guidance:  out = routed + w (dense - routed).
    """
    others = list(_ROUTERS.get(find_denoiser(denoiser), []))
    for other in others:
        other._paused += 1
    try:
        handle = apply_tread(denoiser, route_start, route_end, ratio, routes=routes, generator=generator, always=True)
        try:
            yield handle
        finally:
            handle.remove()
    finally:
        for other in others:
            other._paused -= 1


def _mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_EVENTS = (Event.INIT, Event.FIT_START, Event.BATCH_START, Event.BEFORE_FORWARD, Event.BATCH_END, Event.FIT_END)


class Tread(Algorithm):
    """TREAD token routing during training (see the module docstring for the data flow).

    Args:
        route_start / route_end / ratio: one route; defaults 1, -2 (penultimate block), 0.5.
        routes: several non-overlapping routes instead, each a Route, a mapping with
            route_start/route_end/ratio, or a triple.
        seed: selection seed; default the trainer's rank-zero seed. Each micro-batch reseeds the
            generator from (seed, rank, batch, micro-batch index).

    Validated and recorded as ``denoiser.tread_routes`` at Event.INIT (denoiser found, blocks follow
    the protocol, indices in range), hooks attached at FIT_START (after any wrapping) and removed at
    FIT_END. Routes only training forwards.
    Logs tread/keep_fraction and tread/routed_blocks.
    """

    def __init__(
        self,
        route_start: int | None = None,
        route_end: int | None = None,
        ratio: float | None = None,
        routes: Sequence[Route | Mapping | Sequence] | None = None,
        seed: int | None = None,
    ):
        single = (route_start, route_end, ratio)
        if routes is not None:
            if any(value is not None for value in single):
                raise ValueError("give TREAD either routes=[...] or route_start/route_end/ratio, not both")
            if isinstance(routes, (str, Mapping)) or not isinstance(routes, Sequence) or len(routes) == 0:
                raise ValueError(f"TREAD routes must be a non-empty list of routes, got {routes!r}")
            self.routes = [_parse_route(spec) for spec in routes]
        else:
            self.routes = [
                Route(
                    1 if route_start is None else route_start,
                    -2 if route_end is None else route_end,
                    0.5 if ratio is None else ratio,
                )
            ]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"TREAD seed must be a non-negative int or None, got {seed!r}")
        self.seed = seed
        self.handle: TreadHandle | None = None
        self._generator = torch.Generator()
        self._micro = 0

    def __repr__(self) -> str:
        routes = [(route.start, route.end, route.ratio) for route in self.routes]
        return f"Tread(routes={routes}, seed={self.seed})"

    def match(self, event: Event, state: State) -> bool:
        return event in _EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            record_routes(state.model, self.routes)  # checks them too; generate(guidance="tread") routes these
            if self.seed is None:
                self.seed = int(state.rank_zero_seed)
        elif event == Event.FIT_START:
            if self.handle is None or not self.handle.attached:
                self.handle = apply_tread(state.model, routes=self.routes, generator=self._generator)
                log.info("TREAD routing %s on %s", self.handle.routes, type(self.handle.denoiser).__name__)
        elif event == Event.BATCH_START:
            self._micro = 0
        elif event == Event.BEFORE_FORWARD:
            batch = state.timestamp.batch.value
            seed = self.seed if self.seed is not None else 0
            self._generator.manual_seed(_mix_seed(seed, dist.get_global_rank(), batch, self._micro))
            self._micro += 1
        elif event == Event.BATCH_END and self.handle is not None:
            if self.handle.last_keep_fraction is not None:
                logger.log_metrics(
                    {
                        "tread/keep_fraction": self.handle.last_keep_fraction,
                        "tread/routed_blocks": sum(route.end - route.start + 1 for route in self.handle.routes),
                    }
                )
        elif event == Event.FIT_END and self.handle is not None:
            self.handle.remove()
            self.handle = None

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
