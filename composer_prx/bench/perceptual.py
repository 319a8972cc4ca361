"""python -m composer_prx.bench perceptual -- step-time cost of LPIPS and DINO perceptual losses, side by side.

Reference denoiser geometry (fp32, bare PyTorch loop, one AdamW per path), at 256 and 512 px; rounds
alternate: bare step, step + LpipsLoss (VGG16), step + DinoPerceptualLoss (DINOv2 ViT-B/14 with 4
registers, timm), both nets with random weights loaded through the real loaders.  For each loss it
prints the measured extra time over the bare step and the extra its FLOPs predict:

    predicted extra = 3 F_fwd(net, B images at the net's input size) / R
        (forward on x_hat + forward on x + backward to x_hat only, ~ one more forward; no weight grads)
    R = the bare step's own achieved rate (PRXModel.flops_per_batch / bare step time), and, as a second
        column, a plain 2048^2 fp32 matmul's rate measured in the same process (a lower bound on time)

goal: measured extra <= 1.1 x predicted.  Use --threads 1 on a shared machine (see bench tread).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from composer_prx.algorithms.perceptual import DinoPerceptualLoss, LpipsLoss, target_size
from composer_prx.bench.common import REFERENCE, Row, matmul_peak_gflops, median, reference_batch, reference_model

DINO_TEACHER = "timm:vit_base_patch14_reg4_dinov2"
QUICK_ARGS = ["--rounds", "1", "--sizes", "256"]  # `bench all --quick`


def _random_vgg16_file(folder: str) -> str:
    """torchvision-style VGG16 checkpoint (features only) with random weights, for the real LPIPS loader."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = f"{folder}/vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench perceptual`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench perceptual")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three paths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--lpips-resolution", type=float, default=None,
                        help="LpipsLoss resolution as a scale (PRX: 0.5); default full resolution")
    parser.add_argument("--dino-resolution", type=int, default=224, help="DinoPerceptualLoss shorter side (PRX 224)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep the default)")
    return parser


def main(argv: list[str]) -> list[Row]:
    args = arguments().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        lpips_loss = LpipsLoss(weight=0.1, net="vgg", backbone_path=_random_vgg16_file(folder),
                               resolution=args.lpips_resolution)
        lpips_loss.load_net(device)
    dino_loss = DinoPerceptualLoss(weight=0.01, teacher=DINO_TEACHER, teacher_weights="random",
                                   resolution=args.dino_resolution)
    dino_loss.load_net(device)
    losses = {"lpips": lpips_loss, "dino": dino_loss}
    threads = torch.get_num_threads()
    print(f"reference geometry {REFERENCE}, batch {args.batch}, fp32, {threads} threads, {args.rounds} rounds; "
          f"LPIPS VGG16 at resolution {args.lpips_resolution or 'full'}, DINOv2 ViT-B/14 ({DINO_TEACHER}, random) "
          f"at shorter side {args.dino_resolution}")
    print(f"{'px':>4} {'path':<6} {'step s':>8} {'extra s':>8} {'net GFLOP':>10} {'pred. s':>8} {'meas/pred':>9}"
          f" {'pred@peak s':>11} {'meas/pred@peak':>14}   steps (wall s)")
    rows = []
    for size in args.sizes:
        batch = reference_batch(args.batch, resolution=size)
        models = {name: reference_model(seed=0) for name in ("bare", *losses)}
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}

        def step(name: str) -> None:
            model, opt = models[name], opts[name]
            start = time.perf_counter()
            out = model(batch)
            loss = model.loss(out, batch)
            if name in losses:
                loss = loss + losses[name].weight * losses[name].term(out)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)

        for name in models:  # warm-up (allocator, AdamW state)
            step(name)
            times[name].clear()
        order = list(models)
        for i in range(args.rounds):
            for name in order if i % 2 == 0 else order[::-1]:
                step(name)
        bare_s = median(times["bare"])
        rate = models["bare"].flops_per_batch(batch) / bare_s  # FLOP/s the bare step achieves
        peak = matmul_peak_gflops() * 1e9
        h, w = size, size
        lpips_hw = target_size(h, w, args.lpips_resolution)
        teacher = dino_loss.teacher_on(device)
        net_flops = {"lpips": args.batch * lpips_loss.lpips_on(device).flops(*lpips_hw),
                     "dino": args.batch * teacher.flops(*dino_loss.grid(h, w, teacher.patch_size))}
        print(f"{size:>4} {'bare':<6} {bare_s:>8.3f} {'':>8} {'':>10} {'':>8} {'':>9} {'':>11} {'':>14}   "
              f"{' '.join(f'{s:.2f}' for s in times['bare'])}")
        for name in losses:
            step_s = median(times[name])
            predicted, at_peak = 3 * net_flops[name] / rate, 3 * net_flops[name] / peak
            extra = step_s - bare_s
            print(f"{size:>4} {name:<6} {step_s:>8.3f} {extra:>8.3f} {net_flops[name] / 1e9:>10.1f} "
                  f"{predicted:>8.3f} {extra / predicted:>9.3f} {at_peak:>11.3f} {extra / at_peak:>14.3f}   "
                  f"{' '.join(f'{s:.2f}' for s in times[name])}")
            rows.append(Row("perceptual", f"{name} at {size} px: extra step time / predicted", extra / predicted,
                            "<=", 1.1))
        print(f"     bare step {rate / 1e9:.1f} GFLOP/s, plain matmul {peak / 1e9:.1f} GFLOP/s")
    print("predicted extra = 3 x net forward FLOPs / the bare step's achieved FLOP/s (pred@peak: / the plain "
          "matmul's); goal meas/pred <= 1.1")
    return rows
