"""Convert image–caption data to MDS, one folder per aspect-ratio bucket (local or s3:// gs:// ...).

    python -m composer_prx.data.convert INPUT [INPUT ...] --out OUT [--base-resolution 1024 --patch-size 32
           --format jpeg --quality 95 --workers 4 --caption-columns caption prompt]

Inputs (mixed freely):
    folder      images (jpg/jpeg/png/webp/bmp) with side-car captions: <stem>.txt -> column "caption",
                <stem>.json -> every string field is a caption column
    *.tar       WebDataset shards: members grouped by key; an image member + .txt / .json members
    *.parquet   an image column (binary, or a struct with "bytes" like HF datasets' Image) + string columns

    sample -> decode -> nearest bucket (data/buckets.py) -> resize to cover + centre crop -> encode ONCE
           -> OUT/h<H>_w<W>/ (MDS: image bytes, caption columns, width, height, source)

OUT/buckets.json lists the buckets, counts and caption columns; OUT/convert_summary.json lists what was
written and every rejected input by name with its reason. Re-running with the same inputs and settings
finds OUT/convert.json and does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from composer_prx.data.buckets import Bucket, nearest_bucket

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
CONVERT_VERSION = 1


@dataclass(frozen=True)
class ConvertConfig:
    """Export settings; ``quality`` is the JPEG/WebP quality actually used for the stored bytes."""

    base_resolution: int = 1024
    patch_size: int = 32
    max_ratio: float = 2.0
    format: str = "jpeg"
    quality: int = 95
    caption_columns: tuple[str, ...] | None = None  # None: every string column / side-car field
    min_side: int = 0  # reject images whose shorter side is smaller (0: keep all)
    shard_size: int = 1 << 26  # bytes per MDS shard before a new one starts

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {sorted(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.base_resolution % self.patch_size:
            raise ValueError(f"base_resolution {self.base_resolution} must be a multiple of patch_size "
                             f"{self.patch_size}")


@dataclass
class RawSample:
    """One input before conversion: a name for reports, encoded image bytes (or None) and caption columns."""

    name: str
    image: bytes | None
    captions: dict[str, str]
    error: str | None = None  # a problem found while reading the input (e.g. unreadable side-car)


@dataclass
class ConvertSummary:
    written: dict[str, int] = field(default_factory=dict)  # bucket name -> samples
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (input name, reason)
    caption_columns: list[str] = field(default_factory=list)
    skipped_existing: bool = False

    def report(self) -> str:
        lines = [f"wrote {sum(self.written.values())} samples in {len(self.written)} buckets"]
        lines += [f"  {name}: {count}" for name, count in sorted(self.written.items())]
        lines.append(f"rejected {len(self.rejected)} inputs")
        reasons = Counter(reason.split(":")[0] for _, reason in self.rejected)
        lines += [f"  {reason}: {count}" for reason, count in reasons.most_common()]
        lines += [f"  - {name}: {reason}" for name, reason in self.rejected]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------
def _captions_from_json(text: str, name: str) -> dict[str, str]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: caption json must be an object, got {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def read_folder(folder: str) -> Iterator[RawSample]:
    """Images under ``folder`` (recursive, sorted) with <stem>.txt / <stem>.json side-car captions."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, filename)
            captions: dict[str, str] = {}
            error = None
            txt, js = os.path.join(dirpath, stem + ".txt"), os.path.join(dirpath, stem + ".json")
            try:
                if os.path.exists(js):
                    with open(js, encoding="utf-8") as f:
                        captions.update(_captions_from_json(f.read(), js))
                if os.path.exists(txt):
                    with open(txt, encoding="utf-8") as f:
                        captions["caption"] = f.read().strip()
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                error = f"unreadable caption side-car: {exc}"
            with open(path, "rb") as f:
                image = f.read()
            yield RawSample(os.path.relpath(path, folder), image, captions, error)


