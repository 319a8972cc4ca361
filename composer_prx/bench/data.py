"""python -m composer_prx.bench data -- decode+resize throughput next to the training step's consumption.

Prints (1) decoded + resized samples/s of one worker (the in-process dataset path, num_workers=0)
for JPEG samples stored at 512 and 1024 px, (1b) 1024 px stored -> 512 px trained: JPEG draft decoding
(the dataset's path) next to a full decode + resize (the previous path), and (2) for the quickstart (shapes at 32 px, batch 32,
the quickstart PixelDiT): seconds per batch spent loading vs in the training step, and the ratio;
(3) bytes of shards each of 2 and 3 simulated nodes reads in one epoch, node-partitioned vs one partition.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from composer_prx.bench.common import Row

QUICK_ARGS = ["--samples", "8", "--steps", "3"]  # `bench all --quick`


def _write_jpeg_bucket(root: str, size: int, count: int, shard_size: int = 1 << 26) -> None:
    from PIL import Image
    from streaming import MDSWriter

    from composer_prx.data.convert import encode_image

    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    with MDSWriter(out=os.path.join(root, f"h{size}_w{size}"),
                   columns={"image": "bytes", "caption": "str", "width": "int", "height": "int"},
                   size_limit=shard_size) as writer:
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


def downscale_rates(count: int) -> tuple[float, float]:
    """(samples/s with JPEG draft decoding, samples/s with a full decode) for 1024-px JPEGs -> 512-px buckets."""
    from PIL import Image

    from composer_prx.data.buckets import Bucket
    from composer_prx.data.dataset import image_to_uint8
    from composer_prx.data.imaging import load_for_bucket, resize_to_bucket, to_rgb

    with tempfile.TemporaryDirectory() as root:
        _write_jpeg_bucket(root, 1024, count)
        from streaming import StreamingDataset

        stored = StreamingDataset(local=os.path.join(root, "h1024_w1024"), batch_size=1, shuffle=False)
        encoded = [stored[i]["image"] for i in range(count)]
        del stored
    target = Bucket(512, 512)
    rates = []
    for draft in (True, False):
        start = time.perf_counter()
        for data in encoded:
            if draft:
                image = load_for_bucket(data, lambda h, w: target)[0]
            else:
                import io

                full = Image.open(io.BytesIO(data))
                full.load()
                image = resize_to_bucket(to_rgb(full), target)
            image_to_uint8(image)
        rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def node_traffic(node_counts: tuple[int, ...] = (2, 3), ranks_per_node: int = 2,
                 canonical: tuple[int | None, ...] = (None, 1)) -> tuple[dict[tuple, list[int]], int]:
    """({(nodes, num_canonical_nodes): bytes of shards each simulated node reads in one epoch}, total bytes).

    Simulates the epoch plan for nodes x ``ranks_per_node`` ranks (num_canonical_nodes None: the node
    count; 1: one shard partition for all nodes, the plan before node partitioning) on 192 JPEGs in two
    buckets, about 7 per shard, and sums the sizes of the distinct shards holding each node's samples
    (what a node downloads with an empty cache).
    """
    from streaming.base.world import World

    from composer_prx.data.dataset import _generate_bucket_work, build_dataset

    per_node: dict[tuple, list[int]] = {}
    with tempfile.TemporaryDirectory() as root:
        _write_jpeg_bucket(root, 256, 120, shard_size=1 << 18)
        _write_jpeg_bucket(root, 128, 72, shard_size=1 << 16)
        dataset = build_dataset(None, root, batch_size=4, resolution=256, patch_size=32, shuffle=True, seed=0)
        shard_bytes = [shard.get_raw_size() for shard in dataset.shards]
        for nodes in node_counts:
            for count in canonical:
                dataset.num_canonical_nodes = count
                world = World(num_nodes=nodes, ranks_per_node=ranks_per_node, workers_per_rank=1, worker=0)
                work = _generate_bucket_work(dataset, world, 0, 0)  # [nodes, ranks_per_node, workers, batches, B]
                shards = [{int(dataset.spanner[int(i)][0]) for i in node[node >= 0]} for node in work]
                per_node[nodes, count] = [sum(shard_bytes[s] for s in node) for node in shards]
        del dataset
    return per_node, sum(shard_bytes)


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


def arguments() -> argparse.ArgumentParser:
    """The command line of `python -m composer_prx.bench data`."""
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench data")
    parser.add_argument("--samples", type=int, default=48, help="stored images per size")
    parser.add_argument("--steps", type=int, default=10, help="quickstart batches to time")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="use this training-step time instead of measuring the quickstart model")
    return parser


def main(argv: list[str]) -> list[Row]:
    args = arguments().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker process runs with
    print("decoded + resized samples/s, one worker (1 thread; JPEG q95 stored at the bucket size):")
    for size in (512, 1024):
        rate = decode_rate(size, args.samples, size, 32)
        print(f"  {size:5d} px: {rate:8.1f} samples/s/worker  ({1000 / rate:6.1f} ms/sample)")
    draft, full = downscale_rates(args.samples)
    print(f"  1024 -> 512 px: {draft:8.1f} samples/s/worker with JPEG draft decoding vs {full:8.1f} with a full "
          f"decode ({draft / full:.2f}x)")
    traffic, total = node_traffic()
    for (nodes, canonical), per_node in traffic.items():
        label = "num_canonical_nodes = nodes" if canonical is None else f"num_canonical_nodes = {canonical}"
        print(f"bytes read per node, {nodes} simulated nodes x 2 ranks, one epoch, {label}: {per_node} of {total} "
              f"({[round(b / total, 3) for b in per_node]} of the data; goal {1 / nodes:.3f} each)")
    torch.set_num_threads(threads)
    data_s, step_s = quickstart_ratio(args.steps, args.step_seconds)
    print("quickstart (shapes 32 px, batch 32, num_workers=0):")
    print(f"  data per batch {data_s * 1000:7.2f} ms | training step {step_s * 1000:8.1f} ms | "
          f"data wait = {100 * data_s / (data_s + step_s):.2f}% of step time | "
          f"loader {32 / data_s:,.0f} samples/s vs step consumes {32 / step_s:,.0f} samples/s")
    return [Row("data", "quickstart data wait / (data + step) time", data_s / (data_s + step_s), "<", 0.05),
            Row("data", "bytes read per node / dataset bytes (max of 2 nodes; 0.5 plus the shards that straddle "
                "a node boundary, at most 1 per bucket)", round(max(traffic[(2, None)]) / total, 3), "<=", 0.55)]
