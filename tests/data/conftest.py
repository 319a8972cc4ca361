"""Helpers for the data tests: small MDS datasets whose samples carry their identity in the caption."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _streaming_shared_memory():
    """StreamingDataset registers shared memory per local dir; release what a test left behind."""
    import gc

    from streaming.base.util import clean_stale_shared_memory

    yield
    gc.collect()
    clean_stale_shared_memory()


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_buckets(root, sizes: dict[tuple[int, int], int], corrupt: set[int] = frozenset(),
                  extra_columns: dict[str, str] | None = None, make_extra=None, size_limit: int = 1 << 12) -> list[str]:
    """One MDS folder per (height, width) under root with captions "sample-<i>"; returns all captions.

    Samples whose global number is in ``corrupt`` get undecodable image bytes (their captions are
    still returned). ``make_extra(i) -> dict`` fills ``extra_columns``. ``size_limit``: shard bytes.
    """
    from streaming import MDSWriter

    columns = {"image": "bytes", "caption": "str", "width": "int", "height": "int", **(extra_columns or {})}
    captions, i = [], 0
    buckets = []
    for (height, width), count in sizes.items():
        name = f"h{height}_w{width}"
        buckets.append({"name": name, "height": height, "width": width, "num_samples": count})
        with MDSWriter(out=os.path.join(root, name), columns=columns, size_limit=size_limit) as writer:
            for _ in range(count):
                rng = np.random.default_rng(i)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                image = b"not an image" + bytes([i % 256]) if i in corrupt else encode(pixels)
                sample = {"image": image, "caption": f"sample-{i}", "width": width, "height": height}
                if make_extra is not None:
                    sample.update(make_extra(i))
                writer.write(sample)
                captions.append(f"sample-{i}")
                i += 1
    with open(os.path.join(root, "buckets.json"), "w") as f:
        json.dump({"buckets": buckets}, f)
    return captions
