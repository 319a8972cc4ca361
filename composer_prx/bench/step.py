"""python -m composer_prx.bench step -- PRXModel's training step through Composer's Trainer vs a bare loop.

Prints, from one process with interleaved rounds: median step time of each, their ratio (goal
<= 1.05), and the step's achieved matmul GFLOP/s as a fraction of a plain large matmul's (goal >= 70%;
Photoroom's PRX: 4.2 s per step, ~63%, on the same 2-core machine and geometry).

Beside them, in the same rounds, bare loops of: diffusers' PRXTransformer2DModel holding the same weights
(PRX's own denoiser, same architecture and FLOPs; goal: ours >= 1.3x faster), and with --compile our
model with its blocks compiled (`model.compile: true`, inductor).
"""

from __future__ import annotations

import argparse
import time

import torch
from composer import Callback, Trainer
from torch import nn

from composer_prx.bench.common import (REFERENCE, Row, bare_step, matmul_peak_gflops, median, reference_batch,
                                       reference_model, timed)
from composer_prx.model.pipeline import PRXModel

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


class _DiffusersDenoiser(nn.Module):
    """diffusers' PRXTransformer2DModel behind PixelDiT's call (x_t, t, text, text_mask) -> x_pred."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t, t, text, text_mask=None):
        return self.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=text,
                                attention_mask=text_mask).sample


def _prx_model() -> PRXModel | None:
    """PRXModel around diffusers' PRX denoiser with reference_model(0)'s weights; None without diffusers."""
    try:
        from composer_prx.export import to_diffusers
        transformer = to_diffusers(reference_model(seed=0).denoiser)
    except ImportError:
        return None
    return PRXModel(_DiffusersDenoiser(transformer), None, caption_dropout=0.0)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench step`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true",
                        help="also time our bare step with compiled blocks (inductor; the first step compiles)")
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
    bare = {"ours": reference_model(seed=0)}
    prx = _prx_model()
    if prx is not None:
        bare["prx"] = prx
    if args.compile:
        bare["compiled"] = reference_model(seed=0)
        bare["compiled"].denoiser.compile_blocks("inductor")
    bare_opts = {name: _adamw(model) for name, model in bare.items()}
    trainer.fit(duration="1ba")  # warm-up
    for name, model in bare.items():
        bare_step(model, bare_opts[name], batch)
    timer.times.clear()
    bare_times: dict[str, list[float]] = {name: [] for name in bare}
    peaks = []  # the plain matmul's rate, measured in every round (this machine's speed drifts)
    for _ in range(args.rounds):
        trainer.fit(duration=f"{args.steps}ba")
        for name, model in bare.items():
            for _ in range(args.steps):
                bare_times[name].append(timed(lambda: bare_step(model, bare_opts[name], batch)))
        peaks.append(matmul_peak_gflops())
    trainer.close()

    composer_s, bare_s = median(timer.times), median(bare_times["ours"])
    flops = composer_model.flops_per_batch(batch)
    peak = median(peaks)
    achieved = flops / composer_s / 1e9
    print(f"reference geometry {REFERENCE}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    print(f"{'path':<46}{'median step s':>14}{'matmul share':>14}")
    labels = {"ours": "bare PyTorch loop", "prx": "bare loop, PRX's denoiser (diffusers)",
              "compiled": "bare loop, compiled blocks (inductor)"}
    print(f"{'composer Trainer':<46}{composer_s:>14.3f}{achieved / peak:>14.1%}")
    for name in bare:
        step_s = median(bare_times[name])
        print(f"{labels[name]:<46}{step_s:>14.3f}{flops / step_s / 1e9 / peak:>14.1%}")
    print(f"trainer / bare ratio: {composer_s / bare_s:.3f}  (goal <= 1.05)")
    print(f"matmul FLOPs per step: {flops / 1e9:.1f} GFLOP; achieved {achieved:.1f} GFLOP/s; "
          f"plain matmul peak {peak:.1f} GFLOP/s (median of one per round: "
          f"{' '.join(f'{p:.0f}' for p in peaks)}) -> {achieved / peak:.1%} of peak (goal >= 70%; PRX ~63%, 4.2 s)")
    rows = [Row("step", "Composer Trainer / bare PyTorch step time", composer_s / bare_s, "<=", 1.05),
            Row("step", "step's matmul GFLOP/s / plain 2048² matmul's", achieved / peak, ">=", 0.70)]
    if prx is None:
        rows.append(Row("step", "PRX's denoiser (diffusers) bare step / ours", None, ">=", 1.3,
                        note="diffusers not installed (pip install -e .[diffusers])"))
    else:
        prx_s = median(bare_times["prx"])
        print(f"PRX's denoiser / ours (bare, same weights): {prx_s / bare_s:.3f}  (goal >= 1.3)")
        rows.append(Row("step", "PRX's denoiser (diffusers) bare step / ours", prx_s / bare_s, ">=", 1.3))
    if args.compile:
        compiled_s = median(bare_times["compiled"])
        print(f"compiled blocks / eager (bare): {compiled_s / bare_s:.3f}")
        rows.append(Row("step", "step's matmul GFLOP/s / plain 2048² matmul's, compiled blocks (bare)",
                        flops / compiled_s / 1e9 / peak, ">=", 0.70))
    return rows
