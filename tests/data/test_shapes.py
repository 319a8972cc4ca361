"""Shapes data: held-out split, captions, rendering, analytic scoring, MDS export."""

import json
import os

import numpy as np
import pytest

from composer_prx.data import shapes as S


def _random_scenes(n, seed):
    rng = np.random.default_rng(seed)
    singles, pairs = S.train_scenes(1), S.train_scenes(2)
    return rng, [S.sample_training_scene(rng, singles, pairs) for _ in range(n)]


def test_heldout_is_deterministic_disjoint_and_sized():
    held1, held2 = S.heldout_scenes(1), S.heldout_scenes(2)
    train1, train2 = S.train_scenes(1), S.train_scenes(2)
    assert held1 == S.heldout_scenes(1) and held2 == S.heldout_scenes(2)
    assert not set(held1) & set(train1) and not set(held2) & set(train2)
    assert len(held1) + len(train1) == len(S.all_objects())
    assert 0.08 < len(held1) / len(S.all_objects()) < 0.22
    assert 0.05 < len(held2) / (len(held2) + len(train2)) < 0.15
    held_objects = {s.objects[0] for s in held1}
    # no training scene shows a held-out object, and held-out pairs are made of seen objects
    assert not any(o in held_objects for s in train2 for o in s.objects)
    assert not any(o in held_objects for s in held2 for o in s.objects)


def test_scene_validation_and_json_round_trip():
    scene = S.Scene.of(("blue", "square", "bottom"), ("red", "circle", "top left"))
    assert scene.objects[0].position == "top left"  # canonical order
    assert S.Scene.from_json(json.dumps(scene.to_json())) == scene
    with pytest.raises(ValueError, match="distinct cells"):
        S.Scene.of(("red", "circle", "top"), ("blue", "square", "top"))
    with pytest.raises(ValueError, match="colour 'pink'"):
        S.ShapeObject("pink", "circle", "top")
    with pytest.raises(ValueError, match="position"):
        S.ShapeObject("red", "circle", "upper")


def test_captions_describe_the_scene_in_several_wordings():
    scene = S.Scene.of(("red", "circle", "top left"), ("blue", "square", "bottom"))
    captions = {scene.caption(v) for v in range(3 * S.N_CAPTION_VARIANTS)}
    assert len(captions) == 3 * S.N_CAPTION_VARIANTS
    for caption in captions:
        assert "red circle" in caption and "blue square" in caption and len(caption.split()) >= 12
    assert scene.caption(np.random.default_rng(3)) == scene.caption(np.random.default_rng(3))
    assert "top left corner" in S.Scene.of(("red", "circle", "top left")).caption(0)


@pytest.mark.parametrize("size,count", [(32, 150), (64, 40), (256, 4)])
def test_score_is_perfect_on_ground_truth(size, count):
    rng, scenes = _random_scenes(count, seed=size)
    results = [S.score(S.render(scene, size, rng=rng), scene) for scene in scenes]
    assert all(r["all"] == 1.0 for r in results), [r for r in results if r["all"] < 1][:3]
    image = S.render(scenes[0], size)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    assert S.score(image.astype(np.float32) / 255.0, scenes[0])["all"] == 1.0  # float [0, 1] input


def test_score_counts_extra_objects_against_precision():
    """A two-object image does not pass a one-object prompt: the unasked-for object is an extra."""
    pairs = [p for p in S.heldout_scenes(2) if p.objects[0].colour != p.objects[1].colour][:20]
    for pair in pairs:
        image = S.render(pair, 32)
        full = S.score(image, pair)
        assert full["all"] == 1.0 and full["extra"] == 0 and full["precision"] == 1.0
        for obj in pair.objects:
            one = S.score(image, S.Scene((obj,)))
            assert one["colour"] == one["position"] == one["shape"] == 1.0  # recall alone would pass it
            assert one["extra"] == 1 and one["precision"] == 0.5 and one["all"] == 0.0
    twins = S.Scene.of(("red", "circle", "top left"), ("red", "circle", "bottom right"))  # same colour too
    single = S.score(S.render(twins, 32), S.Scene.of(("red", "circle", "top left")))
    assert single["extra"] == 1 and single["all"] == 0.0
    blank = S.score(np.full((32, 32, 3), 255, dtype=np.uint8), S.Scene.of(("red", "circle", "top")))
    assert blank["extra"] == 0 and blank["precision"] == 1.0 and blank["all"] == 0.0  # nothing seen, nothing extra


