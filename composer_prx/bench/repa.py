"""python -m composer_prx.bench repa -- training step without vs with REPA, side by side, per teacher.

Reference geometry (depth 12, 256 px / patch 16 = 16x16 image tokens + 256 text tokens, batch 8, fp32), one
PRXModel and one AdamW; REPA aligns block 7 to a real-architecture teacher with random weights (timm
DINOv3 ViT-S/16 and ViT-B/16 at 256 px, i.e. the grid-matched 16x16 patches), projector hidden 2048.
Rounds alternate plain and REPA steps. Prints the median step times, the measured cost (REPA / plain)
and the cost the matmul FLOPs predict: (step + teacher forward + 3 x projector forward) / step.
Goal: measured <= 1.1 x predicted. PRX reports a 12% throughput cost at full scale.

On a machine shared with other jobs use --threads 1 (see bench tread): the CPU time is then the step's own work.
"""

from __future__ import annotations

import argparse
import time

import torch

from composer_prx.algorithms.repa import Repa, projector_flops
from composer_prx.bench.common import REFERENCE, Row, alternate, median, reference_batch, reference_model

TEACHERS = {"vit-s16": "timm:vit_small_patch16_dinov3", "vit-b16": "timm:vit_base_patch16_dinov3"}
QUICK_ARGS = ["--rounds", "1"]  # `bench all --quick`


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench repa`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench repa")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved plain/REPA pairs per teacher")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep the default)")
    return parser


def main(argv: list[str]) -> list[Row]:
    args = arguments().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = reference_batch(args.batch)
    threads = torch.get_num_threads()
    print(f"reference geometry {REFERENCE}, batch {args.batch}, fp32, {threads} threads, {args.rounds} rounds, "
          f"REPA block {args.block}, projector hidden {args.hidden}, teachers random-init")
    rows = []
    for key in args.teachers:
        model = reference_model(seed=0)
        repa = Repa(TEACHERS[key], block=args.block, hidden=args.hidden, teacher_weights="random")
        projector = repa.prepare(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        repa.attach(model)
        model.train()
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}

        def step(with_repa: bool) -> None:
            wall_0, cpu_0 = time.perf_counter(), time.process_time()
            if with_repa:
                repa.arm()
            out = model(batch)
            loss = model.loss(out, batch)
            term = repa.take_loss(model, out.x)
            if term is not None:
                loss = loss + repa.weight * term
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            wall[with_repa].append(time.perf_counter() - wall_0)
            cpu[with_repa].append(time.process_time() - cpu_0)

        alternate(step, args.rounds, (wall, cpu))
        repa.detach()

        grid = model.denoiser.cfg.patch_size
        h = w = batch["image"].shape[-1] // grid
        step_flops = model.flops_per_batch(batch)
        teacher_flops = args.batch * repa.teacher.flops(h, w)
        proj_flops = 3 * projector_flops(args.batch * h * w, projector.net[0].in_features, args.hidden,
                                         repa.teacher.dim)
        predicted = (step_flops + teacher_flops + proj_flops) / step_flops
        print(f"{key} ({TEACHERS[key]}, dim {repa.teacher.dim}, {h}x{w} patches at {h * repa.teacher.patch_size} px): "
              f"step {step_flops / 1e9:.1f} GFLOP, teacher fwd {teacher_flops / 1e9:.1f}, projector fwd+bwd "
              f"{proj_flops / 1e9:.1f} -> predicted cost {predicted:.3f}x")
        for name, clock in (("wall", wall), (f"CPU ({threads} thr)", cpu)):
            plain, with_repa = median(clock[False]), median(clock[True])
            measured = with_repa / plain
            print(f"  {name:<14} plain {plain:7.3f} s  REPA {with_repa:7.3f} s  measured {measured:.3f}x  "
                  f"measured/predicted {measured / predicted:.3f}  (goal <= 1.1)")
            rows.append(Row("repa", f"{key}: measured / predicted cost ({name.split(' ')[0]} time)",
                            measured / predicted, "<=", 1.1))
    return rows
