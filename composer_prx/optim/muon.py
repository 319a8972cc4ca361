"""Muon for the transformer's 2D matrices, Adam for everything else, in one optimizer (FSDP2-aware).

Muon (Keller Jordan, modded-nanogpt) per matrix W [m, n] with gradient G:

    B <- mu * B + (1 - mu) * G                       momentum buffer (EMA form)
    U <- (1 - mu) * G + mu * B     (Nesterov)    or  U <- B
    O <- NewtonSchulz5(U / ||U||_F)                  ~ the orthogonal factor of U (optim/newton_schulz.py)
    W <- W * (1 - lr * wd) - lr * scale(m, n) * O    decoupled weight decay

With ns_chunks = k the rows of U are split into k blocks orthogonalised (and scaled) as separate
matrices. Under FSDP2 or DDP each matrix is orthogonalised once, by an owner rank (optim/exchange.py).
Optimizer state is created at the first step, so Composer may rebuild the parameter groups after sharding.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from composer.core import Callback
from torch import nn

from composer_prx.optim.exchange import (Layout, check_same_plan, distributed, exchange_replicated, exchange_sharded,
                                         layout_of, local)
from composer_prx.optim.groups import GROUPINGS, muon_param_groups
from composer_prx.optim.newton_schulz import (NS_METHODS, SCALINGS, newton_schulz_flops, ns_method,
                                              orthogonalize_chunks, update_scale)

log = logging.getLogger(__name__)

NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MUON_KEYS = {"use_muon", "name", "lr", "weight_decay", "momentum", "nesterov", "ns_steps", "scaling", "ns_dtype",
              "ns_method", "ns_chunks", "betas", "eps"}


def _resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 on accelerators; fp32 on CPU, where bf16 matmul is usually slow
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return NS_DTYPES[name]


@dataclass
class _Job:
    """One Muon matrix this step: its local gradient and momentum rows; the update is made when needed."""

    param: torch.Tensor
    group: dict
    group_index: int
    grad: torch.Tensor  # local rows (sharded) or whole matrix
    buf: torch.Tensor  # momentum buffer, same rows, already updated this step
    ns_dtype: torch.dtype
    layout: Layout
    shape: tuple[int, int] = field(init=False)
    block: tuple[int, int] = field(init=False)  # shape of each orthogonalised row block
    method: str = field(init=False)
    flops: int = field(init=False)

    def __post_init__(self) -> None:
        self.shape = (self.param.shape[0], self.param.shape[1])
        chunks, steps = self.group["ns_chunks"], self.group["ns_steps"]
        self.block = (self.shape[0] // chunks, self.shape[1])
        self.method = self.group["ns_method"]
        if self.method == "auto":
            self.method = ns_method(*self.block, steps, self.ns_dtype)
        self.flops = chunks * newton_schulz_flops(*self.block, steps, self.method)

    @property
    def device(self) -> torch.device:
        return self.grad.device

    @property
    def round_key(self) -> tuple:
        """Jobs exchanged in one round share shape, blocks, dtype and iteration."""
        return (self.shape, self.group["ns_chunks"], self.ns_dtype, self.group["ns_steps"], self.method)

    def local_update(self) -> torch.Tensor:
        """U = (1 - mu) G + mu B (Nesterov) or B, this rank's rows, in the NS dtype."""
        update = torch.lerp(self.grad, self.buf, self.group["momentum"]) if self.group["nesterov"] else self.buf
        return update.to(self.ns_dtype)