def read_webdataset(path: str) -> Iterator[RawSample]:
    """Samples of one WebDataset .tar: members sharing a key (name up to the first dot) form a sample."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(member.name), key)
            if key not in groups:
                groups[key], order = {}, order + [key]
            extracted = tar.extractfile(member)
            groups[key][ext.lower()] = extracted.read() if extracted is not None else b""
    for key in order:
        members = groups[key]
        name = f"{os.path.basename(path)}:{key}"
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in members), None)
        captions, error = {}, None
        try:
            if "json" in members:
                captions.update(_captions_from_json(members["json"].decode("utf-8"), name))
            for ext in ("txt", "caption", "caption.txt"):
                if ext in members:
                    captions["caption"] = members[ext].decode("utf-8").strip()
        except (UnicodeDecodeError, ValueError) as exc:
            error = f"unreadable caption member: {exc}"
        yield RawSample(name, image, captions, error)


def read_parquet(path: str, image_column: str | None = None) -> Iterator[RawSample]:
    """Rows of a parquet file: image bytes from ``image_column`` (auto: binary / struct with bytes)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from exc

    file = pq.ParquetFile(path)
    schema = file.schema_arrow
    if image_column is None:
        for fld in schema:
            is_struct_with_bytes = pa.types.is_struct(fld.type) and "bytes" in [f.name for f in fld.type]
            if pa.types.is_binary(fld.type) or pa.types.is_large_binary(fld.type) or is_struct_with_bytes:
                image_column = fld.name
                break
        else:
            raise ValueError(f"{path}: no binary or {{bytes, path}} struct column for images in {schema.names}; "
                             "pass --image-column")
    text_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    row = 0
    for batch in file.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            value = record.get(image_column)
            image = value.get("bytes") if isinstance(value, dict) else value
            captions = {c: record[c] for c in text_columns if isinstance(record.get(c), str)}
            yield RawSample(f"{os.path.basename(path)}:{row}", image, captions)
            row += 1


def read_inputs(inputs: list[str], image_column: str | None = None) -> Iterator[RawSample]:
    """All samples of all inputs, in the given order (folders, .tar, .parquet)."""
    for path in inputs:
        if os.path.isdir(path):
            yield from read_folder(path)
        elif path.endswith(".tar"):
            yield from read_webdataset(path)
        elif path.endswith(".parquet"):
            yield from read_parquet(path, image_column)
        else:
            raise ValueError(f"input {path!r} is not a folder, a .tar (WebDataset) or a .parquet file")


