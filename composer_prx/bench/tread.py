"""python -m composer_prx.bench tread -- training step dense vs TREAD-routed, side by side.

Reference geometry (depth 12, 256 image + 256 text tokens, batch 8, fp32), one PRXModel and one AdamW;
rounds alternate dense and routed steps (route 1 -> 10, 50% of tokens skip). Prints the median step
times, the realised speedup, and the speedup the matmul-FLOP count predicts from the tokens each
block really saw (PRXModel.flops_per_batch), by wall clock and by process CPU time. PRX on this
machine: 2.66 s routed, 1.59x realised vs 1.54x predicted.

On a machine shared with other jobs use --threads 1: OpenMP threads spin-wait for descheduled
partners, so multi-thread wall (and CPU) times then mostly measure the other jobs; with one thread
the CPU time is the step's own work.
"""

from __future__ import annotations

import argparse
import time

import torch

from composer_prx.algorithms.tread import apply_tread
from composer_prx.bench.common import REFERENCE, Row, alternate, bare_step, median, reference_batch, reference_model

QUICK_ARGS = ["--rounds", "1"]  # `bench all --quick`


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench tread`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench tread")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved dense/routed pairs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--route-start", type=int, default=1)
    parser.add_argument("--route-end", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: keep the default); with 1, CPU time is a load-independent clock")
    return parser


def main(argv: list[str]) -> list[Row]:
    args = arguments().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = reference_batch(args.batch)
    model = reference_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    handle = apply_tread(model, args.route_start, args.route_end, args.ratio)
    model.train()

    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}

    def step(routed: bool) -> None:
        handle.enabled = routed
        wall_0, cpu_0 = time.perf_counter(), time.process_time()
        bare_step(model, optimizer, batch)
        wall[routed].append(time.perf_counter() - wall_0)
        cpu[routed].append(time.process_time() - cpu_0)

    alternate(step, args.rounds, (wall, cpu))

    handle.enabled = False
    model(batch)
    dense_flops = model.flops_per_batch(batch)
    handle.enabled = True
    model(batch)
    routed_flops = model.flops_per_batch(batch)
    routed_tokens = [block.tokens_seen for block in model.denoiser.blocks]
    handle.remove()

    predicted = dense_flops / routed_flops
    threads = torch.get_num_threads()
    print(f"reference geometry {REFERENCE}, batch {args.batch}, fp32, {threads} threads, {args.rounds} rounds")
    print(f"route {handle.routes[0].start} -> {handle.routes[0].end}, ratio {args.ratio}; "
          f"image tokens per block (routed): {routed_tokens}")
    print(f"matmul FLOPs fwd+bwd: dense {dense_flops / 1e9:.1f} GFLOP, routed {routed_flops / 1e9:.1f} GFLOP "
          f"-> predicted speedup {predicted:.3f}x")
    realised = {}
    for name, clock in (("wall", wall), (f"CPU ({threads} thr)", cpu)):
        dense_med, routed_med = median(clock[False]), median(clock[True])
        realised[name] = dense_med / routed_med
        print(f"{name:<14} dense {dense_med:7.3f} s  routed {routed_med:7.3f} s  realised {realised[name]:.3f}x  "
              f"realised/predicted {realised[name] / predicted:.3f}  (steps dense "
              f"{' '.join(f'{s:.2f}' for s in clock[False])}; routed {' '.join(f'{s:.2f}' for s in clock[True])})")
    print(f"goals: realised >= predicted; routed wall step <= 2.39 s (PRX 2.66 s routed, 1.59x vs 1.54x "
          f"predicted); this run's routed wall step {median(wall[True]):.3f} s")
    return [Row("tread", "realised / predicted speedup (wall clock)", realised["wall"] / predicted, ">=", 1.0),
            Row("tread", f"routed step s (wall clock, batch {args.batch})", median(wall[True]), "<=", 2.39)]
