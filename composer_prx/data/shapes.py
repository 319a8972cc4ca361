"""Synthetic "shapes" text-to-image data: coloured shapes at named grid positions, long captions.

A scene is 1-2 objects (colour, shape, cell of a 3x3 grid) on a plain white background. Everything
is deterministic: the held-out scene specs (never in training), the captions (per variant), the
rendering (per seed) and the analytic scorer that checks generated pixels against a scene.

    spec  --caption(variant)-->  "A red circle in the top left corner of a plain white image, ..."
      |
      +--render(scene, size)-->  uint8 [H, W, 3]  --score(image, scene)-->  {colour, position, shape}

Held-out split (``heldout_scenes``): ~15% of the single-object specs (colour, shape, position) and
~10% of the two-object specs made of training objects, chosen by a hash of the spec so the split does
not depend on enumeration order. Two-object scenes containing a held-out object are in neither set.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
# Palette chosen far apart in RGB (min pairwise distance ~115) so a pixel's nearest colour is clear.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Row-major 3x3 grid; index = 3 * row + col.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left area"),
    "top": ("at the top", "at the top center", "in the upper middle part"),
    "top right": ("in the top right corner", "at the top right", "in the upper right area"),
    "left": ("on the left", "at the middle of the left side", "in the left center area"),
    "center": ("in the center", "in the middle", "right at the center"),
    "right": ("on the right", "at the middle of the right side", "in the right center area"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left area"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle part"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right area"),
}
# Object extent as a fraction of a grid cell (a cell is 1/3 of the image side); render jitter bounds.
OBJECT_EXTENT = 0.84
MAX_JITTER = 0.015  # centre offset, fraction of a cell; extent * max scale / 2 + jitter < 0.5
SCALE_RANGE = (0.95, 1.03)
HELDOUT_SINGLE_FRACTION = 0.15
HELDOUT_PAIR_FRACTION = 0.10
N_CAPTION_VARIANTS = 6
SHAPES_FORMAT_VERSION = 1


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One object: a named colour, a shape and a cell of the 3x3 grid."""

    colour: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour {self.colour!r} is not one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {list(SHAPES)}")
        if self.position not in POSITIONS:
            raise ValueError(f"position {self.position!r} is not one of {list(POSITIONS)}")

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the object's grid cell."""
        return divmod(POSITIONS.index(self.position), 3)

    def phrase(self, variant: int) -> str:
        """"a red circle in the top left corner" with the position wording picked by ``variant``."""
        where = POSITION_PHRASES[self.position]
        return f"a {self.colour} {self.shape} {where[variant % len(where)]}"


@dataclass(frozen=True)
class Scene:
    """1-2 objects in distinct cells; ``objects`` is kept in grid order so equal scenes compare equal."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds 1 or 2 objects, got {len(self.objects)}")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must be in distinct cells, got positions {cells}")
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)

    @classmethod
    def of(cls, *objects: tuple[str, str, str] | ShapeObject) -> "Scene":
        """Scene.of(("red", "circle", "top left"), ("blue", "square", "bottom"))."""
        return cls(tuple(o if isinstance(o, ShapeObject) else ShapeObject(*o) for o in objects))

    def key(self) -> str:
        """Canonical spec string, e.g. "red circle @ top left | blue square @ bottom"."""
        return " | ".join(f"{o.colour} {o.shape} @ {o.position}" for o in self.objects)

    def to_json(self) -> list[list[str]]:
        return [[o.colour, o.shape, o.position] for o in self.objects]

    @classmethod
    def from_json(cls, spec: str | list) -> "Scene":
        """Inverse of ``to_json``; also accepts the JSON text."""
        items = json.loads(spec) if isinstance(spec, str) else spec
        return cls.of(*(tuple(item) for item in items))

    def caption(self, rng_or_variant: int | np.random.Generator = 0) -> str:
        """A long descriptive caption; the wording is chosen by an int variant or drawn from an rng."""
        if isinstance(rng_or_variant, np.random.Generator):
            variant = int(rng_or_variant.integers(0, N_CAPTION_VARIANTS * 3))
        elif isinstance(rng_or_variant, (int, np.integer)):
            variant = int(rng_or_variant)
        else:
            raise TypeError(f"caption() takes an int variant or numpy Generator, got {type(rng_or_variant)}")
        template, wording = variant % N_CAPTION_VARIANTS, variant // N_CAPTION_VARIANTS
        phrases = [o.phrase(wording + i) for i, o in enumerate(self.objects)]
        first = phrases[0]
        both = first if len(phrases) == 1 else f"{first}, and {phrases[1]}"
        count = "a single shape" if len(phrases) == 1 else "two shapes"
        if template == 0:
            text = f"{both} of a plain white image"
            return text[0].upper() + text[1:] + "."
        if template == 1:
            return f"A plain white background with {both}."
        if template == 2:
            return f"A simple flat illustration of {count} on a white canvas: {both}."
        if template == 3:
            return f"On an empty white image there is {both}, drawn with clean solid colours."
        if template == 4:
            return f"Minimalist picture, white background, {count}: {both}. No other objects."
        return f"A clean digital drawing showing {both}, everything else is plain white."


def _spec_fraction(key: str) -> float:
    """Stable pseudo-random number in [0, 1) from a spec string (sha256), independent of ordering."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)


