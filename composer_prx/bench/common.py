"""Shared pieces of the benchmarks: the reference geometry, a fixed batch, medians, matmul peak, result rows."""

from __future__ import annotations

import operator
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel

# The foundation issue's reference geometry (PRX measured 4.2 s / step here at ~63% of matmul peak).
REFERENCE = dict(patch_size=16, hidden_dim=384, depth=12, num_heads=6, mlp_ratio=3.5, text_dim=2304)
REFERENCE_RESOLUTION = 256
REFERENCE_TEXT_TOKENS = 256
REFERENCE_BATCH = 8


def reference_model(seed: int = 0, **overrides) -> PRXModel:
    """PRXModel around the reference PixelDiT, fed precomputed text embeddings (no encoder)."""
    torch.manual_seed(seed)
    return PRXModel(PixelDiT(DiTConfig(**(REFERENCE | overrides))), None, caption_dropout=0.0)


def reference_batch(batch: int = REFERENCE_BATCH, resolution: int = REFERENCE_RESOLUTION,
                    text_tokens: int = REFERENCE_TEXT_TOKENS, text_dim: int = 2304, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1,
        "text_emb": torch.randn(batch, text_tokens, text_dim, generator=gen),
        "text_mask": torch.ones(batch, text_tokens, dtype=torch.bool),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def synchronize() -> None:
    """Wait for queued accelerator work (a no-op on CPU), so wall-clock times cover the work itself."""
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def timed(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a plain size x size matmul in this process."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def composer_launch(world: int, *args: str) -> list[str]:
    """The command `composer -n world --master_port <free> *args` (launcher options first, then the target)."""
    return [sys.executable, "-m", "composer.cli.launcher", "-n", str(world), "--master_port", str(free_port()),
            *args]


def alternate(step: Callable[[bool], None], rounds: int, clocks: tuple[dict[bool, list[float]], ...]) -> None:
    """Warm up step(False) and step(True), forget their times in `clocks`, then `rounds` pairs in ABBA order."""
    step(False)
    step(True)
    for clock in clocks:
        clock[False].clear()
        clock[True].clear()
    for i in range(rounds):
        for flag in (False, True) if i % 2 == 0 else (True, False):
            step(flag)


def bare_step(model: PRXModel, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One training step without Composer: forward, flow loss, backward, optimizer step."""
    loss = model.loss(model(batch), batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Row:
    """One measured quantity of a bench beside its goal: it passes when `value op bound` holds."""

    bench: str
    name: str
    value: float | None  # None: not measured this run (`note` says why)
    op: str  # "<=", ">=", "<" or ">"
    bound: float
    note: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"Row {self.name!r}: op must be one of {sorted(_OPS)}, got {self.op!r}")

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else _OPS[self.op](self.value, self.bound)

    @property
    def goal(self) -> str:
        return f"{self.op} {self.bound:g}"


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def rows_table(rows: list[Row]) -> str:
    """Rows -> one markdown table: bench, quantity, measured, goal, pass."""
    lines = ["| bench | quantity | measured | goal | pass |", "| --- | --- | ---: | --- | --- |"]
    for row in rows:
        value = "n/a" if row.value is None else f"{row.value:.3f}"
        verdict = {True: "yes", False: "**no**", None: "not measured"}[row.passed]
        note = f" ({row.note})" if row.note else ""
        lines.append(f"| `{row.bench}` | {row.name}{note} | {value} | {row.goal} | {verdict} |")
    return "\n".join(lines)
