"""Muon for the transformer's 2D matrices, Adam for everything else, in one optimizer (FSDP2-aware).

Muon (Keller Jordan, modded-nanogpt) per matrix W [m, n] with gradient G:

    B <- mu * B + (1 - mu) * G                       momentum buffer (EMA form)
    U <- (1 - mu) * G + mu * B     (Nesterov)    or  U <- B
    O <- NewtonSchulz5(U / ||U||_F)                  ~ the orthogonal factor of U's polar decomposition
    W <- W * (1 - lr * wd) - lr * scale(m, n) * O    decoupled weight decay

Under FSDP2 each rank holds a row shard (DTensor Shard(0)) of W. Newton-Schulz needs the whole matrix, so
every matrix gets one owner rank (greedy balance of Newton-Schulz FLOPs); one all-to-all brings the
momentum shards to the owners, the owners orthogonalise (same-shape matrices batched), and a second
all-to-all returns each rank its rows:

    rank r:  U[rows_r] --all_to_all--> owner: cat rows -> U [m, n] -> NS -> O [m, n] --all_to_all--> O[rows_r]

Row counts need not be equal (FSDP2 chunks rows like torch.chunk; a rank may hold none). Plain
(non-DTensor) parameters in a multi-process run are treated as DDP replicas: owners orthogonalise and
the results are all-gathered. Optimizer state is created at the first step, so Composer may rebuild the
parameter groups after sharding the model.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from composer.core import Callback
from torch import nn
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic p(x) = a x + b x^3 + c x^5
SCALINGS = ("moonlight", "keller", "none")
NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORTHOGONALIZE_ON = ("owner", "everywhere")

_COMMON_KEYS = {"params", "use_muon", "name", "lr", "weight_decay"}
_MUON_KEYS = {"momentum", "nesterov", "ns_steps", "scaling", "ns_dtype", "ns_method"}
_ADAM_KEYS = {"betas", "eps"}
GROUP_KEYS = frozenset(_COMMON_KEYS | _MUON_KEYS | _ADAM_KEYS)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7, method: str = "auto"
) -> torch.Tensor:
    """Approximate orthogonal factor of g by the quintic Newton-Schulz iteration.

    X0 = G / (||G||_F + eps) in the wide orientation (rows r <= cols s), then `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315).
    method "iterate" runs exactly that; "gram" runs the same iteration on the r x r Gram matrix
    (X_k = Q_k X0, Q_{k+1} = P_k Q_k, A_{k+1} = P_k A_k P_k with P_k = a I + b A_k + c A_k^2) and multiplies
    X0 once at the end -- equal in exact arithmetic, fewer FLOPs when s >> r. "auto" picks the cheaper one,
    "gram" only in fp32/fp64 (low-precision Gram iterations drift).
    g: [..., m, n] (leading dims are a batch of same-shape matrices) -> [..., m, n] in `dtype`.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices [..., m, n]; got shape {tuple(g.shape)}")
    if method == "auto":
        method = _ns_method(g.size(-2), g.size(-1), steps, dtype)
    if method not in NS_METHODS:
        raise ValueError(f"newton_schulz method={method!r}; choose one of {NS_METHODS} or 'auto'")
    a, b, c = NS_COEFFS
    tall = g.size(-2) > g.size(-1)
    x = g.to(dtype)
    if tall:
        x = x.mT
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, x.size(-2), x.size(-1))  # [K, r, s], r <= s
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    if method == "iterate":
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)  # A = X X^T  [K, r, r]
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
            x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    else:
        gram = torch.bmm(x, x.mT)  # A_0  [K, r, r]
        q = None
        for k in range(steps):
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P_k = a I + b A_k + c A_k^2
            q = poly if q is None else torch.bmm(poly, q)  # Q_{k+1} = P_k Q_k
            if k < steps - 1:
                gram = torch.bmm(poly, torch.bmm(gram, poly))  # A_{k+1} = P_k A_k P_k
        x = torch.bmm(q, x)  # X_steps = Q_steps X_0
    x = x.reshape(*batch_shape, x.size(-2), x.size(-1))
    return x.mT if tall else x


NS_METHODS = ("iterate", "gram")


def newton_schulz_flops(m: int, n: int, steps: int = 5, method: str = "iterate") -> int:
    """FLOPs (2 per multiply-add) of newton_schulz on one [m, n] matrix, r = min(m, n), s = max(m, n).

    iterate: steps * (4 r^2 s + 2 r^3); gram: 4 r^2 s + (8 steps - 6) r^3.
    """
    r, s = min(m, n), max(m, n)
    if method == "iterate":
        return steps * (4 * r * r * s + 2 * r**3)
    if method == "gram":
        return 4 * r * r * s + (8 * steps - 6) * r**3
    raise ValueError(f"newton_schulz_flops method={method!r}; choose one of {NS_METHODS}")


def _ns_method(m: int, n: int, steps: int, dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float64):
        return "iterate"
    return min(NS_METHODS, key=lambda method: newton_schulz_flops(m, n, steps, method))


def update_scale(rule: str, m: int, n: int) -> float:
    """Multiplier on the orthogonalised update of an [m, n] (out, in) matrix.

    moonlight: 0.2 * sqrt(max(m, n)) (update RMS 0.2, matching a typical Adam step);
    keller: sqrt(max(1, m / n)); none: 1.
    """
    if rule == "moonlight":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "keller":
        return math.sqrt(max(1.0, m / n))
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown Muon scaling {rule!r}; choose one of {SCALINGS}")


def _resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 on accelerators; fp32 on CPU, where bf16 matmul is usually slow
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return NS_DTYPES[name]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores (a DTensor's local shard, or the tensor itself); shares storage."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class _Layout:
    """How a matrix is spread over processes: `local` (one process), `replicated` or `sharded` rows."""

    kind: str
    group: Any = None  # torch.distributed ProcessGroup for replicated / sharded
    rows: tuple[int, ...] = ()  # rows held by each group rank (sharded only)


def _chunk_rows(m: int, world: int) -> tuple[int, ...]:
    """Rows per rank when m rows are split like torch.chunk (what DTensor Shard(0) does)."""
    per = -(-m // world) if world else m
    return tuple(max(0, min(per, m - r * per)) for r in range(world))


def _layout_of(p: torch.Tensor) -> _Layout:
    if isinstance(p, DTensor):
        shard_dims = [(i, pl) for i, pl in enumerate(p.placements) if pl.is_shard()]
        if not shard_dims:
            return _Layout("local")  # replicated DTensor: every rank computes the same update
        if len(shard_dims) > 1 or shard_dims[0][1].dim != 0:
            raise ValueError(
                f"Muon supports DTensor parameters row-sharded on one mesh dimension (FSDP2's Shard(0)); "
                f"got placements {p.placements} for shape {tuple(p.shape)}. Use FSDP2/HSDP without tensor parallelism "
                "for Muon matrices, or put them in an Adam group."
            )
        mesh_dim = shard_dims[0][0]
        mesh = p.device_mesh
        world = mesh.size(mesh_dim)
        rows = _chunk_rows(p.shape[0], world)
        my_rows = _local(p).shape[0]
        if rows[mesh.get_local_rank(mesh_dim)] != my_rows:
            raise ValueError(
                f"unexpected row shard: parameter of shape {tuple(p.shape)} holds {my_rows} rows on mesh rank "
                f"{mesh.get_local_rank(mesh_dim)}, expected torch.chunk rows {rows}"
            )
        return _Layout("sharded", mesh.get_group(mesh_dim), rows)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _Layout("replicated", dist.group.WORLD)
    return _Layout("local")


@dataclass
class _Job:
    """One Muon matrix this step: its local momentum-update shard and, once computed, its local result."""

    param: torch.Tensor
    group: dict
    update: torch.Tensor  # local rows (sharded) or whole matrix, in the NS dtype
    shape: tuple[int, int]
    ns_dtype: torch.dtype
    layout: _Layout
    group_index: int
    result: torch.Tensor | None = None  # orthogonalised rows for this rank, NS dtype
    method: str = field(init=False)  # "iterate" or "gram"
    flops: int = field(init=False)

    def __post_init__(self) -> None:
        steps, method = self.group["ns_steps"], self.group["ns_method"]
        if method == "auto":
            method = _ns_method(*self.shape, steps, self.ns_dtype)
        self.method = method
        self.flops = newton_schulz_flops(*self.shape, steps, method)

    def shard_nbytes(self, rank: int) -> int:
        """Bytes of the rows group rank `rank` holds (sharded layout), in the NS dtype."""
        return self.layout.rows[rank] * self.shape[1] * self.update.element_size()

    def rows_of(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """The rows of a whole [m, n] matrix that group rank `rank` holds."""
        start = sum(self.layout.rows[:rank])
        return full[start : start + self.layout.rows[rank]]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return buf.view(dtype).reshape(shape)


def _assign_owners(jobs: Sequence[_Job], world: int) -> list[int]:
    """Greedy longest-first balance of Newton-Schulz FLOPs over `world` ranks (same answer on every rank)."""
    load = [0] * world
    owners = [0] * len(jobs)
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].flops, i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += jobs[i].flops
    return owners


def _orthogonalize_batched(mats: Sequence[torch.Tensor], jobs: Sequence[_Job]) -> list[torch.Tensor]:
    """Newton-Schulz on each full matrix, stacking same-(shape, dtype, steps) matrices into one batched call."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    buckets: dict[tuple, list[int]] = {}
    for i, (mat, job) in enumerate(zip(mats, jobs)):
        buckets.setdefault((tuple(mat.shape), job.ns_dtype, job.group["ns_steps"], job.method), []).append(i)
    for (_, dtype, steps, method), idx in buckets.items():
        stacked = torch.stack([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]].unsqueeze(0)
        orth = newton_schulz(stacked, steps=steps, dtype=dtype, method=method)
        for k, i in enumerate(idx):
            out[i] = orth[k]
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon=True` (2D matrices only), AdamW on groups with `use_muon=False`.

    Every group must say `use_muon`. Muon keys: lr, momentum, nesterov, ns_steps, scaling
    ("moonlight" | "keller" | "none"), ns_dtype ("auto": bf16 on accelerators, fp32 on CPU | "float32" |
    "bfloat16" | "float16"), ns_method ("auto" | "iterate" | "gram", see newton_schulz), weight_decay.
    Adam keys: lr, betas, eps, weight_decay. Any group may carry a `name` (used in logs).
    Weight decay is decoupled (W <- W (1 - lr wd)) in both kinds of group.

    orthogonalize_on: "owner" (each matrix by one rank, default) or "everywhere" (every rank gathers
    and orthogonalises every matrix; kept as a baseline for the benchmark).
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
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        orthogonalize_on: str = "owner",
    ):
        if orthogonalize_on not in ORTHOGONALIZE_ON:
            raise ValueError(f"orthogonalize_on={orthogonalize_on!r}; choose one of {ORTHOGONALIZE_ON}")
        self.orthogonalize_on = orthogonalize_on
        self.ns_flops = 0  # Newton-Schulz FLOPs this rank ran in the last step
        self.ns_matrices = 0  # matrices this rank orthogonalised in the last step
        self._rms_sums: dict[int, tuple[torch.Tensor, int]] = {}
        if isinstance(ns_dtype, torch.dtype):
            ns_dtype = _dtype_name(ns_dtype)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            scaling=scaling,
            ns_dtype=ns_dtype,
            ns_method=ns_method,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
        )
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
        unknown = sorted(set(param_group) - GROUP_KEYS)
        if unknown:
            raise ValueError(f"unknown Muon param-group key(s) {unknown}; valid keys are {sorted(GROUP_KEYS)}")
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
        jobs: list[_Job] = []
        for gi, group in enumerate(self.param_groups):
            if group["use_muon"]:
                jobs.extend(self._momentum(gi, group))
            else:
                self._adam(gi, group)
        by_comm: dict[tuple, list[_Job]] = {}
        for job in jobs:
            by_comm.setdefault((job.layout.kind, job.layout.group), []).append(job)
        for (kind, _), comm_jobs in by_comm.items():
            if kind == "local" or (kind == "replicated" and self.orthogonalize_on == "everywhere"):
                self._orthogonalize_local(comm_jobs)
            elif kind == "replicated":
                self._orthogonalize_replicated(comm_jobs)
            elif self.orthogonalize_on == "owner":
                self._orthogonalize_sharded(comm_jobs)
            else:
                self._orthogonalize_gather_everywhere(comm_jobs)
        for job in jobs:
            self._apply_muon(job)
        return loss

    def _momentum(self, gi: int, group: dict) -> list[_Job]:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [_local(p.grad) for p in params]
        bufs = [_local(self.state[p]["momentum_buffer"]) for p in params]
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)  # B <- mu B + (1 - mu) G
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs  # (1 - mu) G + mu B
        jobs = []
        for p, u in zip(params, updates):
            dtype = _resolve_ns_dtype(group["ns_dtype"], u.device)
            jobs.append(_Job(p, group, u.to(dtype), (p.shape[0], p.shape[1]), dtype, _layout_of(p), gi))
        return jobs

    def _orthogonalize_local(self, jobs: list[_Job]) -> None:
        for job, orth in zip(jobs, _orthogonalize_batched([j.update for j in jobs], jobs)):
            job.result = orth
        self._count(jobs)

    def _orthogonalize_replicated(self, jobs: list[_Job]) -> None:
        """Every rank holds whole matrices (DDP): owners orthogonalise, results are all-gathered."""
        pg = jobs[0].layout.group
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        owners = _assign_owners(jobs, world)
        mine = [j for j, o in zip(jobs, owners) if o == me]
        for job, orth in zip(mine, _orthogonalize_batched([j.update for j in mine], mine)):
            job.result = orth
        self._count(mine)
        nbytes = [sum(_nbytes(j) for j, o in zip(jobs, owners) if o == r) for r in range(world)]
        gathered = _all_gather_bytes([_as_bytes(j.result) for j in mine], nbytes, pg, jobs[0].update.device)
        offsets = [0] * world
        for job, owner in zip(jobs, owners):
            n = _nbytes(job)
            if owner != me:
                job.result = _from_bytes(gathered[owner][offsets[owner] : offsets[owner] + n], job.ns_dtype, job.shape)
            offsets[owner] += n

    def _orthogonalize_sharded(self, jobs: list[_Job]) -> None:
        """Row shards -> owner (all-to-all), Newton-Schulz once per matrix, rows -> back (all-to-all)."""
        pg = jobs[0].layout.group
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        owners = _assign_owners(jobs, world)
        device = jobs[0].update.device
        owned = [i for i, o in enumerate(owners) if o == me]
        # 1. my rows of every matrix -> its owner; I receive every rank's rows of the matrices I own
        send_parts = [[] for _ in range(world)]
        for i, o in enumerate(owners):
            send_parts[o].append(_as_bytes(jobs[i].update))
        send_splits = [sum(p.numel() for p in parts) for parts in send_parts]
        recv_splits = [sum(jobs[i].shard_nbytes(s) for i in owned) for s in range(world)]
        recv = _all_to_all_bytes([t for parts in send_parts for t in parts], send_splits, recv_splits, pg, device)
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in owned}
        offset = 0
        for s in range(world):
            for i in owned:
                n = jobs[i].shard_nbytes(s)
                rows = jobs[i].layout.rows[s]
                pieces[i].append(_from_bytes(recv[offset : offset + n], jobs[i].ns_dtype, (rows, jobs[i].shape[1])))
                offset += n
        full = [torch.cat(pieces[i]) for i in owned]  # [m, n] each
        orth = _orthogonalize_batched(full, [jobs[i] for i in owned])
        self._count([jobs[i] for i in owned])
        # 2. owner sends each rank its rows of the result
        back_parts = []
        back_splits = []
        for s in range(world):
            total = 0
            for k, i in enumerate(owned):
                part = _as_bytes(jobs[i].rows_of(orth[k], s))
                back_parts.append(part)
                total += part.numel()
            back_splits.append(total)
        recv_back_splits = [sum(jobs[i].shard_nbytes(me) for i, o in enumerate(owners) if o == s) for s in range(world)]
        back = _all_to_all_bytes(back_parts, back_splits, recv_back_splits, pg, device)
        offset = 0
        for s in range(world):
            for i, o in enumerate(owners):
                if o != s:
                    continue
                n = jobs[i].shard_nbytes(me)
                jobs[i].result = _from_bytes(back[offset : offset + n], jobs[i].ns_dtype, jobs[i].update.shape)
                offset += n

    def _orthogonalize_gather_everywhere(self, jobs: list[_Job]) -> None:
        """Baseline: every rank all-gathers every matrix and orthogonalises all of them (world-size x the work)."""
        pg = jobs[0].layout.group
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        sizes = [sum(j.shard_nbytes(r) for j in jobs) for r in range(world)]
        gathered = _all_gather_bytes([_as_bytes(j.update) for j in jobs], sizes, pg, jobs[0].update.device)
        offsets = [0] * world
        full = []
        for j in jobs:
            rows = []
            for r in range(world):
                n = j.shard_nbytes(r)
                rows.append(
                    _from_bytes(gathered[r][offsets[r] : offsets[r] + n], j.ns_dtype, (j.layout.rows[r], j.shape[1]))
                )
                offsets[r] += n
            full.append(torch.cat(rows))
        for j, orth in zip(jobs, _orthogonalize_batched(full, jobs)):
            j.result = j.rows_of(orth, me)
        self._count(jobs)

    def _count(self, jobs: Sequence[_Job]) -> None:
        self.ns_flops += sum(j.flops for j in jobs)
        self.ns_matrices += len(jobs)

    def _apply_muon(self, job: _Job) -> None:
        group = job.group
        lr, wd = float(group["lr"]), group["weight_decay"]
        scale = update_scale(group["scaling"], *job.shape)
        p = _local(job.param)
        if wd:
            p.mul_(1.0 - lr * wd)
        step = job.result.to(p.dtype)
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
        local_params = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        exp_avgs = [_local(self.state[p]["exp_avg"]) for p in params]
        exp_avg_sqs = [_local(self.state[p]["exp_avg_sq"]) for p in params]
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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return {name: math.sqrt(s / n) for name, (s, n) in zip(names, sums.tolist()) if n > 0}


