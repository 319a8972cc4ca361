"""How Muon's matrices travel between ranks: each matrix is orthogonalised once, by one owner rank.

Matrices are processed in rounds of up to `world` same-shape matrices, one per owner (dion-style), so a
rank holds at most two whole matrices at a time and the next round's exchange overlaps this round's
Newton-Schulz:

    FSDP2 (row shards, DTensor Shard(0)):
      round k:  U_j[rows_r] --all_to_all--> owner(j): cat rows -> U_j [m, n] -> NS -> O_j --all_to_all--> O_j[rows_r]
    DDP (every rank holds U_j whole):
      round k:  owner(j): NS(U_j) -> O_j --all_gather--> every rank

Row counts need not be equal (FSDP2 chunks rows like torch.chunk; a rank may hold none). Before the first
collective of a step every rank checks that all ranks planned the same exchange (check_same_plan), so a
rank-local problem fails on every rank with one message instead of leaving peers inside a collective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Layout:
    """How a matrix is spread over processes: `local` (one process), `replicated` or `sharded` rows."""

    kind: str
    group: Any = None  # torch.distributed ProcessGroup for replicated / sharded
    rows: tuple[int, ...] = ()  # rows held by each group rank (sharded only)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores (a DTensor's local shard, or the tensor itself); shares storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_rows(m: int, world: int) -> tuple[int, ...]:
    """Rows per rank when m rows are split like torch.chunk (what DTensor Shard(0) does)."""
    per = -(-m // world) if world else m
    return tuple(max(0, min(per, m - r * per)) for r in range(world))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def layout_of(p: torch.Tensor) -> Layout:
    if isinstance(p, DTensor):
        shard_dims = [(i, pl) for i, pl in enumerate(p.placements) if pl.is_shard()]
        if not shard_dims:
            return Layout("local")  # replicated DTensor: every rank computes the same update
        if len(shard_dims) > 1 or shard_dims[0][1].dim != 0:
            raise ValueError(
                f"Muon supports DTensor parameters row-sharded on one mesh dimension (FSDP2's Shard(0)); "
                f"got placements {p.placements} for shape {tuple(p.shape)}. Use FSDP2/HSDP without tensor parallelism "
                "for Muon matrices, or put them in an Adam group."
            )
        mesh_dim = shard_dims[0][0]
        mesh = p.device_mesh
        rows = chunk_rows(p.shape[0], mesh.size(mesh_dim))
        my_rows = local(p).shape[0]
        if rows[mesh.get_local_rank(mesh_dim)] != my_rows:
            raise ValueError(
                f"unexpected row shard: parameter of shape {tuple(p.shape)} holds {my_rows} rows on mesh rank "
                f"{mesh.get_local_rank(mesh_dim)}, expected torch.chunk rows {rows}"
            )
        return Layout("sharded", mesh.get_group(mesh_dim), rows)
    if distributed():
        return Layout("replicated", dist.group.WORLD)
    return Layout("local")


def plan_rounds(keys: Sequence[Hashable], flops: Sequence[int], world: int) -> list[list[tuple[int, int]]]:
    """Rounds of up to `world` same-key matrices as [(matrix index, owner rank)], the same on every rank.

    Each round gives its matrices to the least-loaded ranks (Newton-Schulz FLOPs so far), so per-rank work
    is total / world up to one matrix.
    """
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    load = [0] * world
    rounds = []
    for idx in by_key.values():
        for start in range(0, len(idx), world):
            members = idx[start : start + world]
            owners = sorted(range(world), key=lambda r: (load[r], r))[: len(members)]
            for i, owner in zip(members, owners):
                load[owner] += flops[i]
            rounds.append(sorted(zip(members, owners), key=lambda pair: pair[1]))
    return rounds


def check_same_plan(plan: Sequence[Hashable], failure: str | None, device: torch.device) -> None:
    """Collective over all ranks: raise the same ValueError everywhere unless every rank planned `plan`.

    `plan` describes what decides the collectives (which matrices have gradients, shapes, dtypes, rows);
    `failure` is a rank-local error found while planning, raised on every rank.
    """
    world = dist.get_world_size()
    digest = int.from_bytes(hashlib.sha256(repr((list(plan), failure)).encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    digests = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(digests, mine)
    if failure is None and all(torch.equal(d, mine) for d in digests):
        return
    plans: list[Any] = [None] * world
    dist.all_gather_object(plans, (list(plan), failure))
    failures = [(r, f) for r, (_, f) in enumerate(plans) if f is not None]
    if failures:
        raise ValueError("Muon step failed on " + "; ".join(f"rank {r}: {f}" for r, f in failures))
    first = plans[0][0]
    for r, (other, _) in enumerate(plans):
        if other != first:
            only0 = [e for e in first if e not in other] or "nothing"
            only_r = [e for e in other if e not in first] or "nothing"
            raise ValueError(
                f"Muon step: ranks disagree on the matrices to exchange: only rank 0 has {only0}; only rank {r} has "
                f"{only_r}. Every rank must step with gradients for the same Muon parameters, of the same shapes "
                "and dtypes."
            )


Orthogonalize = Callable[[Any, torch.Tensor], torch.Tensor]  # (job, whole update [m, n]) -> whole result [m, n]
Apply = Callable[[Any, torch.Tensor], None]  # (job, this rank's rows of the result) -> None


def exchange_sharded(jobs: Sequence[Any], pg, orthogonalize: Orthogonalize, apply: Apply) -> list:
    """Row-sharded jobs: apply(job, this rank's rows of its orthogonalised update); returns the jobs it owned.

    A job has `.local_update()` (this rank's rows [rows_r, n], made when its round starts), `.shape`,
    `.layout.rows`, `.round_key`, `.flops`, `.ns_dtype` and `.device`.
    """
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    rounds = plan_rounds([j.round_key for j in jobs], [j.flops for j in jobs], world)
    owned = []

    def gather(round_):  # my rows of each matrix of the round -> its owner
        owners = dict((o, i) for i, o in round_)
        rows, n = jobs[round_[0][0]].layout.rows, jobs[round_[0][0]].shape[1]
        send = torch.cat([jobs[owners[r]].local_update() for r in sorted(owners)])
        mine = owners.get(me)
        recv_splits = list(rows) if mine is not None else [0] * world
        recv = send.new_empty(sum(recv_splits), n)
        send_splits = [rows[me] if r in owners else 0 for r in range(world)]
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=True)
        return mine, recv, work

    def scatter(round_, mine, result):  # the owner's result rows -> each rank
        owners = dict((o, i) for i, o in round_)
        ref = jobs[round_[0][0]]
        rows, n = ref.layout.rows, ref.shape[1]
        empty = dict(dtype=ref.ns_dtype, device=ref.device)
        send = result.contiguous() if mine is not None else torch.empty(0, n, **empty)
        send_splits = list(rows) if mine is not None else [0] * world
        recv_splits = [rows[me] if r in owners else 0 for r in range(world)]
        recv = torch.empty(sum(recv_splits), n, **empty)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=True)
        return owners, recv, recv_splits, work

    def finish(back) -> None:
        owners, recv, splits, work = back
        work.wait()
        for r, piece in enumerate(recv.split(splits)):
            if r in owners:
                apply(jobs[owners[r]], piece)

    pending = gather(rounds[0]) if rounds else None
    backs = []
    for k in range(len(rounds)):
        mine, whole, work = pending
        work.wait()
        if k + 1 < len(rounds):
            pending = gather(rounds[k + 1])  # overlaps this round's Newton-Schulz
        result = None
        if mine is not None:
            result = orthogonalize(jobs[mine], whole)
            owned.append(jobs[mine])
        backs.append(scatter(rounds[k], mine, result))
        if len(backs) > 1:
            finish(backs.pop(0))  # at most two rounds' results in flight
    for back in backs:
        finish(back)
    return owned


def exchange_replicated(jobs: Sequence[Any], pg, orthogonalize: Orthogonalize, apply: Apply) -> list:
    """Whole-matrix jobs (DDP): owners orthogonalise, every rank applies every result; returns the jobs it owned."""
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    rounds = plan_rounds([j.round_key for j in jobs], [j.flops for j in jobs], world)
    owned = []
    in_flight = []

    def finish(flight) -> None:
        round_, received, work = flight
        work.wait()
        for i, owner in round_:
            apply(jobs[i], received[owner])

    for round_ in rounds:
        owners = dict((o, i) for i, o in round_)
        ref = jobs[round_[0][0]]
        mine = owners.get(me)
        if mine is not None:
            send = orthogonalize(jobs[mine], jobs[mine].local_update()).contiguous()
            owned.append(jobs[mine])
        else:  # a rank without a matrix in a partial round
            send = torch.zeros(ref.shape, dtype=ref.ns_dtype, device=ref.device)
        received = [torch.empty_like(send) for _ in range(world)]
        in_flight.append((round_, received, dist.all_gather(received, send, group=pg, async_op=True)))
        if len(in_flight) > 1:
            finish(in_flight.pop(0))
    for flight in in_flight:
        finish(flight)
    return owned