def _orthogonalize(jobs: list[_Job], mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole-matrix Newton-Schulz for jobs of one NS dtype (same-shape blocks batched)."""
    return orthogonalize_chunks(mats, [j.group["ns_chunks"] for j in jobs], [j.group["ns_steps"] for j in jobs],
                                [j.method for j in jobs], mats[0].dtype)


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon=True` (2D matrices only), AdamW on groups with `use_muon=False`.

    Every group must say `use_muon`. Muon keys: lr, momentum, nesterov, ns_steps, scaling
    ("moonlight" | "keller" | "none"), ns_dtype ("auto": bf16 on accelerators, fp32 on CPU | "float32" |
    "bfloat16" | "float16"), ns_method ("auto" | "iterate" | "gram", see newton_schulz), ns_chunks (row
    blocks orthogonalised apart, default 1), weight_decay. Adam keys: lr, betas, eps, weight_decay. Any group
    may carry a `name` (used in logs). Other keys (a scheduler's `initial_lr`, ...) are kept as they are.
    Weight decay is decoupled (W <- W (1 - lr wd)) in both kinds of group.
    """

    def __init__(
        self,
        params: Iterable[dict] | Iterable[torch.Tensor],
        lr: float = 1e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        scaling: str = "moonlight",
        ns_dtype: str | torch.dtype = "auto",
        ns_method: str = "auto",
        ns_chunks: int = 1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        self.ns_flops = 0  # Newton-Schulz FLOPs this rank ran in the last step
        self.ns_matrices = 0  # matrices this rank orthogonalised in the last step
        self._rms_sums: dict[int, tuple[torch.Tensor, int]] = {}
        if isinstance(ns_dtype, torch.dtype):
            ns_dtype = _dtype_name(ns_dtype)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, scaling=scaling,
                        ns_dtype=ns_dtype, ns_method=ns_method, ns_chunks=ns_chunks, weight_decay=weight_decay,
                        betas=betas, eps=eps)
        _validate_group(defaults, where="Muon(...)")
        params = list(params)
        if params and not isinstance(params[0], dict):
            raise ValueError(
                "Muon needs parameter groups that say use_muon=True/False, not a flat parameter list; "
                "build them with muon_param_groups(model) or build_muon(model)"
            )
        super().__init__(params, defaults)

    # -- groups --------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        for key in param_group:
            close = difflib.get_close_matches(key, sorted(_MUON_KEYS), n=1, cutoff=0.8)
            if key not in _MUON_KEYS and key != "params" and close:
                raise ValueError(f"unknown Muon param-group key {key!r}; did you mean {close[0]!r}?")
        if "use_muon" not in param_group or not isinstance(param_group["use_muon"], bool):
            raise ValueError(
                f"every Muon param group needs use_muon=True or False (got {param_group.get('use_muon')!r}); "
                "build groups with muon_param_groups(model)"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        name = param_group.get("name", f"group{len(self.param_groups)}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_group(merged, where=f"param group {name!r}")
        if param_group["use_muon"]:
            for p in params:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon group {name!r} got a parameter of shape {tuple(p.shape)}; Muon orthogonalises 2D "
                        "matrices only. Put biases, norms, convolutions and embeddings in an Adam group "
                        "(use_muon=False)."
                    )
                if p.shape[0] % merged["ns_chunks"]:
                    raise ValueError(
                        f"Muon group {name!r}: ns_chunks={merged['ns_chunks']} does not divide the {p.shape[0]} rows "
                        f"of a parameter of shape {tuple(p.shape)}"
                    )
        param_group = {**param_group, "params": params}
        if isinstance(param_group.get("ns_dtype"), torch.dtype):
            param_group["ns_dtype"] = _dtype_name(param_group["ns_dtype"])
        if "betas" in param_group:
            param_group["betas"] = tuple(param_group["betas"])
        super().add_param_group(param_group)

    # -- step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One Muon/Adam step over all groups; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ns_flops = 0
        self.ns_matrices = 0
        self._rms_sums = {}
        muon_groups = [(gi, g) for gi, g in enumerate(self.param_groups) if g["use_muon"]]
        plan, failure = [], None
        try:
            plan = [(gi, i, p, layout_of(p)) for gi, g in muon_groups for i, p in enumerate(g["params"])
                    if p.grad is not None]
        except ValueError as err:
            failure = str(err)
        if muon_groups and distributed():
            device = local(muon_groups[0][1]["params"][0]).device
            check_same_plan([_describe(self.param_groups[gi], gi, i, p, lay) for gi, i, p, lay in plan], failure,
                            device)
        elif failure is not None:
            raise ValueError(failure)
        by_comm: dict[tuple, list[_Job]] = {}
        for job in self._momentum(plan):
            by_comm.setdefault((job.layout.kind, job.layout.group, job.ns_dtype), []).append(job)
        for (kind, pg, _), comm_jobs in by_comm.items():
            if kind == "local":
                owned = comm_jobs
                for job, orth in zip(comm_jobs, _orthogonalize(comm_jobs, [j.local_update() for j in comm_jobs])):
                    self._apply_muon(job, orth)
            else:
                exchange = exchange_sharded if kind == "sharded" else exchange_replicated
                owned = exchange(comm_jobs, pg, lambda job, whole: _orthogonalize([job], [whole])[0], self._apply_muon)
            self.ns_flops += sum(j.flops for j in owned)
            self.ns_matrices += len(owned)
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                self._adam(gi, group)
        return loss

    def _momentum(self, plan: list[tuple[int, int, torch.Tensor, Layout]]) -> list[_Job]:
        jobs = []
        by_group: dict[int, list[tuple[torch.Tensor, Layout]]] = {}
        for gi, _, p, layout in plan:
            by_group.setdefault(gi, []).append((p, layout))
        for gi, members in by_group.items():
            group = self.param_groups[gi]
            params = [p for p, _ in members]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads = [local(p.grad) for p in params]
            bufs = [local(self.state[p]["momentum_buffer"]) for p in params]
            torch._foreach_lerp_(bufs, grads, 1.0 - group["momentum"])  # B <- mu B + (1 - mu) G
            for (p, layout), grad, buf in zip(members, grads, bufs):
                dtype = _resolve_ns_dtype(group["ns_dtype"], grad.device)
                jobs.append(_Job(p, group, gi, grad, buf, dtype, layout))
        return jobs

    def _apply_muon(self, job: _Job, result: torch.Tensor) -> None:
        """W <- W (1 - lr wd) - lr scale O, with O this rank's rows of the orthogonalised update."""
        group = job.group
        lr, wd = float(group["lr"]), group["weight_decay"]
        scale = update_scale(group["scaling"], *job.block)
        p = local(job.param)
        if wd:
            p.mul_(1.0 - lr * wd)
        step = result.to(p.dtype)
        p.add_(step, alpha=-lr * scale)
        norm = torch.linalg.vector_norm(step, dtype=torch.float32)
        self._add_rms(job.group_index, norm.square() * scale**2, step.numel())

    def _adam(self, gi: int, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        local_params = [local(p) for p in params]
        grads = [local(p.grad) for p in params]
        exp_avgs = [local(self.state[p]["exp_avg"]) for p in params]
        exp_avg_sqs = [local(self.state[p]["exp_avg_sq"]) for p in params]
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)  # v <- b2 v + (1 - b2) g^2
        step_values = [s.item() for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**s) for s in step_values])
        torch._foreach_add_(denom, eps)  # sqrt(v_hat) + eps
        direction = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(direction, [1.0 - beta1**s for s in step_values])  # m_hat / (sqrt(v_hat) + eps)
        if wd:
            torch._foreach_mul_(local_params, 1.0 - lr * wd)
        torch._foreach_add_(local_params, direction, alpha=-lr)
        norms = torch._foreach_norm(direction)
        self._add_rms(gi, torch.stack(norms).float().square().sum(), sum(d.numel() for d in direction))

    # -- diagnostics ---------------------------------------------------------------------------------
    def _add_rms(self, gi: int, sumsq: torch.Tensor, numel: int) -> None:
        prev = self._rms_sums.get(gi)
        self._rms_sums[gi] = (sumsq, numel) if prev is None else (prev[0] + sumsq, prev[1] + numel)

    def update_rms(self) -> dict[str, float]:
        """RMS of the last step's update per group, before the learning rate: {group name: rms}.

        Muon: scale * O; Adam: m_hat / (sqrt(v_hat) + eps). Collective in a multi-process run (call on all ranks).
        """
        names = [g.get("name", f"group{i}") for i, g in enumerate(self.param_groups)]
        device = next((s.device for s, _ in self._rms_sums.values()), torch.device("cpu"))
        sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
        for gi, (sumsq, numel) in self._rms_sums.items():
            sums[gi, 0] = sumsq.double()
            sums[gi, 1] = numel
        if distributed():
            dist.all_reduce(sums)
        out: dict[str, list[float]] = {}
        for name, (s, n) in zip(names, sums.tolist()):
            if n > 0:
                total = out.setdefault(name, [0.0, 0.0])
                total[0] += s
                total[1] += n
        return {name: math.sqrt(s / n) for name, (s, n) in out.items()}


