"""Image handling shared by the converter and the dataset: orientation, alpha, aspect-preserving resize.

    encoded bytes --open (header only)--> target bucket --JPEG draft (decode at 1/2, 1/4, 1/8 when it
    still covers the target)--> decode --EXIF orientation--> RGB (alpha composited on BACKGROUND)
    --scale to cover (antialiased bicubic)--> centre crop to exactly the bucket

One rule for both halves: what the converter stores and what the dataset trains on go through
``to_rgb`` and ``resize_to_bucket``.
"""

from __future__ import annotations

import io
from typing import Callable

import torch

from composer_prx.data.buckets import Bucket

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# EXIF orientations that swap width and height (rotations by 90 / 270 degrees, with or without a flip)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def oriented_size(image: "Image.Image") -> tuple[int, int]:  # noqa: F821 - PIL imported lazily
    """(width, height) as displayed, i.e. after the EXIF orientation; read from the header, no decode."""
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def to_rgb(image: "Image.Image", background: tuple[int, int, int] = BACKGROUND) -> "Image.Image":  # noqa: F821
    """Apply the EXIF orientation, then RGB; transparent pixels are composited on ``background``."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """Smallest (width, height) with the image's aspect ratio that covers the bucket."""
    scale = max(bucket.width / width, bucket.height / height)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def resize_to_bucket(image: "Image.Image", bucket: Bucket) -> "Image.Image":  # noqa: F821
    """Scale to cover the bucket keeping the aspect ratio (antialiased bicubic), then centre-crop to it."""
    from PIL import Image

    if image.size == (bucket.width, bucket.height):
        return image
    new_w, new_h = cover_size(*image.size, bucket)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - bucket.width) // 2, (new_h - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height))


def load_for_bucket(data: bytes, choose_bucket: Callable[[int, int], Bucket],
                    background: tuple[int, int, int] = BACKGROUND
                    ) -> tuple["Image.Image", Bucket, tuple[int, int]]:  # noqa: F821
    """Decode ``data`` into exactly its bucket: (RGB image of bucket size, bucket, displayed (w, h) stored).

    ``choose_bucket(height, width)`` picks the bucket from the displayed size. A JPEG is decoded
    with PIL's draft mode at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the bucket,
    so downscaling skips most of the decode; the final resize is the same antialiased bicubic.
    Raises PIL's errors (UnidentifiedImageError, OSError, DecompressionBombError, ...) unchanged.
    """
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    width, height = oriented_size(image)
    bucket = choose_bucket(height, width)
    if image.format == "JPEG":
        need_w, need_h = cover_size(width, height, bucket)
        if (width, height) != image.size:  # draft works in stored (unrotated) coordinates
            need_w, need_h = need_h, need_w
        image.draft("RGB", (need_w, need_h))
    image.load()
    return resize_to_bucket(to_rgb(image, background), bucket), bucket, (width, height)


def normalise_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1); the one place of this constant."""
    if image.dtype != torch.uint8:
        raise TypeError(f"normalise_image expects uint8 pixels, got {image.dtype}")
    return image.to(torch.float32).div_(127.5).sub_(1.0)
