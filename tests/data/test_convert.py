"""Converter: folder / WebDataset / parquet -> bucketed MDS; rejects reported by name; round trip; quality."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from composer_prx.data.buckets import Bucket, bucket_table
from composer_prx.data.convert import ConvertConfig, convert, encode_image, main, resize_to_bucket
from composer_prx.data.dataset import build_dataloader
from tests.data.conftest import encode

SMALL = ConvertConfig(base_resolution=64, patch_size=8, format="png")
SIZES = [(40, 80), (64, 64), (90, 50), (30, 70), (128, 96), (50, 50)]


def make_folder(root, n=500, corrupt_every=40, uncaptioned_every=41, seed=0):
    """n mixed-size images with .txt (and some .json) captions; ~5% corrupt or without caption."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    good, bad = [], {}
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        name = f"img{i:04d}.png"
        if i % corrupt_every == 7:
            data, bad[name] = b"\x89PNG broken" + bytes(rng.integers(0, 256, 20, dtype=np.uint8)), "undecodable"
        else:
            data = encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        if i % uncaptioned_every == 3 and name not in bad:
            bad[name] = "missing caption"
        elif name not in bad or i % 2:
            with open(os.path.join(root, f"img{i:04d}.txt"), "w") as f:
                f.write(f"caption {i}")
            if i % 10 == 0:
                with open(os.path.join(root, f"img{i:04d}.json"), "w") as f:
                    json.dump({"short": f"short {i}", "score": 3}, f)
        if name not in bad:
            good.append(f"caption {i}")
    return good, bad


def test_folder_round_trip_covers_every_sample_once_and_reports_rejects(tmp_path):
    good, bad = make_folder(tmp_path / "in")
    assert 0.04 <= len(bad) / 500 <= 0.06
    summary = convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL, workers=2)
    rejected = dict(summary.rejected)
    assert set(rejected) == set(bad)
    for name, reason in bad.items():
        assert rejected[name].startswith(reason)
    assert sum(summary.written.values()) == len(good)
    assert summary.caption_columns == ["caption", "short"]  # all caption columns kept, non-strings dropped
    table = set(bucket_table(64, 8))
    assert {Bucket.from_name(n) for n in summary.written} <= table and len(summary.written) >= 4
    manifest = json.loads((tmp_path / "out" / "buckets.json").read_text())
    assert {b["name"]: b["num_samples"] for b in manifest["buckets"]} == summary.written

    loader = build_dataloader(None, str(tmp_path / "out"), batch_size=8, resolution=32, patch_size=8, seed=1)
    batches = list(loader)
    seen = [c for b in batches for c in b["caption"]]
    assert sorted(seen) == sorted(good)
    assert all(len({tuple(i.shape) for i in b["image"]}) == 1 for b in batches)
    assert loader.dataset.num_corrupt == 0


def test_rerun_is_idempotent_and_changed_settings_rewrite(tmp_path):
    make_folder(tmp_path / "in", n=30)
    convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL)
    index = next((tmp_path / "out").glob("*/index.json"))
    stamp = index.stat().st_mtime_ns
    again = convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL)
    assert again.skipped_existing and index.stat().st_mtime_ns == stamp
    assert sum(again.written.values()) > 0
    jpeg = convert([str(tmp_path / "in")], str(tmp_path / "out"), ConvertConfig(64, 8, format="jpeg", quality=50))
    assert not jpeg.skipped_existing
    assert json.loads((tmp_path / "out" / "buckets.json").read_text())["format"] == "jpeg"


@pytest.mark.parametrize("fmt,quality", [("jpeg", 30), ("jpeg", 90), ("webp", 40)])
def test_stored_bytes_use_the_stated_quality(tmp_path, fmt, quality):
    from PIL import Image
    from streaming import StreamingDataset

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "in")
    smooth = (np.add.outer(np.arange(64), np.arange(64)) * 2 % 256).astype(np.uint8)
    pixels = np.stack([smooth, smooth.T, 255 - smooth], -1) + rng.integers(0, 8, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "in" / "a.png").write_bytes(encode(pixels))
    (tmp_path / "in" / "a.txt").write_text("a caption")
    convert([str(tmp_path / "in")], str(tmp_path / "out"), ConvertConfig(64, 8, format=fmt, quality=quality))
    stored = StreamingDataset(local=str(tmp_path / "out" / "h64_w64"), batch_size=1)[0]["image"]
    expected = encode_image(resize_to_bucket(Image.open(io.BytesIO(encode(pixels))).convert("RGB"),
                                             Bucket(64, 64)), fmt, quality)
    assert stored == expected  # encoded once, at the stated quality
    if fmt == "jpeg":
        reference = Image.open(io.BytesIO(encode_image(Image.fromarray(pixels), "jpeg", quality))).quantization
        assert Image.open(io.BytesIO(stored)).quantization == reference


def test_webdataset_and_parquet_inputs_via_cli(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(6):
            members = {"png": encode(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)),
                       "json": json.dumps({"caption": f"tar {i}", "long_caption": f"tar long {i}"}).encode()}
            if i == 4:
                members["png"] = b"corrupt"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = pa.table({"image": [{"bytes": encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "path": "p"}
                                for _ in range(5)],
                      "caption": [f"pq {i}" if i != 2 else None for i in range(5)],
                      "long_caption": [f"pq long {i}" if i != 2 else None for i in range(5)]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    summary = main([str(tmp_path / "shard-000.tar"), str(tmp_path / "part-0.parquet"), "--out",
                    str(tmp_path / "out"), "--base-resolution", "64", "--patch-size", "8", "--workers", "1"])
    printed = capsys.readouterr().out
    assert "shard-000.tar:s004: undecodable image" in printed and "part-0.parquet:2: missing caption" in printed
    assert sum(summary.written.values()) == 9 and summary.caption_columns == ["caption", "long_caption"]
    loader = build_dataloader(None, str(tmp_path / "out"), batch_size=4, resolution=32, patch_size=8,
                              caption_columns={"caption": 1.0, "long_caption": 1.0})
    captions = [c for b in loader for c in b["caption"]]
    ids = sorted(c.replace("long ", "") for c in captions)
    assert ids == sorted([f"tar {i}" for i in range(6) if i != 4] + [f"pq {i}" for i in range(5) if i != 2])