def _all_to_all_bytes(
    parts: list[torch.Tensor], send_splits: list[int], recv_splits: list[int], pg, device: torch.device
) -> torch.Tensor:
    send = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=pg)
    return recv


def _all_gather_bytes(parts: list[torch.Tensor], sizes: list[int], pg, device: torch.device) -> list[torch.Tensor]:
    """All-gather byte buffers of unequal sizes (rank r sends sizes[r] bytes): padded to the largest."""
    send = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    if parts:
        packed = torch.cat(parts)
        send[: packed.numel()] = packed
    gathered = [torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(gathered, send, group=pg)
    return [buf[:size] for buf, size in zip(gathered, sizes)]


def _nbytes(job: _Job) -> int:
    return job.update.numel() * job.update.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in NS_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"ns_dtype {dtype} is not supported; choose one of {list(NS_DTYPES)}")


def _validate_group(g: dict, where: str) -> None:
    """Raise ValueError naming the bad hyperparameter of a (merged) group."""

    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"{where}: {key}={g[key]!r} is invalid; {rule}")

    if not (isinstance(g["lr"], (float, int, torch.Tensor)) and float(g["lr"]) >= 0):
        raise bad("lr", "expected a number >= 0")
    if not (isinstance(g["weight_decay"], (float, int)) and g["weight_decay"] >= 0):
        raise bad("weight_decay", "expected a number >= 0")
    if not (isinstance(g["momentum"], (float, int)) and 0 <= g["momentum"] < 1):
        raise bad("momentum", "expected 0 <= momentum < 1")
    if not isinstance(g["nesterov"], bool):
        raise bad("nesterov", "expected true or false")
    if not (isinstance(g["ns_steps"], int) and not isinstance(g["ns_steps"], bool) and g["ns_steps"] >= 1):
        raise bad("ns_steps", "expected an integer >= 1")
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


