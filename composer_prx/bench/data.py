"""python -m composer_prx.bench data -- decode+resize throughput next to the training step's consumption.

Prints (1) decoded + resized samples/s of one worker (the in-process dataset path, num_workers=0)
for JPEG samples stored at 512 and 1024 px, and (2) for the quickstart (shapes at 32 px, batch 32,
the quickstart PixelDiT): seconds per batch spent loading vs in the training step, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _write_jpeg_bucket(root: str, size: int, count: int) -> None:
    from PIL import Image
    from streaming import MDSWriter

    from composer_prx.data.convert import encode_image

    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    with MDSWriter(out=os.path.join(root, f"h{size}_w{size}"),
                   columns={"image": "bytes", "caption": "str", "width": "int", "height": "int"}) as writer:
        for i in range(count):
            # a smooth photo-like image with some texture, so JPEG sizes are realistic
            base = np.add.outer(ramp * rng.uniform(0.3, 1), ramp * rng.uniform(0.3, 1)) / 2
            pixels = np.stack([base, base[::-1], base.T], -1) + rng.normal(0, 12, (size, size, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            writer.write({"image": encode_image(image, "jpeg", 95), "caption": f"image {i}",
                          "width": size, "height": size})


def decode_rate(size: int, count: int, resolution: int, patch_size: int) -> float:
    """Samples/s of one process decoding and resizing ``count`` stored ``size``-px JPEGs to ``resolution``."""
    from composer_prx.data.dataset import build_dataloader

    with tempfile.TemporaryDirectory() as root:
        _write_jpeg_bucket(root, size, count)
        loader = build_dataloader(None, root, batch_size=8, resolution=resolution, patch_size=patch_size,
                                  shuffle=False)
        next(iter(loader))  # warm-up (index, shared memory, first shard)
        start = time.perf_counter()
        seen = sum(len(batch["caption"]) for batch in loader)
        elapsed = time.perf_counter() - start
        del loader
    return seen / elapsed


def quickstart_ratio(steps: int, step_seconds: float | None) -> tuple[float, float]:
    """(seconds per batch waiting for data, seconds per training step) for the quickstart geometry."""
    import torch

    from composer_prx.data.shapes import build_shapes_dataloader

    with tempfile.TemporaryDirectory() as root:
        loader = build_shapes_dataloader(batch_size=32, resolution=32, patch_size=4, root=root,
                                         n_train=32 * (steps + 2), seed=17)
        it = iter(loader)
        batches, data_times = [next(it)], []
        for _ in range(steps):
            start = time.perf_counter()
            batches.append(next(it))
            data_times.append(time.perf_counter() - start)
        data_seconds = float(np.median(data_times))
        if step_seconds is None:
            from composer_prx.model.dit import DiTConfig, PixelDiT
            from composer_prx.model.pipeline import PRXModel
            from composer_prx.model.text import load_text_encoder

            torch.manual_seed(0)
            cfg = DiTConfig(patch_size=4, hidden_dim=192, depth=4, num_heads=4, mlp_ratio=4.0, bottleneck_dim=64,
                            text_dim=64)
            model = PRXModel(PixelDiT(cfg), load_text_encoder(os.path.join(root, "text_encoder"), max_length=64))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            times = []
            for batch in batches:
                start = time.perf_counter()
                loss = model.loss(model(batch), batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times.append(time.perf_counter() - start)
            step_seconds = float(np.median(times[1:]))
        del loader, it
    return data_seconds, step_seconds


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench data")
    parser.add_argument("--samples", type=int, default=48, help="stored images per size")
    parser.add_argument("--steps", type=int, default=10, help="quickstart batches to time")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="use this training-step time instead of measuring the quickstart model")
    args = parser.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker process runs with
    print("decoded + resized samples/s, one worker (1 thread; JPEG q95 stored at the bucket size):")
    for size in (512, 1024):
        rate = decode_rate(size, args.samples, size, 32)
        print(f"  {size:5d} px: {rate:8.1f} samples/s/worker  ({1000 / rate:6.1f} ms/sample)")
    torch.set_num_threads(threads)
    data_s, step_s = quickstart_ratio(args.steps, args.step_seconds)
    print("quickstart (shapes 32 px, batch 32, num_workers=0):")
    print(f"  data per batch {data_s * 1000:7.2f} ms | training step {step_s * 1000:8.1f} ms | "
          f"data wait = {100 * data_s / (data_s + step_s):.2f}% of step time | "
          f"loader {32 / data_s:,.0f} samples/s vs step consumes {32 / step_s:,.0f} samples/s")