def test_score_rejects_noise_and_wrong_attributes():
    rng, scenes = _random_scenes(60, seed=1)
    noise = [S.score(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), s)["accuracy"] for s in scenes]
    assert max(noise) < 0.2
    colours, shapes, positions = list(S.COLOURS), list(S.SHAPES), list(S.POSITIONS)
    wrong_colour, wrong_shape, wrong_position = [], [], []
    for scene in scenes:
        image = S.render(scene, 32, rng=rng)
        obj = scene.objects[0]
        others = scene.objects[1:]
        taken = {o.colour for o in others}
        new_colour = next(c for c in colours if c != obj.colour and c not in taken)
        recoloured = S.Scene((S.ShapeObject(new_colour, obj.shape, obj.position), *others))
        wrong_colour.append(not S.score(image, recoloured)["objects"][0]["colour"])
        swapped = S.ShapeObject(obj.colour, shapes[(shapes.index(obj.shape) + 1) % 3], obj.position)
        wrong_shape.append(S.score(image, S.Scene((swapped, *others)))["shape"] < 1)
        free = [p for p in positions if p not in {o.position for o in scene.objects}]
        moved = S.ShapeObject(obj.colour, obj.shape, free[0])
        wrong_position.append(S.score(image, S.Scene((moved, *others)))["position"] < 1)
    assert all(wrong_colour) and all(wrong_shape) and all(wrong_position)


def test_score_validates_input():
    scene = S.Scene.of(("red", "circle", "center"))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        S.score(np.full((32, 32, 3), -1.0), scene)
    with pytest.raises(ValueError, match="HxWx3"):
        S.score(np.zeros((3, 32, 32), dtype=np.uint8), scene)


def test_write_shapes_mds_is_idempotent_and_holds_only_training_scenes(tmp_path):
    from streaming import StreamingDataset

    root = tmp_path / "shapes"
    params = S.write_shapes_mds(root, n_train=60, size=32, seed=3)
    index = root / "train" / "index.json"
    stamp = index.stat().st_mtime_ns
    assert S.write_shapes_mds(root, n_train=60, size=32, seed=3) == params
    assert index.stat().st_mtime_ns == stamp  # reused, not rewritten
    train = set(S.train_scenes(1)) | set(S.train_scenes(2))
    dataset = StreamingDataset(local=str(root / "train"), batch_size=1)
    assert dataset.num_samples == 60
    for i in range(60):
        sample = dataset[i]
        scene = S.Scene.from_json(sample["scene"])
        assert scene in train
        assert all(f"{o.colour} {o.shape}" in sample["caption"] for o in scene.objects)
        from composer_prx.data.dataset import decode_image

        assert S.score(np.asarray(decode_image(sample["image"])[0]), scene)["all"] == 1.0
    prompts = S.load_eval_prompts(root)
    assert {s for _, s in prompts} == set(S.heldout_scenes(1)) | set(S.heldout_scenes(2))
    assert len(S.load_eval_prompts(root, n_objects=1)) == len(S.heldout_scenes(1))
    del dataset
    S.write_shapes_mds(root, n_train=61, size=32, seed=3)  # other parameters: rewritten
    assert json.loads((root / "params.json").read_text())["n_train"] == 61
    assert not os.path.exists(str(root / "train") + ".tmp")


def test_build_shapes_dataloader_end_to_end(tmp_path):
    root = str(tmp_path / "shapes")
    loader = S.build_shapes_dataloader(batch_size=8, resolution=32, patch_size=4, root=root, n_train=20, seed=5)
    batches = list(loader)
    assert [len(b["caption"]) for b in batches] == [8, 8, 4]
    assert batches[0]["image"].shape == (8, 3, 32, 32)
    assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
    assert os.path.exists(os.path.join(root, "text_encoder"))
    from composer_prx.model.text import load_text_encoder

    encoder = load_text_encoder(os.path.join(root, "text_encoder"), max_length=64)
    emb, mask = encoder.encode(batches[0]["caption"])
    assert emb.shape[0] == 8
    ids = encoder.tokenizer(S.caption_texts()[:50])["input_ids"]
    unk = encoder.tokenizer.convert_tokens_to_ids("[UNK]")
    assert not any(unk in row for row in ids)  # every caption word is in the vocabulary