# -- parameter grouping ------------------------------------------------------------------------------


def _match_any(name: str, patterns: Sequence[str]) -> str | None:
    return next((pat for pat in patterns if fnmatch.fnmatchcase(name, pat)), None)


# Adam by default although 2D and inside the blocks: the REPA projector, and the adaLN modulation,
# which maps the per-image conditioning (timestep embedding) to scales/shifts/gates -- the same input
# path as the embedding MLP, not a hidden-to-hidden layer. `muon_params=["*.modulation.weight"]` puts
# it back into Muon (+27% Newton-Schulz FLOPs in the reference geometry).
DEFAULT_ADAM_PATTERNS = ("*repa*", "*modulation*")


def muon_param_groups(
    model: nn.Module,
    *,
    muon_params: Sequence[str] = (),
    adam_params: Sequence[str] = (),
    blocks_name: str = "blocks",
    muon_settings: dict | None = None,
    adam_settings: dict | None = None,
) -> list[dict]:
    """Split a model's trainable parameters into a Muon group and an Adam group.

    Default: 2D weights of modules inside any nn.ModuleList/Sequential named `blocks_name` go to Muon,
    except embeddings and names matching "*repa*" or "*modulation*" (adaLN, see DEFAULT_ADAM_PATTERNS); everything else (biases, norms, embeddings, input and
    final projections, REPA projector) goes to Adam. `muon_params` / `adam_params` are fnmatch patterns
    on parameter names that override the default (adam_params wins over muon_params); a pattern that
    matches nothing is an error. Returns [{"params", "use_muon": True, "name": "muon", **muon_settings},
    {"params", "use_muon": False, "name": "adam", **adam_settings}], leaving out an empty group.
    """
    if isinstance(muon_params, str) or isinstance(adam_params, str):
        raise TypeError("muon_params / adam_params must be lists of name patterns, not one string")
    block_prefixes = [
        name + "."
        for name, module in model.named_modules()
        if name.split(".")[-1] == blocks_name and isinstance(module, (nn.ModuleList, nn.Sequential))
    ]
    embedding_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }
    used: set[str] = set()
    muon, adam = [], []
    muon_names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        forced_adam = _match_any(name, adam_params)
        forced_muon = _match_any(name, muon_params)
        if forced_adam is not None:
            used.add(forced_adam)
            adam.append(p)
            continue
        if forced_muon is not None:
            used.add(forced_muon)
            if p.ndim != 2:
                raise ValueError(
                    f"muon_params pattern {forced_muon!r} matched {name!r} of shape {tuple(p.shape)}; "
                    "Muon takes 2D matrices only -- narrow the pattern"
                )
            muon.append(p)
            muon_names.append(name)
            continue
        in_blocks = any(name.startswith(prefix) for prefix in block_prefixes)
        if (
            in_blocks
            and p.ndim == 2
            and id(p) not in embedding_params
            and _match_any(name, DEFAULT_ADAM_PATTERNS) is None
        ):
            muon.append(p)
            muon_names.append(name)
        else:
            adam.append(p)
    unused = [pat for pat in (*muon_params, *adam_params) if pat not in used]
    if unused:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ValueError(f"parameter pattern(s) {unused} matched no trainable parameter; names look like {names}")
    if not muon and not adam:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if not muon:
        log.warning("muon_param_groups: no parameter went to Muon (no 2D weights under a %r module list)", blocks_name)
    log.info("muon_param_groups: %d tensors to Muon, %d to Adam", len(muon), len(adam))
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True, "name": "muon", **(muon_settings or {})})
    if adam:
        groups.append({"params": adam, "use_muon": False, "name": "adam", **(adam_settings or {})})
    return groups