def _describe(group: dict, gi: int, index: int, p: torch.Tensor, layout: Layout) -> tuple:
    """What decides the exchange of one matrix, compared across ranks before the first collective."""
    return (f"group {group.get('name', gi)!r} parameter {index}", tuple(p.shape), str(p.grad.dtype), group["ns_dtype"], group["ns_chunks"],
            group["ns_steps"], group["ns_method"], layout.kind, layout.rows)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in NS_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"ns_dtype {dtype} is not supported; choose one of {list(NS_DTYPES)}")


def _validate_group(g: dict, where: str) -> None:
    """Raise ValueError naming the bad hyperparameter of a (merged) group."""

    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"{where}: {key}={g[key]!r} is invalid; {rule}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not (isinstance(g["lr"], (float, int, torch.Tensor)) and float(g["lr"]) >= 0):
        raise bad("lr", "expected a number >= 0")
    if not (isinstance(g["weight_decay"], (float, int)) and g["weight_decay"] >= 0):
        raise bad("weight_decay", "expected a number >= 0")
    if not (isinstance(g["momentum"], (float, int)) and 0 <= g["momentum"] < 1):
        raise bad("momentum", "expected 0 <= momentum < 1")
    if not isinstance(g["nesterov"], bool):
        raise bad("nesterov", "expected true or false")
    if not (is_int(g["ns_steps"]) and g["ns_steps"] >= 1):
        raise bad("ns_steps", "expected an integer >= 1")
    if not (is_int(g["ns_chunks"]) and g["ns_chunks"] >= 1):
        raise bad("ns_chunks", "expected an integer >= 1 (row blocks orthogonalised apart)")
    if g["scaling"] not in SCALINGS:
        raise bad("scaling", f"choose one of {SCALINGS}")
    ns_dtype = g["ns_dtype"]
    if not (ns_dtype in NS_DTYPES or (isinstance(ns_dtype, torch.dtype) and ns_dtype in NS_DTYPES.values())):
        raise bad("ns_dtype", f"choose one of {list(NS_DTYPES)}")
    betas = g["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)):
        raise bad("betas", "expected two numbers in [0, 1), e.g. [0.9, 0.95]")
    if g["ns_method"] not in ("auto", *NS_METHODS):
        raise bad("ns_method", f"choose one of {('auto', *NS_METHODS)}")
    if not (isinstance(g["eps"], (float, int)) and g["eps"] > 0):
        raise bad("eps", "expected a number > 0")


# -- builders for the config registry ---------------------------------------------------------------


@dataclass
class MuonSettings:
    """YAML `optimizer: {name: muon, ...}` keys; defaults are the recipe's (README, Muon)."""

    lr: float = 1e-4  # Muon group
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    scaling: str = "moonlight"
    ns_dtype: str = "auto"  # bf16 on accelerators, fp32 on CPU
    ns_method: str = "auto"  # Gram form where cheaper in fp32, else the plain iteration
    weight_decay: float = 0.0  # decoupled, both groups unless adam_weight_decay is set
    adam_lr: float | None = None  # None: same as lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    adam_weight_decay: float | None = None
    grouping: str = "recipe"  # "recipe": adaLN modulation in Muon; "modulation_adam": in Adam
    ns_chunks: dict[str, int] = field(default_factory=dict)  # e.g. {"*.qkv.weight": 3}: q, k, v apart
    muon_params: list[str] = field(default_factory=list)  # name patterns forced to Muon
    adam_params: list[str] = field(default_factory=list)  # name patterns forced to Adam
    blocks_name: str = "blocks"


@dataclass
class AdamWSettings:
    """YAML `optimizer: {name: adamw, ...}` keys; defaults are the recipe's Adam group."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


def _settings(cls, name: str, settings: dict):
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"optimizer {name!r}: unknown setting(s) {unknown}; valid settings are {valid}")
    return cls(**settings)


def build_muon(model: nn.Module, **settings: Any) -> Muon:
    """Muon for the 2D matrices in `model`'s blocks, Adam for the rest (registry name `muon`)."""
    s: MuonSettings = _settings(MuonSettings, "muon", settings)
    if s.grouping not in GROUPINGS:
        raise ValueError(f"optimizer 'muon': grouping={s.grouping!r}; choose one of {GROUPINGS}")
    groups = muon_param_groups(
        model,
        muon_params=list(s.muon_params),
        adam_params=list(s.adam_params),
        blocks_name=s.blocks_name,
        grouping=s.grouping,
        ns_chunks=dict(s.ns_chunks),
        muon_settings=dict(lr=s.lr, weight_decay=s.weight_decay),
        adam_settings=dict(
            lr=s.lr if s.adam_lr is None else s.adam_lr,
            weight_decay=s.weight_decay if s.adam_weight_decay is None else s.adam_weight_decay,
        ),
    )
    return Muon(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, ns_steps=s.ns_steps, scaling=s.scaling,
                ns_dtype=s.ns_dtype, ns_method=s.ns_method, weight_decay=s.weight_decay, betas=tuple(s.betas),
                eps=s.eps)


def build_adamw(model: nn.Module, **settings: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW over all trainable parameters (registry name `adamw`)."""
    s: AdamWSettings = _settings(AdamWSettings, "adamw", settings)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)


# -- logging callback --------------------------------------------------------------------------------


class UpdateRMSMonitor(Callback):
    """Composer callback: logs `optimizer/update_rms/<group name>` for every Muon optimizer each `interval` batches."""

    def __init__(self, interval: int = 1):
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"UpdateRMSMonitor interval={interval!r}; expected an integer >= 1")
        self.interval = interval

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) % self.interval:
            return
        for optimizer in state.optimizers:
            if isinstance(optimizer, Muon):
                logger.log_metrics({f"optimizer/update_rms/{k}": v for k, v in optimizer.update_rms().items()})
