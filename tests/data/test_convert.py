"""Converter: folder / WebDataset / parquet -> bucketed MDS; rejects reported by name; round trip; quality."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from composer_prx.data.buckets import Bucket, bucket_table
from composer_prx.data.convert import ConvertConfig, convert, encode_image, main
from composer_prx.data.imaging import resize_to_bucket
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
    assert summary.caption_columns == ["caption"]  # "short" is not a caption name; non-strings dropped
    assert summary.ignored_columns == ["short"]
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


# --- issue 11: never destroy or mis-train on user data ----------------------------------------------
def _captioned_images(folder, n=3, size=(32, 48)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"im{i}.png").write_bytes(encode(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
        (folder / f"im{i}.txt").write_text(f"caption {i}")


def test_refuses_a_non_empty_out_it_did_not_write_and_keeps_foreign_files(tmp_path):
    work = tmp_path / "work"
    _captioned_images(work / "raw")
    (work / "notes.md").write_text("my notes")
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    with pytest.raises(FileExistsError, match="not an output of this converter"):
        convert([str(work / "raw")], str(work), SMALL)
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before  # nothing touched

    out = tmp_path / "out"
    convert([str(work / "raw")], str(out), SMALL)
    (out / "README.txt").write_text("user file next to the converter's output")
    convert([str(work / "raw")], str(out), ConvertConfig(64, 8, format="jpeg"))  # a rewrite of its own output
    assert (out / "README.txt").read_text().startswith("user file")
    assert json.loads((out / "buckets.json").read_text())["format"] == "jpeg"


def test_caption_columns_follow_one_rule_recorded_for_the_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    n = 6
    pq.write_table(pa.table({
        "image": [encode(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n)],
        "prompt": [f"prompt {i}" for i in range(n)],
        "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "source": ["laion"] * n,
    }), tmp_path / "part.parquet")
    summary = convert([str(tmp_path / "part.parquet")], str(tmp_path / "out"), SMALL)
    assert summary.caption_columns == ["prompt"] and summary.ignored_columns == ["source", "url"]
    assert json.loads((tmp_path / "out" / "buckets.json").read_text())["caption_columns"] == ["prompt"]
    assert json.loads((tmp_path / "out" / "convert_summary.json").read_text())["caption_columns"] == ["prompt"]
    loader = build_dataloader(None, str(tmp_path / "out"), batch_size=2, resolution=32, patch_size=8)
    captions = sorted(c for b in loader for c in b["caption"])
    assert captions == sorted(f"prompt {i}" for i in range(n)) and loader.dataset.num_corrupt == 0
    from streaming import StreamingDataset

    stored = StreamingDataset(local=str(next((tmp_path / "out").glob("h*"))), batch_size=1)
    assert {stored[i]["source"] for i in range(len(stored))} == {f"part.parquet:{i}" for i in range(n)}
    with pytest.raises(ValueError, match="sample fields"):
        ConvertConfig(caption_columns=("caption", "source"))
    with pytest.raises(ValueError, match=r"\['url'\] are not string columns|not string columns"):
        build_dataloader(None, str(tmp_path / "out"), batch_size=2, resolution=32, patch_size=8,
                         caption_columns=["prompt", "nope"])


def test_side_car_fields_never_overwrite_sample_fields(tmp_path):
    _captioned_images(tmp_path / "in", n=2)
    (tmp_path / "in" / "im0.json").write_text(json.dumps({"width": "huge", "source": "web", "image": "x.png"}))
    summary = convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL)
    assert summary.caption_columns == ["caption"] and summary.ignored_columns == ["image", "source", "width"]
    batch = next(iter(build_dataloader(None, str(tmp_path / "out"), batch_size=2, resolution=64, patch_size=8)))
    assert sorted(batch["caption"]) == ["caption 0", "caption 1"]


def test_exif_orientation_and_alpha_are_applied(tmp_path):
    from PIL import Image
    from streaming import StreamingDataset

    os.makedirs(tmp_path / "in")
    # stored landscape 64x32 with EXIF orientation 6 (rotate 90 cw to display): displayed portrait 32x64
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # left half red -> top half once displayed
    stored[:, 32:] = (0, 0, 255)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "in" / "phone.jpg", format="JPEG", quality=95, exif=exif)
    (tmp_path / "in" / "phone.txt").write_text("a phone photo")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (0, 200, 0, 255)  # opaque green square on a fully transparent (black) background
    (tmp_path / "in" / "logo.png").write_bytes(encode(rgba))
    (tmp_path / "in" / "logo.txt").write_text("a logo")
    summary = convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL)
    portrait = [Bucket.from_name(n) for n in summary.written if Bucket.from_name(n).height > Bucket.from_name(n).width]
    assert len(portrait) == 1, summary.written  # the phone photo lands in a portrait bucket
    phone = StreamingDataset(local=str(tmp_path / "out" / portrait[0].name), batch_size=1)[0]["image"]
    pixels = np.asarray(Image.open(io.BytesIO(phone)).convert("RGB")).astype(int)
    h = pixels.shape[0]
    assert pixels[: h // 3, :, 0].mean() > 200 and pixels[-h // 3:, :, 2].mean() > 200  # red on top, blue below
    logo = StreamingDataset(local=str(tmp_path / "out" / "h64_w64"), batch_size=1)[0]["image"]
    pixels = np.asarray(Image.open(io.BytesIO(logo)).convert("RGB")).astype(int)
    assert pixels[:8, :8].min() == 255  # transparent corner composited on white, not black
    assert abs(pixels[32, 32] - np.array([0, 200, 0])).max() < 5


def test_interrupted_rewrite_is_refused_by_the_dataset(tmp_path, monkeypatch):
    import composer_prx.data.convert as convert_module

    make_folder(tmp_path / "in", n=40)
    convert([str(tmp_path / "in")], str(tmp_path / "out"), SMALL)
    real = convert_module.convert_sample
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert_module, "convert_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert([str(tmp_path / "in")], str(tmp_path / "out"), ConvertConfig(64, 8, format="jpeg"))
    assert json.loads((tmp_path / "out" / "convert.json").read_text()) == {"status": "in_progress"}
    with pytest.raises(RuntimeError, match="in_progress"):
        build_dataloader(None, str(tmp_path / "out"), batch_size=4, resolution=32, patch_size=8)
    monkeypatch.setattr(convert_module, "convert_sample", real)
    assert not convert([str(tmp_path / "in")], str(tmp_path / "out"), ConvertConfig(64, 8, format="jpeg")
                       ).skipped_existing  # a re-run completes it


def test_bad_files_become_listed_rejects_and_every_input_is_reported(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "in"
    _captioned_images(folder, n=2)
    rng = np.random.default_rng(3)
    big = encode(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    (folder / "bomb.png").write_bytes(big)
    (folder / "bomb.txt").write_text("too many pixels")
    os.symlink(folder / "gone.png", folder / "dangling.png")  # unreadable file
    (folder / "dangling.txt").write_text("unreadable")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "scan.tif")
    (folder / "scan.txt").write_text("a tiff")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P").save(folder / "anim.gif")
    (folder / "anim.txt").write_text("a gif")
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "photo.txt").write_text("heic")
    (folder / "orphan.txt").write_text("a caption without its image")
    tar_path = tmp_path / "broken.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            for ext, data in {"png": encode(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)),
                              "txt": f"tar {i}".encode()}.items():
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) * 3 // 5])  # truncated in the middle of a member
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 80x80 > 2x the limit: DecompressionBombError
    summary = convert([str(folder), str(tar_path)], str(tmp_path / "out"), SMALL)
    rejected = dict(summary.rejected)
    assert rejected["bomb.png"].startswith("too large")
    assert rejected["dangling.png"].startswith("unreadable file")
    assert rejected["photo.heic"].startswith("unsupported image type")
    assert rejected["orphan.txt"].startswith("caption without image")
    assert rejected["broken.tar"].startswith("corrupt tar")
    assert "scan.tif" not in rejected and "anim.gif" not in rejected
    loader = build_dataloader(None, str(tmp_path / "out"), batch_size=2, resolution=32, patch_size=8)
    captions = sorted(c for b in loader for c in b["caption"])
    assert {"a tiff", "a gif", "caption 0", "caption 1", "tar 0"} <= set(captions)
    assert len(captions) == sum(summary.written.values())


def test_rerun_with_caption_columns_is_skipped_and_says_so(tmp_path, capsys):
    _captioned_images(tmp_path / "in", n=3)
    args = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--base-resolution", "64", "--patch-size", "8",
            "--workers", "1", "--caption-columns", "caption"]
    main(args)
    capsys.readouterr()
    again = main(args)
    printed = capsys.readouterr().out
    assert again.skipped_existing and sum(again.written.values()) == 3
    assert "up to date" in printed and "nothing written" in printed and "wrote 0" not in printed
