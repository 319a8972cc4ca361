"""The shapes stand-in teacher: targets read the scene; a short run saves a folder REPA's loader opens."""

import json

import numpy as np
import torch

from composer_prx.data import shapes
from composer_prx.data.shapes_teacher import COLOUR_NAMES, SHAPE_NAMES, scene_targets, train_shapes_teacher
from composer_prx.encoders import load_vision_encoder


def test_targets_follow_the_scene():
    scene = shapes.Scene.of(("red", "circle", "top left"), ("blue", "triangle", "bottom right"))
    colour, shape, cells = scene_targets(scene, shapes.render(scene, 32), patch=4)
    assert colour.shape == shape.shape == (8, 8) and cells.shape == (9,)
    assert COLOUR_NAMES[colour[1, 1]] == "red" and COLOUR_NAMES[colour[6, 6]] == "blue"
    assert COLOUR_NAMES[colour[4, 4]] == "background"
    assert SHAPE_NAMES[shape[0, 0]] == "circle" and SHAPE_NAMES[shape[7, 7]] == "triangle"
    assert SHAPE_NAMES[shape[4, 4]] == "none"
    assert [COLOUR_NAMES[c] for c in cells[[0, 4, 8]]] == ["red", "background", "blue"]


def test_a_short_run_saves_a_teacher_the_real_loader_opens(tmp_path):
    metrics = train_shapes_teacher(str(tmp_path), hidden=32, depth=1, seconds=30, max_steps=2, n_images=16, n_val=16)
    assert metrics["steps"] == 2 and set(metrics["val_accuracy"]) == {"colour", "shape", "cells"}
    teacher = load_vision_encoder(str(tmp_path / "teacher"))
    assert (teacher.patch_size, teacher.dim, teacher.num_prefix_tokens) == (4, 32, 1)
    out = teacher.encode(torch.zeros(1, 3, 32, 32), grid=(8, 8))
    assert out.patch_tokens.shape == (1, 8, 8, 32) and np.isfinite(out.patch_tokens.numpy()).all()


def test_the_shapes_data_builder_trains_the_teacher_once_when_asked(tmp_path):
    from composer_prx.data.shapes import build_shapes_dataloader

    root = tmp_path / "shapes"
    build_shapes_dataloader(4, 16, 4, str(root), n_train=16, size=16, text_encoder=False)
    assert not (root / "teacher").exists()  # teacher_steps=0: no teacher
    build_shapes_dataloader(4, 16, 4, str(root), n_train=16, size=16, text_encoder=False, teacher_steps=2)
    saved = json.loads((root / "teacher" / "shapes_teacher.json").read_text())
    assert (saved["steps"], saved["size"], saved["patch"]) == (2, 16, 4) and not (root / "teacher.tmp").exists()
    weights = next((root / "teacher").glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    build_shapes_dataloader(4, 16, 4, str(root), n_train=16, size=16, text_encoder=False, teacher_steps=2)
    assert weights.stat().st_mtime_ns == before  # an existing teacher is kept, not retrained
    assert load_vision_encoder(str(root / "teacher")).patch_size == 4
