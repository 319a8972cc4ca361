"""A stand-in vision teacher for the shapes data: a tiny DINOv2-architecture ViT trained on training scenes.

No pretrained DINO sees this machine, so REPA on the shapes data aligns to a small transformers
``Dinov2Model`` (random init) trained here for a couple of minutes to read each scene from its tokens:

    training-scene render [B, 3, S, S] ──► Dinov2Model ──► patch tokens [B, g, g, D] ──► colour of the patch (7)
                                                      │                           └──► shape in the patch's cell (4)
                                                      └► cls [B, D] ──► per cell: object colour or empty (9 x 7)

Only training scenes (``shapes.train_scenes``) are rendered, with the training jitter; held-out scenes are
never seen. It is saved with ``save_pretrained`` to ``ROOT/teacher`` next to the data, so REPA loads it
exactly as it loads ``facebook/dinov2-base`` (``algorithms.repa.teacher=ROOT/teacher``). It is a stand-in
for a pretrained teacher, not one: its features know shapes, colours and layout, nothing else.

    python -m composer_prx.data.shapes_teacher --root ./data/shapes [--size 32 --patch 4 --seconds 75]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from composer_prx.data import shapes
from composer_prx.encoders import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

PALETTE = [shapes.BACKGROUND, *shapes.COLOURS.values()]  # class 0: background
COLOUR_NAMES = ["background", *shapes.COLOURS]
SHAPE_NAMES = ["none", *shapes.SHAPES]


def scene_targets(scene: shapes.Scene, pixels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch colour class [g, g], per-patch shape of its cell's object [g, g], per-cell colour class [9]."""
    size = pixels.shape[0]
    grid = size // patch
    nearest = np.argmin(((pixels[..., None, :].astype(np.float32) - np.array(PALETTE, np.float32)) ** 2).sum(-1), -1)
    blocks = nearest[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3)
    counts = np.stack([(blocks == k).sum((-1, -2)) for k in range(len(PALETTE))], -1)  # [g, g, 7]
    object_share = counts[..., 1:].max(-1) / patch**2
    colour = np.where(object_share >= 0.25, 1 + counts[..., 1:].argmax(-1), 0)  # [g, g]
    cell_shape, cell_colour = np.zeros(9, np.int64), np.zeros(9, np.int64)
    for obj in scene.objects:
        index = shapes.POSITIONS.index(obj.position)
        cell_shape[index] = 1 + shapes.SHAPES.index(obj.shape)
        cell_colour[index] = 1 + list(shapes.COLOURS).index(obj.colour)
    centres = (np.arange(grid) + 0.5) * patch * 3 // size  # the 3x3 cell of each patch row/col
    cells = (3 * centres[:, None] + centres[None, :]).astype(np.int64)  # [g, g]
    return colour, cell_shape[cells], cell_colour


def render_set(n: int, size: int, patch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n training-scene renders in [-1, 1] [n, 3, S, S] with their targets (see `scene_targets`)."""
    rng = np.random.default_rng(seed)
    singles, pairs = shapes.train_scenes(1), shapes.train_scenes(2)
    images, colours, cell_shapes, cell_colours = [], [], [], []
    for _ in range(n):
        scene = shapes.sample_training_scene(rng, singles, pairs)
        pixels = shapes.render(scene, size, rng=rng)
        colour, shape, cell_colour = scene_targets(scene, pixels, patch)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
        colours.append(torch.from_numpy(colour))
        cell_shapes.append(torch.from_numpy(shape))
        cell_colours.append(torch.from_numpy(cell_colour))
    return tuple(torch.stack(t) for t in (images, colours, cell_shapes, cell_colours))


def train_shapes_teacher(root: str, *, size: int = 32, patch: int = 4, hidden: int = 64, depth: int = 4,
                         seconds: float = 75.0, max_steps: int = 3000, batch_size: int = 64, n_images: int = 2048, n_val: int = 512,
                         seed: int = 0, out: str | None = None) -> dict:
    """Train the stand-in teacher for at most `seconds` / `max_steps`, save it to `out` (ROOT/teacher); metrics."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    net = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=4,
                                   intermediate_size=2 * hidden, patch_size=patch, image_size=size))
    heads = nn.ModuleDict({"colour": nn.Linear(hidden, len(PALETTE)), "shape": nn.Linear(hidden, len(SHAPE_NAMES)),
                           "cells": nn.Linear(hidden, 9 * len(PALETTE))})
    params = list(net.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    grid = size // patch

    def losses(images, colour, shape, cells):
        tokens = net(pixel_values=((images + 1) / 2 - mean) / std).last_hidden_state  # [B, 1 + g g, D]
        patches = tokens[:, 1:]
        logits = {"colour": heads["colour"](patches), "shape": heads["shape"](patches),
                  "cells": heads["cells"](tokens[:, 0]).view(-1, 9, len(PALETTE))}
        targets = {"colour": colour.view(-1, grid * grid), "shape": shape.view(-1, grid * grid), "cells": cells}
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in logits)
        accuracy = {k: float((logits[k].argmax(-1) == targets[k]).float().mean()) for k in logits}
        return loss, accuracy

    train = render_set(n_images, size, patch, seed)
    val = render_set(n_val, size, patch, seed + 1)
    start, step = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(seed)
    net.train()
    while step < max_steps and time.perf_counter() - start < seconds:
        idx = torch.randint(0, n_images, (batch_size,), generator=generator)
        loss, _ = losses(*(t[idx] for t in train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    net.eval()
    with torch.no_grad():
        _, accuracy = losses(*val)
    out = out or os.path.join(root, "teacher")
    net.save_pretrained(out)
    metrics = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "val_accuracy": accuracy,
               "size": size, "patch": patch, "hidden": hidden, "depth": depth}
    with open(os.path.join(out, "shapes_teacher.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log.info("shapes teacher saved to %s: %s", out, metrics)
    return metrics


def ensure_shapes_teacher(root: str, steps: int, *, size: int = 32, patch: int = 4) -> str:
    """ROOT/teacher, trained for `steps` steps first if it is absent (written to a temporary folder, then renamed)."""
    from composer_prx.data.shapes import write_folder_once

    return write_folder_once(os.path.join(root, "teacher"), lambda tmp: train_shapes_teacher(
        root, size=size, patch=patch, seconds=float("inf"), max_steps=steps, out=tmp))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.data.shapes_teacher", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="./data/shapes", help="the shapes data root; the teacher goes to ROOT/teacher")
    parser.add_argument("--size", type=int, default=32, help="render size (the quickstart's resolution)")
    parser.add_argument("--patch", type=int, default=4, help="teacher patch size (32 px / 4 = the quickstart's 8x8 grid)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=75.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    metrics = train_shapes_teacher(args.root, size=args.size, patch=args.patch, hidden=args.hidden, depth=args.depth,
                                   seconds=args.seconds, max_steps=args.max_steps, seed=args.seed)
    return metrics


if __name__ == "__main__":
    main()