# -- builders for the config registry ---------------------------------------------------------------


@dataclass
class MuonSettings:
    """YAML `optimizer: {name: muon, ...}` keys; defaults are RECIPE.md's."""

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
    muon_params: list[str] = field(default_factory=list)  # name patterns forced to Muon
    adam_params: list[str] = field(default_factory=list)  # name patterns forced to Adam
    blocks_name: str = "blocks"
    orthogonalize_on: str = "owner"


@dataclass
class AdamWSettings:
    """YAML `optimizer: {name: adamw, ...}` keys; defaults are RECIPE.md's Adam group."""

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
    groups = muon_param_groups(
        model,
        muon_params=list(s.muon_params),
        adam_params=list(s.adam_params),
        blocks_name=s.blocks_name,
        muon_settings=dict(lr=s.lr, weight_decay=s.weight_decay),
        adam_settings=dict(
            lr=s.lr if s.adam_lr is None else s.adam_lr,
            weight_decay=s.weight_decay if s.adam_weight_decay is None else s.adam_weight_decay,
        ),
    )
    return Muon(
        groups,
        lr=s.lr,
        momentum=s.momentum,
        nesterov=s.nesterov,
        ns_steps=s.ns_steps,
        scaling=s.scaling,
        ns_dtype=s.ns_dtype,
        ns_method=s.ns_method,
        weight_decay=s.weight_decay,
        betas=tuple(s.betas),
        eps=s.eps,
        orthogonalize_on=s.orthogonalize_on,
    )


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