def scan_caption_columns(inputs: list[str]) -> list[str]:
    """Union of caption columns over all inputs (parquet schema, side-car/member json keys, .txt)."""
    columns: set[str] = set()
    for path in inputs:
        if path.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.ParquetFile(path).schema_arrow
            columns.update(f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
            continue
        if os.path.isdir(path):
            for dirpath, _, filenames in os.walk(path):
                for filename in filenames:
                    if filename.endswith(".txt"):
                        columns.add("caption")
                    elif filename.endswith(".json"):
                        try:
                            with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                                columns.update(_captions_from_json(f.read(), filename))
                        except (OSError, UnicodeDecodeError, ValueError):
                            continue  # reported per sample by read_folder
            continue
        with tarfile.open(path) as tar:
            for member in tar:
                ext = os.path.basename(member.name).partition(".")[2].lower()
                if ext in ("txt", "caption", "caption.txt"):
                    columns.add("caption")
                elif ext == "json" and member.isfile():
                    extracted = tar.extractfile(member)
                    try:
                        columns.update(_captions_from_json(extracted.read().decode("utf-8"), member.name))
                    except (UnicodeDecodeError, ValueError):
                        continue  # reported per sample by read_webdataset
    return sorted(columns)


def _fingerprint(inputs: list[str]) -> str:
    """Hash of input paths, sizes and modification times (what a re-run compares)."""
    digest = hashlib.sha256()
    for path in inputs:
        entries = [path] if not os.path.isdir(path) else sorted(
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
        for entry in entries:
            stat = os.stat(entry)
            digest.update(f"{os.path.relpath(entry, path) if entry != path else path}:{stat.st_size}:"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Per-sample conversion (runs in worker processes)
# ---------------------------------------------------------------------------------------------------
def resize_to_bucket(image: "Image.Image", bucket: Bucket) -> "Image.Image":  # noqa: F821
    """Scale to cover the bucket (antialiased bicubic), then centre-crop to exactly bucket size."""
    from PIL import Image

    width, height = image.size
    scale = max(bucket.width / width, bucket.height / height)
    new_w, new_h = max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - bucket.width) // 2, (new_h - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height))


def encode_image(image: "Image.Image", fmt: str, quality: int) -> bytes:  # noqa: F821
    """PIL image -> bytes in ``fmt`` at ``quality`` (JPEG/WebP; PNG is lossless and ignores it)."""
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality} if fmt in ("jpeg", "webp") else {"optimize": False}
    image.save(buffer, format=FORMATS[fmt], **options)
    return buffer.getvalue()


def convert_sample(sample: RawSample, cfg: ConvertConfig, columns: tuple[str, ...]
                   ) -> tuple[str, dict[str, Any]] | tuple[None, str]:
    """(bucket name, MDS row) or (None, reason) for a rejected sample; ``columns`` are the caption columns."""
    from PIL import Image, UnidentifiedImageError

    if sample.error:
        return None, sample.error
    captions = {c: sample.captions.get(c, "").strip() for c in columns}
    if not any(captions.values()):
        return None, "missing caption: no non-empty caption" + (f" in columns {list(columns)}" if columns else "")
    if not sample.image:
        return None, "missing image"
    try:
        image = Image.open(io.BytesIO(sample.image))
        image.load()
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return None, f"undecodable image: {type(exc).__name__}: {exc}"
    if min(image.size) < cfg.min_side:
        return None, f"too small: {image.size[0]}x{image.size[1]} < min_side {cfg.min_side}"
    bucket = nearest_bucket(image.height, image.width, cfg.base_resolution, cfg.patch_size, cfg.max_ratio)
    resized = resize_to_bucket(image, bucket)
    row = {"image": encode_image(resized, cfg.format, cfg.quality), "width": bucket.width,
           "height": bucket.height, "source": sample.name, **captions}
    return bucket.name, row


def _convert_star(args: tuple[RawSample, ConvertConfig, tuple[str, ...]]) -> tuple[str, Any, Any]:
    return (args[0].name, *convert_sample(*args))


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def _upload_tree(local_root: str, remote: str) -> None:
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get((local_root, remote), keep_local=True, exist_ok=True)
    for dirpath, _, filenames in os.walk(local_root):
        for filename in sorted(filenames):
            if filename == "convert.json":
                continue  # completion marker goes last
            uploader.upload_file(os.path.relpath(os.path.join(dirpath, filename), local_root))
    uploader.upload_file("convert.json")


def _is_missing(exc: BaseException) -> bool:
    """True for "object does not exist" errors of the local, S3-style (botocore) and other downloaders."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def fetch_file(remote: str, local: str, timeout: float = 60.0, attempts: int = 3) -> bool:
    """Download one object (any streaming-supported URL or path) to ``local``; False when it does not exist.

    Transient errors are retried ``attempts`` times, then re-raised; a missing object is not retried.
    """
    from streaming.base.storage.download import CloudDownloader

    if os.path.exists(local):
        os.remove(local)  # a stale copy must not stand in for the remote one
    for attempt in range(1, attempts + 1):
        try:
            CloudDownloader.direct_download(remote, local, timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            if _is_missing(exc):
                return False
            if attempt == attempts:
                raise
            log.warning("download of %s failed (attempt %d/%d): %s; retrying", remote, attempt, attempts, exc)
    return False


def _remote_marker(remote: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "convert.json")
        if not fetch_file(remote.rstrip("/") + "/convert.json", target):
            return None
        with open(target) as f:
            return json.load(f)


def convert(inputs: list[str], out: str, cfg: ConvertConfig = ConvertConfig(), workers: int = 1,
            image_column: str | None = None, staging: str | None = None) -> ConvertSummary:
    """Convert ``inputs`` into per-bucket MDS folders under ``out`` (local path or remote URL).

    Returns a ConvertSummary (also written to out/convert_summary.json). Idempotent via out/convert.json.
    """
    from streaming import MDSWriter

    if not inputs:
        raise ValueError("no inputs given; pass folders, .tar or .parquet files")
    marker = {"version": CONVERT_VERSION, "config": asdict(cfg), "image_column": image_column,
              "inputs": [os.path.abspath(p) for p in inputs], "fingerprint": _fingerprint(inputs)}
    remote = out if "://" in out else None
    local_root = out if remote is None else (staging or tempfile.mkdtemp(prefix="prx_convert_"))
    existing = _remote_marker(remote) if remote else None
    if remote is None and os.path.exists(os.path.join(local_root, "convert.json")):
        with open(os.path.join(local_root, "convert.json")) as f:
            existing = json.load(f)
    if existing == marker:
        log.info("%s already holds this conversion (same inputs and settings); nothing to do", out)
        summary = ConvertSummary(skipped_existing=True)
        if remote is None:
            with open(os.path.join(local_root, "convert_summary.json")) as f:
                saved = json.load(f)
            summary.written, summary.caption_columns = saved["written"], saved["caption_columns"]
            summary.rejected = [tuple(r) for r in saved["rejected"]]
        return summary
    if os.path.exists(local_root) and os.listdir(local_root):
        log.warning("rewriting %s (no matching convert.json: other inputs/settings or an interrupted run)",
                    local_root)
        shutil.rmtree(local_root)
    os.makedirs(local_root, exist_ok=True)

    columns = tuple(cfg.caption_columns or scan_caption_columns(inputs))
    if not columns:
        raise ValueError(f"no caption columns found in {inputs}: add .txt/.json side-cars or string columns, "
                         "or name them with --caption-columns")
    mds_columns = {"image": "bytes", "width": "int", "height": "int", "source": "str", **{c: "str" for c in columns}}
    summary = ConvertSummary()
    writers: dict[str, Any] = {}
    pool = None
    try:
        jobs = ((sample, cfg, columns) for sample in read_inputs(inputs, image_column))
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_convert_star, jobs, chunksize=8)
        else:
            results = map(_convert_star, jobs)
        for name, bucket_name, row in results:
            if bucket_name is None:
                summary.rejected.append((name, row))
                continue
            if bucket_name not in writers:
                writers[bucket_name] = MDSWriter(out=os.path.join(local_root, bucket_name), columns=mds_columns,
                                                 size_limit=cfg.shard_size)
            writers[bucket_name].write(row)
            summary.written[bucket_name] = summary.written.get(bucket_name, 0) + 1
    finally:
        for writer in writers.values():
            writer.finish()
        if pool is not None:
            pool.close()
            pool.join()
    caption_columns = columns
    summary.caption_columns = sorted(caption_columns)
    manifest = {"buckets": [{"name": n, "height": Bucket.from_name(n).height, "width": Bucket.from_name(n).width,
                             "num_samples": c} for n, c in sorted(summary.written.items())],
                "caption_columns": summary.caption_columns, "format": cfg.format, "quality": cfg.quality,
                "base_resolution": cfg.base_resolution, "patch_size": cfg.patch_size}
    with open(os.path.join(local_root, "buckets.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(local_root, "convert_summary.json"), "w") as f:
        json.dump({"written": summary.written, "rejected": summary.rejected,
                   "caption_columns": summary.caption_columns}, f, indent=1)
    with open(os.path.join(local_root, "convert.json"), "w") as f:
        json.dump(marker, f, indent=1)
    if remote is not None:
        _upload_tree(local_root, remote)
    for name, reason in summary.rejected:
        log.warning("rejected %s: %s", name, reason)
    return summary


def main(argv: list[str] | None = None) -> ConvertSummary:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.data.convert", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="folders of images + side-car captions, .tar, .parquet")
    parser.add_argument("--out", required=True, help="output root: local folder or s3:// gs:// ... URL")
    parser.add_argument("--base-resolution", type=int, default=1024)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--max-ratio", type=float, default=2.0, help="bucket aspect ratios 1:r ... r:1")
    parser.add_argument("--format", choices=sorted(FORMATS), default="jpeg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality of the stored bytes")
    parser.add_argument("--caption-columns", nargs="+", default=None,
                        help="caption columns to keep (default: every string column / side-car field)")
    parser.add_argument("--image-column", default=None, help="parquet image column (default: auto-detect)")
    parser.add_argument("--min-side", type=int, default=0, help="reject images with a shorter side below this")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--staging", default=None, help="local folder to build a remote output in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ConvertConfig(base_resolution=args.base_resolution, patch_size=args.patch_size, max_ratio=args.max_ratio,
                        format=args.format, quality=args.quality, min_side=args.min_side,
                        caption_columns=tuple(args.caption_columns) if args.caption_columns else None)
    summary = convert(args.inputs, args.out, cfg, workers=args.workers, image_column=args.image_column,
                      staging=args.staging)
    if summary.skipped_existing:
        print(f"{args.out} is up to date (same inputs and settings): nothing written")
    print(summary.report())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