def all_objects() -> list[ShapeObject]:
    """Every (colour, shape, position) combination, in a fixed order."""
    return [ShapeObject(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def _is_heldout_single(obj: ShapeObject) -> bool:
    return _spec_fraction("single:" + Scene((obj,)).key()) < HELDOUT_SINGLE_FRACTION


def _pairs(objects: list[ShapeObject]) -> list[Scene]:
    return [Scene((a, b)) for a, b in itertools.combinations(objects, 2) if a.position != b.position]


def heldout_scenes(n_objects: int) -> list[Scene]:
    """Scenes never used in training: ~15% of single objects, or ~10% of pairs of training objects."""
    if n_objects == 1:
        return [Scene((o,)) for o in all_objects() if _is_heldout_single(o)]
    if n_objects == 2:
        seen = [o for o in all_objects() if not _is_heldout_single(o)]
        return [s for s in _pairs(seen) if _spec_fraction("pair:" + s.key()) < HELDOUT_PAIR_FRACTION]
    raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")


def train_scenes(n_objects: int) -> list[Scene]:
    """All training scenes with ``n_objects`` objects (the complement of the held-out and excluded specs)."""
    seen = [o for o in all_objects() if not _is_heldout_single(o)]
    if n_objects == 1:
        return [Scene((o,)) for o in seen]
    if n_objects == 2:
        return [s for s in _pairs(seen) if _spec_fraction("pair:" + s.key()) >= HELDOUT_PAIR_FRACTION]
    raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")


SQUARE_SIDE = 0.9  # a square's side relative to the extent (it looks bigger than a circle of equal extent)


def _inside(shape: str, dy: np.ndarray, dx: np.ndarray, half: float) -> np.ndarray:
    """Points (dy, dx) from the shape's box centre that fall inside a shape of half-extent ``half``."""
    if shape == "circle":
        return dy * dy + dx * dx <= half * half
    if shape == "square":
        side = SQUARE_SIDE * half
        return (np.abs(dy) <= side) & (np.abs(dx) <= side)
    # upward isosceles triangle: apex at the top, base at the bottom, width == height == 2 * half
    return (dy >= -half) & (dy <= half) & (np.abs(dx) <= 0.5 * (dy + half))


def _coverage(shape: str, height: int, width: int, centre: tuple[float, float], half: float,
              supersample: int) -> np.ndarray:
    """Fraction in [0, 1] of each pixel of a height x width grid covered by the shape (box-filtered)."""
    ys = (np.arange(height * supersample, dtype=np.float64) + 0.5) / supersample
    xs = (np.arange(width * supersample, dtype=np.float64) + 0.5) / supersample
    yy, xx = np.meshgrid(ys - centre[0], xs - centre[1], indexing="ij")
    inside = _inside(shape, yy, xx, half).astype(np.float64)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def render(scene: Scene, size: int, rng: np.random.Generator | None = None, supersample: int = 4) -> np.ndarray:
    """Draw the scene as uint8 [size, size, 3]; antialiased by ``supersample``² box filtering.

    Objects span ~OBJECT_EXTENT of their cell (a cell is 1/3 of the side). With ``rng`` each object
    gets a small position/scale jitter (it always stays inside its cell, >= 1 px from its neighbours
    at 32 px); without it the objects are centred in their cells at nominal size.
    """
    if size < 12:
        raise ValueError(f"size must be >= 12 px for shapes to be distinguishable, got {size}")
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    cell = size / 3.0
    for obj in scene.objects:
        if rng is None:
            offset, scale = (0.0, 0.0), 1.0
        else:
            offset = tuple(rng.uniform(-MAX_JITTER, MAX_JITTER, size=2))
            scale = float(rng.uniform(*SCALE_RANGE))
        row, col = obj.cell
        centre = ((row + 0.5 + offset[0]) * cell, (col + 0.5 + offset[1]) * cell)
        alpha = _coverage(obj.shape, size, size, centre, 0.5 * OBJECT_EXTENT * scale * cell, supersample)
        canvas += alpha[..., None] * (np.array(COLOURS[obj.colour], dtype=np.float64) - canvas)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Analytic scoring
# ---------------------------------------------------------------------------------------------------
COLOUR_TOLERANCE = 64.0  # max RGB distance (0-255) of a pixel from a background-colour blend line


def _to_uint8_rgb(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"score() expects an HxWx3 image, got shape {array.shape}; "
                         "convert [3,H,W] tensors with .permute(1, 2, 0)")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must be in [0, 1], got range [{lo:.3f}, {hi:.3f}]; "
                             "map [-1, 1] model output with (x + 1) / 2")
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    raise TypeError(f"score() expects uint8 or float images, got dtype {array.dtype}")


def colour_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette label [H, W] (index into COLOURS, -1 = none) and coverage [H, W, K].

    A pixel p is modelled as a blend b + a (c - b) of the background b and palette colour c. Its coverage
    of c is a when p lies within COLOUR_TOLERANCE of that blend line, else 0; its label is the colour with
    the closest line when that coverage is >= 0.5 (edges are cut at half coverage whatever the colour).
    """
    background = np.array(BACKGROUND, dtype=np.float64)
    direction = np.array(list(COLOURS.values()), dtype=np.float64) - background  # [K, 3]
    offset = image.astype(np.float64)[:, :, None, :] - background  # [H, W, 1, 3]
    alpha = np.clip((offset * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # [H, W, K]
    residual = np.linalg.norm(offset - alpha[..., None] * direction, axis=-1)  # [H, W, K]
    coverage = np.where(residual <= COLOUR_TOLERANCE, alpha, 0.0)
    nearest = residual.argmin(axis=-1)
    best = np.take_along_axis(coverage, nearest[..., None], axis=-1)[..., 0]
    return np.where(best >= 0.5, nearest, -1), coverage


def classify_shape(coverage: np.ndarray) -> str:
    """Shape of one blob from its coverage map [h, w] (float in [0, 1] or bool).

    Each ideal shape is fitted with the blob's area and centroid (circle r = sqrt(A / pi); square side
    sqrt(A); triangle width = height = sqrt(2 A), centroid 1/3 below its box centre) and rendered on the
    same grid; the shape with the smallest L1 difference wins.
    """
    weights = np.asarray(coverage, dtype=np.float64)
    area = weights.sum()
    if area <= 0:
        raise ValueError("classify_shape() needs a non-empty blob")
    ys, xs = np.indices(weights.shape) + 0.5
    cy, cx = (weights * ys).sum() / area, (weights * xs).sum() / area
    fits = {
        "circle": ((cy, cx), np.sqrt(area / np.pi)),
        "square": ((cy, cx), np.sqrt(area) / 2 / SQUARE_SIDE),
        "triangle": ((cy - np.sqrt(area / 2) / 3, cx), np.sqrt(area / 2)),
    }
    errors = {shape: np.abs(_coverage(shape, *weights.shape, centre, half, 8) - weights).sum()
              for shape, (centre, half) in fits.items()}
    return min(errors, key=errors.get)


def score(image: Any, scene: Scene) -> dict[str, Any]:
    """Check an image against its scene from the pixels alone: per object colour, position and shape.

    For each expected colour, the largest 4-connected blobs of pixels labelled with that palette colour
    are matched to the expected objects (nearest cell centre). Colour holds when a blob covers at least
    ~1/3 of a nominal triangle's area; position when its centroid lies in the named cell; shape from the
    best-fitting ideal shape (``classify_shape``) on the blob's coverage (dilated by 1 px for its edges).

    Precision: every blob of any palette colour at least that large is a detected object; those not
    matched to an expected object are extras (a second shape, a stray colour). precision = matched /
    detected (1.0 when nothing is detected), and "all" needs no extras as well as every object right.

    image: uint8 [H, W, 3] or float [H, W, 3] in [0, 1]. Returns {"objects": [per-object dict],
    "colour"/"position"/"shape": fraction of objects right (recall), "extra": unmatched detected objects,
    "precision", "all": 1.0 if every object is right and nothing else is there, "accuracy": mean of all
    per-object booleans}.
    """
    from scipy import ndimage

    pixels = _to_uint8_rgb(image)
    height, width = pixels.shape[:2]
    labels, coverage = colour_coverage(pixels)
    cell_h, cell_w = height / 3.0, width / 3.0
    min_area = max(4.0, 0.16 * (OBJECT_EXTENT * cell_h) * (OBJECT_EXTENT * cell_w))
    colour_names = list(COLOURS)
    blobs_of = {}  # palette index -> (components [H, W], blob sizes [count])
    for k in range(len(colour_names)):
        components, count = ndimage.label(labels == k)
        blobs_of[k] = components, np.bincount(components.ravel(), minlength=count + 1)[1:]
    detected = int(sum((sizes >= min_area).sum() for _, sizes in blobs_of.values()))
    results: list[dict[str, Any]] = [{} for _ in scene.objects]
    for colour in sorted({o.colour for o in scene.objects}):
        k = colour_names.index(colour)
        wanted = [i for i, o in enumerate(scene.objects) if o.colour == colour]
        components, sizes = blobs_of[k]
        blobs = [components == lab + 1 for lab in np.argsort(-sizes)[: len(wanted)] if sizes[lab] >= min_area]
        centroids = [tuple(np.argwhere(b).mean(axis=0) + 0.5) for b in blobs]
        for i in wanted:  # greedy: each expected object takes the closest unclaimed blob
            row, col = scene.objects[i].cell
            target = ((row + 0.5) * cell_h, (col + 0.5) * cell_w)
            if not blobs:
                results[i] = {"colour": False, "position": False, "shape": False,
                              "predicted_shape": None, "centroid": None}
                continue
            j = int(np.argmin([np.hypot(c[0] - target[0], c[1] - target[1]) for c in centroids]))
            blob, (cy, cx) = blobs.pop(j), centroids.pop(j)
            region = ndimage.binary_dilation(blob)
            rows, cols = np.nonzero(region)
            crop = np.where(region, coverage[..., k], 0.0)[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
            predicted = classify_shape(crop)
            in_cell = int(cy // cell_h) == row and int(cx // cell_w) == col
            results[i] = {"colour": True, "position": in_cell, "shape": predicted == scene.objects[i].shape,
                          "predicted_shape": predicted, "centroid": (float(cy), float(cx))}
    summary: dict[str, Any] = {"objects": results}
    for key in ("colour", "position", "shape"):
        summary[key] = float(np.mean([r[key] for r in results]))
    flags = [r[k] for r in results for k in ("colour", "position", "shape")]
    matched = sum(bool(r["colour"]) for r in results)
    summary["extra"] = detected - matched
    summary["precision"] = matched / detected if detected else 1.0
    summary["accuracy"] = float(np.mean(flags))
    summary["all"] = float(all(flags) and summary["extra"] == 0)
    return summary


# ---------------------------------------------------------------------------------------------------
# MDS export
# ---------------------------------------------------------------------------------------------------
SHAPES_COLUMNS = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "scene": "str"}


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_training_scene(rng: np.random.Generator, singles: list[Scene], pairs: list[Scene]) -> Scene:
    """One training scene: 1 or 2 objects with equal probability, spec uniform within that count."""
    pool = singles if rng.random() < 0.5 else pairs
    return pool[int(rng.integers(0, len(pool)))]


def _write_split(out: str, scenes_and_captions: Iterator[tuple[Scene, str, np.ndarray]]) -> int:
    """Write (scene, caption, pixels) triples as one MDS folder via a temporary directory; returns the count."""
    from streaming import MDSWriter

    tmp_dir = out + ".tmp"
    for stale in (tmp_dir, out):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    count = 0
    with MDSWriter(out=tmp_dir, columns=SHAPES_COLUMNS, size_limit=1 << 24) as writer:
        for scene, caption, pixels in scenes_and_captions:
            height, width = pixels.shape[:2]
            writer.write({"image": encode_png(pixels), "caption": caption, "width": width, "height": height,
                          "scene": json.dumps(scene.to_json())})
            count += 1
    os.replace(tmp_dir, out)
    return count


def write_shapes_mds(root: str | os.PathLike, n_train: int, size: int, seed: int = 0) -> dict[str, Any]:
    """Write the shapes dataset under ``root``: train/ (MDS), eval/ (MDS), eval_prompts.json, params.json.

    train/: ``n_train`` samples of training scenes (1 or 2 objects, random caption wording, jittered
    rendering). eval/: every held-out scene once, caption variant 0, no jitter. Columns: image (PNG
    bytes), caption (str), width/height (int), scene (JSON spec). eval_prompts.json: the held-out
    scenes with their captions, for ``load_eval_prompts``. Idempotent: when ``root/params.json``
    records the same (n_train, size, seed, version), nothing is written; other parameters rewrite the
    dataset (logged). Returns the params dict.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    params = {"n_train": int(n_train), "size": int(size), "seed": int(seed), "version": SHAPES_FORMAT_VERSION}
    root = os.fspath(root)
    params_path = os.path.join(root, "params.json")
    if os.path.exists(params_path):
        with open(params_path) as f:
            existing = json.load(f)
        complete = all(os.path.exists(os.path.join(root, d, "index.json")) for d in ("train", "eval"))
        if existing == params and complete:
            log.info("shapes dataset at %s already complete with %s; reusing it", root, params)
            return params
        log.warning("shapes dataset at %s has params %s, requested %s: rewriting it", root, existing, params)
        os.remove(params_path)  # params.json is the completion marker: remove it before touching data
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    singles, pairs = train_scenes(1), train_scenes(2)

    def train_samples() -> Iterator[tuple[Scene, str, np.ndarray]]:
        for _ in range(n_train):
            scene = sample_training_scene(rng, singles, pairs)
            yield scene, scene.caption(rng), render(scene, size, rng=rng)

    heldout = [s for n in (1, 2) for s in heldout_scenes(n)]
    _write_split(os.path.join(root, "train"), train_samples())
    _write_split(os.path.join(root, "eval"), ((s, s.caption(0), render(s, size)) for s in heldout))
    prompts = [{"caption": s.caption(0), "scene": s.to_json(), "n_objects": len(s.objects)} for s in heldout]
    with open(os.path.join(root, "eval_prompts.json"), "w") as f:
        json.dump(prompts, f, indent=0)
    with open(params_path, "w") as f:
        json.dump(params, f)
    log.info("wrote %d shapes training samples and %d held-out scenes at %d px to %s",
             n_train, len(heldout), size, root)
    return params


