"""python -m composer_prx.bench step -- PRXModel's training step through Composer's Trainer vs a bare loop.

Prints, from one process with interleaved rounds: median step time of each, their ratio (goal
<= 1.05), and the step's achieved matmul GFLOP/s as a fraction of a plain large matmul's (goal >= 70%;
Photoroom's PRX: 4.2 s per step, ~63%, on the same 2-core machine and geometry).
"""

from __future__ import annotations

import argparse
import time

import torch
from composer import Callback, Trainer

from composer_prx.bench.common import (REFERENCE, Row, bare_step, matmul_peak_gflops, median, reference_batch,
                                       reference_model, timed)

QUICK_ARGS = ["--rounds", "1", "--steps", "1"]  # `bench all --quick`


class _StepTimer(Callback):
    """Wall time of each training batch (BATCH_START -> BATCH_END)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger):
        self._start = time.perf_counter()

    def batch_end(self, state, logger):
        self.times.append(time.perf_counter() - self._start)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench step`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and path")
    parser.add_argument("--batch", type=int, default=8)
    return parser


def main(argv: list[str]) -> list[Row]:
    args = arguments().parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    batch = reference_batch(args.batch)

    composer_model = reference_model(seed=0)
    timer = _StepTimer()
    total = args.rounds * args.steps + 1
    trainer = Trainer(model=composer_model, train_dataloader=[batch] * total, max_duration=f"{total}ba",
                      optimizers=_adamw(composer_model), callbacks=[timer], device="cpu", precision="fp32",
                      device_train_microbatch_size=args.batch,
                      progress_bar=False, log_to_console=False, seed=0)
    bare_model = reference_model(seed=0)
    bare_opt = _adamw(bare_model)
    trainer.fit(duration="1ba")  # warm-up
    bare_step(bare_model, bare_opt, batch)
    timer.times.clear()
    bare_times = []
    for _ in range(args.rounds):
        trainer.fit(duration=f"{args.steps}ba")
        for _ in range(args.steps):
            bare_times.append(timed(lambda: bare_step(bare_model, bare_opt, batch)))
    trainer.close()

    composer_s, bare_s = median(timer.times), median(bare_times)
    flops = composer_model.flops_per_batch(batch)
    peak = matmul_peak_gflops()
    achieved = flops / composer_s / 1e9
    print(f"reference geometry {REFERENCE}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    print(f"{'path':<22}{'median step s':>14}")
    print(f"{'composer Trainer':<22}{composer_s:>14.3f}")
    print(f"{'bare PyTorch loop':<22}{bare_s:>14.3f}")
    print(f"trainer / bare ratio: {composer_s / bare_s:.3f}  (goal <= 1.05)")
    print(f"matmul FLOPs per step: {flops / 1e9:.1f} GFLOP; achieved {achieved:.1f} GFLOP/s; "
          f"plain matmul peak {peak:.1f} GFLOP/s -> {achieved / peak:.1%} of peak (goal >= 70%; PRX ~63%, 4.2 s)")
    return [Row("step", "Composer Trainer / bare PyTorch step time", composer_s / bare_s, "<=", 1.05),
            Row("step", "step's matmul GFLOP/s / plain 2048² matmul's", achieved / peak, ">=", 0.70)]
