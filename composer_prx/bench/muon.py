"""python -m composer_prx.bench muon -- Muon vs AdamW, and Muon's FSDP2 exchange vs muon-fsdp2.

(a) one process, reference geometry, the recipe's grouping (every 2D block matrix, adaLN modulation
    included): training-step time with Muon vs AdamW in interleaved rounds (goal <= 1.40x; PRX with
    muon-fsdp2: 6.97 s vs 4.23 s = 1.65x), and Muon's extra time beside what its Newton-Schulz FLOPs
    predict at this process's measured matmul rate (goal: measured <= 1.1 x predicted).
(b) `world` ranks, FSDP2 (fully_shard, gloo): optimizer-step time, Newton-Schulz FLOPs per rank and the
    step's peak extra memory (resident set above the step's start) for ours and the muon-fsdp2 package on
    the same Newton-Schulz form (the plain iteration: what bf16 GPUs run), plus our fp32 Gram form in its
    own row. Goal: per-rank NS work = total / world, ours no slower than muon-fsdp2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from composer_prx.bench.common import (REFERENCE, Row, composer_launch, matmul_peak_gflops, median, reference_batch,
                                       reference_model, synchronize, timed)
from composer_prx.optim import build_adamw, build_muon, muon_param_groups, newton_schulz, newton_schulz_flops

WORKER_FLAG = "--fsdp-worker"
QUICK_ARGS = ["--rounds", "1", "--opt-repeats", "1", "--steps", "1"]  # `bench all --quick`
VARIANTS_A = {
    "adamw": {},
    "muon (recipe)": {},
    "muon, modulation in Adam": {"grouping": "modulation_adam"},
    "muon, ns_chunks qkv 3, modulation 6": {"ns_chunks": {"*.qkv.weight": 3, "*.modulation.weight": 6}},
}


def single_process(rounds: int, opt_repeats: int, batch_size: int) -> list[Row]:
    """(a): interleaved rounds; each round one fwd+bwd per model, then `opt_repeats` timed optimizer steps."""
    batch = reference_batch(batch_size)
    models = {name: reference_model(seed=0) for name in VARIANTS_A}
    optimizers = {name: build_adamw(m) if name == "adamw" else build_muon(m, **VARIANTS_A[name])
                  for name, m in models.items()}
    fwd_bwd: dict[str, list[float]] = {name: [] for name in models}
    opt_step: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):  # round 0 warms up (and creates the optimizer state)
        for name, model in models.items():
            fb = timed(lambda: model.loss(model(batch), batch).backward())
            steps = [timed(optimizers[name].step) for _ in range(opt_repeats)]
            optimizers[name].zero_grad(set_to_none=True)
            if round_:
                fwd_bwd[name].append(fb)
                opt_step[name].extend(steps)
    peak = matmul_peak_gflops()
    # The forward/backward is the same computation for every optimizer: pool it across them.
    fb_all = [t for times in fwd_bwd.values() for t in times]
    fb = median(fb_all)
    print(f"(a) one process, reference geometry {REFERENCE}, batch {batch_size}, fp32, "
          f"{torch.get_num_threads()} threads; {rounds} interleaved rounds x {opt_repeats} optimizer steps; medians")
    print(f"    fwd+bwd (pooled, {len(fb_all)} samples) {fb:.3f} s; plain 2048^2 matmul {peak:.1f} GFLOP/s")
    print(f"    {'optimizer':<38}{'opt.step s':>11}{'step s':>9}{'/ adamw':>9}{'NS GFLOP':>10}"
          f"{'extra s':>9}{'predicted s':>13}{'meas/pred':>11}")
    adam_step = median(opt_step["adamw"])
    for name, opt in optimizers.items():
        step = median(opt_step[name])
        gflop = getattr(opt, "ns_flops", 0) / 1e9
        extra, predicted = step - adam_step, gflop / peak
        tail = f"{extra:>9.3f}{predicted:>13.3f}{extra / predicted:>11.2f}" if gflop else ""
        print(f"    {name:<38}{step:>11.3f}{fb + step:>9.3f}{(fb + step) / (fb + adam_step):>9.3f}{gflop:>10.1f}{tail}")
    print("    step = fwd+bwd + opt.step; extra = opt.step - adamw's; predicted = NS FLOPs / matmul rate")
    print("    goals: muon (recipe) <= 1.40 x adamw (PRX with muon-fsdp2: 1.65); extra <= 1.1 x predicted")
    shapes: dict[tuple[int, int], int] = {}
    for group in optimizers["muon (recipe)"].param_groups:
        if group["use_muon"]:
            for p in group["params"]:
                shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    print(f"    Muon matrices (recipe): {dict(shapes)}")
    recipe = median(opt_step["muon (recipe)"])
    predicted = getattr(optimizers["muon (recipe)"], "ns_flops", 0) / 1e9 / peak
    print(f"    FLOP bound: with its Newton–Schulz at the plain matmul rate, muon (recipe) / adamw would be "
          f"{(fb + adam_step + predicted) / (fb + adam_step):.3f} (the 1.40 goal needs NS <= 0.40 x the adamw step)")
    return [Row("muon", "(a) Muon (recipe) / AdamW step time", (fb + recipe) / (fb + adam_step), "<=", 1.40),
            Row("muon", "(a) Muon's extra opt.step time / its Newton–Schulz FLOPs' prediction",
                (recipe - adam_step) / predicted, "<=", 1.1)]


# ---- (b) FSDP2 ---------------------------------------------------------------------------------------


def fsdp(world: int, steps: int, muon_fsdp2_native: bool) -> list[Row]:
    cmd = composer_launch(world, "-m", "composer_prx.bench.muon", WORKER_FLAG,
                          json.dumps({"steps": steps, "native": muon_fsdp2_native}))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"FSDP2 bench failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"\n(b) {world} ranks, FSDP2 fully_shard on gloo, {result['threads']} thread(s) per rank, reference "
          f"geometry, recipe grouping; optimizer.step() median of {steps} after a warm-up (max over ranks)")
    print(f"    {'variant':<44}{'opt.step s':>11}  {'NS GFLOP per rank':<20}{'matrices':<10}{'peak extra MiB':>15}")
    for row in result["rows"]:
        if row.get("skipped"):
            print(f"    {row['name']:<44}{'skipped':>11}  {row['skipped']}")
            continue
        flops = "/".join(f"{f / 1e9:.1f}" for f in row["flops"])
        mats = "/".join(str(m) for m in row["matrices"]) if row["matrices"] else "-"
        mem = "/".join(f"{m:.0f}" for m in row["peak_mib"]) if row["peak_mib"] else "n/a"
        print(f"    {row['name']:<44}{row['step_s']:>11.3f}  {flops:<20}{mats:<10}{mem:>15}")
    for note in result["notes"]:
        print(f"    note: {note}")
    by_name = {row["name"]: row for row in result["rows"]}
    ours = by_name["ours, plain NS iteration (fp32)"]
    theirs = next(row for name, row in by_name.items() if name.startswith("muon-fsdp2"))
    rows = [Row("muon", f"(b) FSDP2 Newton–Schulz FLOPs of the busiest rank / (total / {world})",
                round(max(ours["flops"]) / (sum(ours["flops"]) / world), 6), "<=", 1.0)]
    if theirs.get("skipped"):
        rows.append(Row("muon", "(b) FSDP2 opt.step time: ours / muon-fsdp2", None, "<=", 1.0,
                        note=f"muon-fsdp2 {theirs['skipped']}"))
    else:
        rows.append(Row("muon", "(b) FSDP2 opt.step time: ours / muon-fsdp2", ours["step_s"] / theirs["step_s"],
                        "<=", 1.0))
    return rows


def _status_kib(field: str) -> float | None:
    path = Path("/proc/self/status")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def peak_extra_mib(fn) -> float | None:
    """Peak resident memory above the start while fn() runs (Linux: reset VmHWM via /proc/self/clear_refs)."""
    start = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    fn()
    peak = _status_kib("VmHWM")
    return None if start is None or peak is None else (peak - start) / 1024


def _fsdp_worker(config: dict) -> None:
    """Runs in each rank under `composer -n N`; rank 0 prints one RESULT json line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_device_mesh("cpu", (world,))
    model = reference_model(seed=0)
    for block in model.denoiser.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    notes: list[str] = []

    def gather_floats(value: float) -> list[float]:
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(out, torch.tensor([float(value)], dtype=torch.float64))
        return [float(t) for t in out]

    def set_grads(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            local = torch.randn(p.to_local().shape, generator=gen) * 1e-3
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    def measure(optimizer) -> tuple[float, float | None]:
        per_step = []
        set_grads(0)
        optimizer.step()  # warm-up: creates the optimizer state
        for k in range(config["steps"]):
            set_grads(k + 1)
            dist.barrier()
            per_step.append(timed(optimizer.step))
        set_grads(99)
        dist.barrier()
        peak = peak_extra_mib(optimizer.step)
        model.zero_grad(set_to_none=True)
        return max(gather_floats(median(per_step))), peak

    groups = muon_param_groups(model)
    muon_params = [p for g in groups if g["use_muon"] for p in g["params"]]
    muon_ids = {id(p) for p in muon_params}
    rows = []

    def row(name: str, optimizer, flops=None, matrices=None) -> None:
        step_s, peak = measure(optimizer)
        flops = flops or gather_floats(getattr(optimizer, "ns_flops", 0))
        matrices = matrices or ([int(m) for m in gather_floats(optimizer.ns_matrices)]
                                if hasattr(optimizer, "ns_matrices") else [])
        peaks = gather_floats(-1 if peak is None else peak)
        rows.append({"name": name, "step_s": step_s, "flops": flops, "matrices": matrices,
                     "peak_mib": [] if min(peaks) < 0 else peaks})

    row("AdamW (torch)", build_adamw(model))
    row("ours, plain NS iteration (fp32)", build_muon(model, ns_method="iterate"))
    try:
        import muon_fsdp2
    except ImportError:
        rows.append({"name": "muon-fsdp2 package", "skipped": "not installed (pip install muon-fsdp2==0.3.0)"})
    else:
        if not config["native"]:
            # Its Newton-Schulz is bf16 + torch.compile, minutes per step on a CPU without bf16 units:
            # swap in the same plain iteration in fp32 so the comparison is about distribution.
            muon_fsdp2.zeropower_via_newtonschulz5 = lambda g, steps: newton_schulz(
                g, steps, torch.float32, method="iterate")
            notes.append("muon-fsdp2 runs with its Newton-Schulz swapped for our plain fp32 iteration (its own bf16 "
                         "+ torch.compile path: --muon-fsdp2-native); it gathers each matrix to rank i % world one "
                         "at a time and runs its Adam per parameter on DTensors, ours with foreach on local shards")
        others = [p for p in model.parameters() if id(p) not in muon_ids]
        optimizer = muon_fsdp2.Muon([
            dict(params=muon_params, lr=1e-4, momentum=0.95, nesterov=True, ns_steps=5, rms_scale=True,
                 weight_decay=0.0, use_muon=True),
            dict(params=others, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, use_muon=False),
        ])
        per_rank, counts = [0.0] * world, [0] * world
        for i, p in enumerate(muon_params):  # the package sends matrix i to rank i % world
            per_rank[i % world] += newton_schulz_flops(*p.shape, 5, "iterate")
            counts[i % world] += 1
        row(f"muon-fsdp2 {muon_fsdp2.__version__}, same plain NS iteration", optimizer, per_rank, counts)
    row("ours, auto (fp32 Gram form where cheaper)", build_muon(model))
    total = sum(rows[1]["flops"])
    notes.append(f"ours, plain iteration: per-rank NS FLOPs sum to {total / 1e9:.1f} GFLOP, the single-process "
                 f"total; ideal per rank {total / world / 1e9:.1f}")
    notes.append("peak extra MiB: resident memory above the step's start during one step (state already created)")
    synchronize()
    if rank == 0:
        print("RESULT " + json.dumps({"rows": rows, "notes": notes, "threads": torch.get_num_threads()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench muon`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench muon")
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="(a) interleaved rounds (one fwd+bwd per optimizer each)")
    parser.add_argument("--opt-repeats", type=int, default=3, help="(a) timed optimizer steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--world", type=int, default=2, help="(b) ranks")
    parser.add_argument("--steps", type=int, default=3, help="(b) timed optimizer steps per variant")
    parser.add_argument("--muon-fsdp2-native", action="store_true",
                        help="(b) run muon-fsdp2's own bf16 + torch.compile Newton-Schulz (slow on CPU)")
    return parser


def main(argv: list[str]) -> list[Row]:
    if argv and argv[0] == WORKER_FLAG:
        _fsdp_worker(json.loads(argv[1]))
        return []
    args = arguments().parse_args(argv)
    rows = []
    if args.part in ("a", "both"):
        rows += single_process(args.rounds, args.opt_repeats, args.batch)
    if args.part in ("b", "both"):
        rows += fsdp(args.world, args.steps, args.muon_fsdp2_native)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