def caption_texts() -> list[str]:
    """Captions covering every word any shapes caption can use (for building a word-level tokenizer)."""
    singles = [Scene((o,)) for o in all_objects()]
    pair = Scene.of(("red", "circle", "top left"), ("blue", "square", "bottom"))
    variants = range(N_CAPTION_VARIANTS * 3)
    return [s.caption(v) for s in singles for v in variants] + [pair.caption(v) for v in variants]


def write_folder_once(folder: str, write: Callable[[str], Any]) -> str:
    """`folder`, made by write(folder + ".tmp") and renamed into place if it does not exist yet."""
    if not os.path.exists(folder):
        if os.path.exists(folder + ".tmp"):  # left by an interrupted run
            shutil.rmtree(folder + ".tmp")
        write(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    return folder


def build_shapes_dataloader(batch_size: int, resolution: int, patch_size: int, root: str, *, n_train: int = 20000,
                            size: int | None = None, seed: int = 17, split: str = "train", num_workers: int = 0,
                            data_seed: int = 0, text_encoder: bool = True, teacher_steps: int = 0):
    """Write the shapes data under ``root`` if needed (local rank 0) and return its DataLoader.

    size: rendering size (default: ``resolution``). split: "train" (shuffled) or "eval" (held-out
    scenes, in order). data_seed: rendering seed (``seed`` shuffles). With ``text_encoder`` a tiny
    word-level encoder over the shapes vocabulary is written to ``root/text_encoder`` when absent
    (``model.text.save_word_level_encoder`` defaults: hidden 64). With ``teacher_steps`` > 0 the stand-in
    REPA / DINO teacher (``shapes_teacher``) is trained for that many steps into ``root/teacher`` when
    absent, so a config can name it. Batches as ``dataset.build_dataloader``.
    """
    from composer.utils import dist

    from composer_prx.data.dataset import build_dataloader

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if dist.get_local_rank() == 0:
        write_shapes_mds(root, n_train, size or resolution, data_seed)
        if text_encoder:
            from composer_prx.model.text import save_word_level_encoder

            write_folder_once(os.path.join(root, "text_encoder"),
                              lambda tmp: save_word_level_encoder(tmp, caption_texts()))
        if teacher_steps > 0:
            from composer_prx.data.shapes_teacher import ensure_shapes_teacher

            ensure_shapes_teacher(root, teacher_steps, size=size or resolution, patch=patch_size)
    dist.barrier()
    return build_dataloader(None, os.path.join(root, split), batch_size=batch_size, resolution=resolution,
                            patch_size=patch_size, shuffle=split == "train", seed=seed, num_workers=num_workers)


def load_eval_prompts(root: str | os.PathLike, n_objects: int | None = None) -> list[tuple[str, Scene]]:
    """(caption, scene) pairs from ``root/eval_prompts.json``, optionally only those with ``n_objects``."""
    path = os.path.join(os.fspath(root), "eval_prompts.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; create it with write_shapes_mds(root, ...)")
    with open(path) as f:
        items = json.load(f)
    return [(item["caption"], Scene.from_json(item["scene"])) for item in items
            if n_objects is None or item["n_objects"] == n_objects]
