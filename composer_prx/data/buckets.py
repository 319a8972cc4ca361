"""Aspect-ratio buckets on the patch grid: the one table used by the converter and the dataset.

For a base resolution R and patch p the budget is n² tokens with n = R / p. A bucket is
(height, width) in pixels, both multiples of p, with (height / p) * (width / p) <= n² and aspect
ratio width / height within [1 / max_ratio, max_ratio] (1:2 ... 2:1 by default). For each token
height the widest width that fits the budget is kept, so every bucket uses the budget as fully as
the grid allows:

    R=512, p=32 (n=16):  11x22 12x21 13x19 14x18 15x17 16x16 17x15 18x14 19x13 21x12 22x11 (tokens)

A bucket at one base maps to another base by nearest log aspect ratio (``map_bucket``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, order=True)
class Bucket:
    """One aspect-ratio bucket in pixels (height, width), both multiples of the patch size."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def name(self) -> str:
        """Folder name used for the bucket's MDS directory, e.g. "h512_w512"."""
        return f"h{self.height}_w{self.width}"

    @classmethod
    def from_name(cls, name: str) -> "Bucket":
        """Inverse of ``name``."""
        try:
            h, w = name.split("_")
            if not (h.startswith("h") and w.startswith("w")):
                raise ValueError
            return cls(int(h[1:]), int(w[1:]))
        except ValueError as exc:
            raise ValueError(f"bucket folder name {name!r} is not of the form 'h<height>_w<width>'") from exc

    def tokens(self, patch_size: int) -> int:
        """Number of patch tokens, (height / p) * (width / p)."""
        return (self.height // patch_size) * (self.width // patch_size)


def _check(base_resolution: int, patch_size: int, max_ratio: float) -> None:
    if patch_size <= 0 or base_resolution <= 0:
        raise ValueError(f"base_resolution and patch_size must be positive, got {base_resolution}, {patch_size}")
    if base_resolution % patch_size:
        raise ValueError(f"base_resolution {base_resolution} is not a multiple of patch_size {patch_size}; "
                         f"use e.g. {base_resolution // patch_size * patch_size or patch_size}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (e.g. 2.0 for 1:2 ... 2:1), got {max_ratio}")


@lru_cache(maxsize=64)
def bucket_table(base_resolution: int, patch_size: int, max_ratio: float = 2.0) -> tuple[Bucket, ...]:
    """All buckets for a base resolution and patch size, sorted by aspect ratio (tall -> wide)."""
    _check(base_resolution, patch_size, max_ratio)
    n = base_resolution // patch_size
    budget = n * n
    candidates = set()  # (token height, widest token width within budget and ratio)
    for h in range(1, int(n * max_ratio) + 2):
        w = min(budget // h, int(math.floor(h * max_ratio)))
        if w >= 1 and h <= w * max_ratio:
            candidates.add((h, w))
    # Pareto front: drop a bucket when another is at least as tall and as wide
    front = [(h, w) for h, w in candidates
             if not any(h2 >= h and w2 >= w and (h2, w2) != (h, w) for h2, w2 in candidates)]
    buckets = {Bucket(h * patch_size, w * patch_size) for h, w in front}
    return tuple(sorted(buckets, key=lambda b: (b.aspect, b.height)))


def nearest_bucket(height: int, width: int, base_resolution: int, patch_size: int,
                   max_ratio: float = 2.0) -> Bucket:
    """The bucket whose aspect ratio is closest (in log space) to height x width; ties -> larger area."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    log_aspect = math.log(width / height)
    table = bucket_table(base_resolution, patch_size, max_ratio)
    return min(table, key=lambda b: (abs(math.log(b.aspect) - log_aspect), -b.height * b.width))


def map_bucket(bucket: Bucket, base_resolution: int, patch_size: int, max_ratio: float = 2.0) -> Bucket:
    """The same aspect ratio at another base, e.g. a 1024-base bucket -> its 512-base bucket."""
    return nearest_bucket(bucket.height, bucket.width, base_resolution, patch_size, max_ratio)
