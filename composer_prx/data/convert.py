"""Convert image–caption data to MDS, one folder per aspect-ratio bucket (local or s3:// gs:// ...).

    python -m composer_prx.data.convert INPUT [INPUT ...] --out OUT [--base-resolution 1024 --patch-size 32
           --format jpeg --quality 95 --workers 4 --caption-columns caption prompt
           --text-encoder ID|PATH --text-max-length 256]

Inputs (mixed freely):
    folder      images (jpg/jpeg/png/webp/bmp/tif/tiff/gif) with side-car captions: <stem>.txt -> column
                "caption", <stem>.json -> its string fields
    *.tar       WebDataset shards: adjacent members sharing a key; an image member + .txt / .json members
    *.parquet   an image column (binary, or a struct with "bytes" like HF datasets' Image) + string columns

    sample -> decode -> EXIF orientation, alpha on white (data/imaging.py) -> nearest bucket (data/buckets.py)
           -> resize to cover + centre crop -> encode ONCE -> OUT/h<H>_w<W>/ (MDS: image, captions, width,
           height, source; with --text-encoder also <caption column>_emb, bf16 [L, C]: data/text_embeddings.py)

Caption columns follow the one rule of data/columns.py (caption, prompt, text, ..., *_caption) unless
``--caption-columns`` names them; the choice is recorded in OUT/buckets.json, which the dataset reads.
OUT/convert_summary.json lists what was written, the string columns left out, and every rejected input
by name with its reason (undecodable, too large, unreadable, corrupt tar, unsupported type, caption
without image, ...): one bad input never stops a conversion.

Safety: OUT must be empty, new, or an earlier output of this converter (it holds convert.json); only
the converter's own files are ever replaced. OUT/convert.json is the completion marker: a (re)write
first replaces it and buckets.json by "in_progress" stubs (readers refuse such a dataset) and writes
the real ones last. Re-running with the same inputs and settings finds the marker and does nothing.
A remote OUT is streamed shard by shard (nothing is staged whole); uploads are retried.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from composer_prx.data.buckets import Bucket, nearest_bucket
from composer_prx.data.columns import caption_columns_of, check_requested
from composer_prx.data.imaging import BACKGROUND, load_for_bucket

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# image types PIL cannot decode here: reported as rejects, never skipped silently
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".dng", ".cr2", ".nef", ".arw")
CAPTION_EXTENSIONS = (".txt", ".json")
TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
CONVERT_VERSION = 2
MARKER_FILE, BUCKETS_FILE, SUMMARY_FILE = "convert.json", "buckets.json", "convert_summary.json"
IN_PROGRESS = "in_progress"
UPLOAD_ATTEMPTS = 8  # per file (streaming's exponential backoff: 1, 2, 4, ... s) and per uploader set-up
_BUCKET_DIR = re.compile(r"^h\d+_w\d+$")


@dataclass(frozen=True)
class ConvertConfig:
    """Export settings; ``quality`` is the JPEG/WebP quality actually used for the stored bytes."""

    base_resolution: int = 1024
    patch_size: int = 32
    max_ratio: float = 2.0
    format: str = "jpeg"
    quality: int = 95
    caption_columns: tuple[str, ...] | None = None  # None: the rule of data/columns.py
    min_side: int = 0  # reject images whose shorter side is smaller (0: keep all)
    shard_size: int = 1 << 26  # bytes per MDS shard before a new one starts
    background: tuple[int, int, int] = BACKGROUND  # transparent pixels are composited on this colour
    text_encoder: str | None = None  # hub id or folder: also store every caption column's embeddings (<column>_emb)
    text_max_length: int = 256  # tokens kept per caption (the trainer's model.text_encoder.max_length)
    text_dtype: str = "float32"  # the encoder's weights while encoding (the stored embeddings are bf16)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {sorted(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.base_resolution % self.patch_size:
            raise ValueError(f"base_resolution {self.base_resolution} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.caption_columns is not None:
            object.__setattr__(self, "caption_columns", tuple(self.caption_columns))
            check_requested(self.caption_columns)
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple in [0, 255], got {self.background}")
        if self.text_max_length < 1:
            raise ValueError(f"text_max_length must be >= 1, got {self.text_max_length}")
        if self.text_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"text_dtype must be float32, bfloat16 or float16, got {self.text_dtype!r}")


@dataclass
class RawSample:
    """One input before conversion: a name for reports, encoded image bytes (or None) and caption columns."""

    name: str
    image: bytes | None
    captions: dict[str, str]
    error: str | None = None  # a problem found while reading the input (reported as the reject reason)


@dataclass
class ConvertSummary:
    written: dict[str, int] = field(default_factory=dict)  # bucket name -> samples
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (input name, reason)
    caption_columns: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)  # string columns that are not captions
    skipped_existing: bool = False

    def report(self) -> str:
        total = sum(self.written.values())
        if self.skipped_existing:
            lines = [f"up to date (same inputs and settings): nothing written; the output holds {total} samples "
                     f"in {len(self.written)} buckets from the earlier run"]
        else:
            lines = [f"wrote {total} samples in {len(self.written)} buckets"]
        lines += [f"  {name}: {count}" for name, count in sorted(self.written.items())]
        lines.append(f"caption columns: {self.caption_columns}"
                     + (f"; string columns not used as captions: {self.ignored_columns}" if self.ignored_columns
                        else ""))
        lines.append(f"rejected {len(self.rejected)} inputs")
        reasons = Counter(reason.split(":")[0] for _, reason in self.rejected)
        lines += [f"  {reason}: {count}" for reason, count in reasons.most_common()]
        lines += [f"  - {name}: {reason}" for name, reason in self.rejected]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Readers: every input becomes RawSamples; a problem becomes a RawSample with ``error`` (a reject)
# ---------------------------------------------------------------------------------------------------
def _captions_from_json(text: str, name: str) -> dict[str, str]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: caption json must be an object, got {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_folder(folder: str) -> Iterator[RawSample]:
    """Images under ``folder`` (recursive, sorted) with <stem>.txt / <stem>.json side-car captions.

    Unsupported image types, unreadable files and side-cars without an image are yielded as rejects.
    """
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        stems_with_image = {os.path.splitext(f)[0] for f in filenames
                            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS}
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            path = os.path.join(dirpath, filename)
            name = os.path.relpath(path, folder)
            if ext.lower() in CAPTION_EXTENSIONS and stem not in stems_with_image:
                yield RawSample(name, None, {}, f"caption without image: no {stem}.<{'|'.join(IMAGE_EXTENSIONS)}> "
                                                "next to it")
                continue
            if ext.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
                yield RawSample(name, None, {}, f"unsupported image type: {ext} (convert it to one of "
                                                f"{', '.join(IMAGE_EXTENSIONS)})")
                continue
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
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
            try:
                image = _read_bytes(path)
            except OSError as exc:
                yield RawSample(name, None, captions, f"unreadable file: {type(exc).__name__}: {exc}")
                continue
            yield RawSample(name, image, captions, error)


def _tar_sample(tar_name: str, key: str, members: dict[str, bytes]) -> RawSample:
    name = f"{tar_name}:{key}"
    image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
    captions, error = {}, None
    try:
        if "json" in members:
            captions.update(_captions_from_json(members["json"].decode("utf-8"), name))
        for ext in ("txt", "caption", "caption.txt"):
            if ext in members:
                captions["caption"] = members[ext].decode("utf-8").strip()
    except (UnicodeDecodeError, ValueError) as exc:
        error = f"unreadable caption member: {exc}"
    if image is None and error is None:
        unsupported = [e for e in members if "." + e in UNSUPPORTED_IMAGE_EXTENSIONS]
        error = (f"unsupported image type: .{unsupported[0]}" if unsupported else
                 f"caption without image: members {sorted(members)}, none of {list(TAR_IMAGE_EXTENSIONS)}")
    return RawSample(name, image, captions, error)


def read_webdataset(path: str) -> Iterator[RawSample]:
    """Samples of one WebDataset .tar, streamed: adjacent members sharing a key (name up to the first dot).

    Only one sample's members are held in memory. A corrupt or truncated tar yields the samples read
    before the damage and one reject for the rest.
    """
    tar_name = os.path.basename(path)
    key, members, done, count = None, {}, set(), 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                member_key, _, ext = base.partition(".")
                member_key = os.path.join(os.path.dirname(member.name), member_key)
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(tar_name, key, members)
                        done.add(key)
                        count += 1
                    key, members = member_key, {}
                    if key in done:
                        raise tarfile.ReadError(f"members of sample {key!r} are not adjacent; WebDataset shards "
                                                "keep a sample's files together (tar them sorted by name)")
                extracted = tar.extractfile(member)
                members[ext.lower()] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        after = f" after {count} samples" if count else ""
        yield RawSample(tar_name, None, {}, f"corrupt tar{after}: {type(exc).__name__}: {exc}; "
                                            "the rest of this tar was not converted")
        return
    if key is not None:
        yield _tar_sample(tar_name, key, members)


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from exc
    return pq.ParquetFile(path)


def _string_fields(schema) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def read_parquet(path: str, image_column: str | None = None) -> Iterator[RawSample]:
    """Rows of a parquet file: image bytes from ``image_column`` (auto: binary / struct with bytes)."""
    import pyarrow as pa

    try:
        file = _parquet_file(path)
    except (pa.ArrowException, OSError) as exc:
        yield RawSample(os.path.basename(path), None, {}, f"unreadable parquet: {type(exc).__name__}: {exc}")
        return
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
    text_columns = _string_fields(schema)
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


def scan_string_columns(inputs: list[str]) -> list[str]:
    """Union of string columns over all inputs (parquet schema, side-car/member json keys, .txt -> caption).

    Unreadable pieces are skipped here; the readers report them as rejects.
    """
    columns: set[str] = set()
    for path in inputs:
        if path.endswith(".parquet"):
            import pyarrow as pa

            try:
                columns.update(_string_fields(_parquet_file(path).schema_arrow))
            except (pa.ArrowException, OSError):
                continue
        elif os.path.isdir(path):
            for dirpath, _, filenames in os.walk(path):
                for filename in filenames:
                    if filename.endswith(".txt"):
                        columns.add("caption")
                    elif filename.endswith(".json"):
                        try:
                            with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                                columns.update(_captions_from_json(f.read(), filename))
                        except (OSError, UnicodeDecodeError, ValueError):
                            continue
        else:
            try:
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
                                continue
            except (tarfile.TarError, OSError, EOFError):
                continue
    return sorted(columns)


def choose_caption_columns(inputs: list[str], requested: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(caption columns, string columns left out): ``requested`` if given, else the rule of data/columns.py."""
    found = scan_string_columns(inputs)
    if requested:
        check_requested(requested)
        missing = [c for c in requested if c not in found]
        if len(missing) == len(requested):
            raise ValueError(f"none of the caption columns {list(requested)} occurs in the inputs; their string "
                             f"columns are {found}")
        if missing:
            log.warning("caption columns %s do not occur in the inputs (string columns: %s)", missing, found)
        columns = list(requested)
    else:
        columns = caption_columns_of(found)
        if not columns:
            raise ValueError(f"no caption column in {inputs}: string columns {found} include none named "
                             "caption/prompt/text/description/*_caption; add .txt side-cars or name the "
                             "columns with --caption-columns")
    return columns, sorted(c for c in found if c not in columns)


def _fingerprint(inputs: list[str]) -> str:
    """Hash of input paths, sizes and modification times (what a re-run compares)."""
    digest = hashlib.sha256()
    for path in inputs:
        entries = [path] if not os.path.isdir(path) else sorted(
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
        for entry in entries:
            stat = os.stat(entry) if os.path.exists(entry) else os.lstat(entry)  # a broken link is a reject
            digest.update(f"{os.path.relpath(entry, path) if entry != path else path}:{stat.st_size}:"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Per-sample conversion (runs in worker processes)
# ---------------------------------------------------------------------------------------------------
def encode_image(image: "Image.Image", fmt: str, quality: int) -> bytes:  # noqa: F821
    """PIL image -> bytes in ``fmt`` at ``quality`` (JPEG/WebP; PNG is lossless and ignores it)."""
    import io

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

    def choose(height: int, width: int) -> Bucket:
        if min(height, width) < cfg.min_side:
            raise _TooSmall(f"too small: {width}x{height} < min_side {cfg.min_side}")
        return nearest_bucket(height, width, cfg.base_resolution, cfg.patch_size, cfg.max_ratio)

    try:
        image, bucket, _ = load_for_bucket(sample.image, choose, cfg.background)
    except _TooSmall as exc:
        return None, str(exc)
    except Image.DecompressionBombError as exc:
        return None, f"too large: {exc}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        return None, f"undecodable image: {type(exc).__name__}: {exc}"
    row = {**captions, "image": encode_image(image, cfg.format, cfg.quality), "width": bucket.width,
           "height": bucket.height, "source": sample.name}
    return bucket.name, row


class _TooSmall(Exception):
    """An image below ``min_side`` (found from the header, before decoding)."""


def _convert_star(args: tuple[RawSample, ConvertConfig, tuple[str, ...]]) -> tuple[str, Any, Any]:
    return (args[0].name, *convert_sample(*args))


# ---------------------------------------------------------------------------------------------------
# Output: local folder or remote URL
# ---------------------------------------------------------------------------------------------------
def _is_missing(exc: BaseException) -> bool:
    """True for "object does not exist" errors of the local, S3-style (botocore) and other downloaders."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def fetch_file(remote: str, local: str, timeout: float = 60.0, attempts: int = 3) -> bool:
    """Download one object (any streaming-supported URL or path) to ``local``; False when it does not exist.

    The object lands in a temporary file next to ``local`` and replaces it atomically, so a reader
    (another rank sharing the cache) sees the old copy or the new one, never a missing file.
    Transient errors are retried ``attempts`` times, then re-raised; a missing object is not retried.
    """
    from streaming.base.storage.download import CloudDownloader

    directory = os.path.dirname(os.path.abspath(local))
    os.makedirs(directory, exist_ok=True)
    for attempt in range(1, attempts + 1):
        handle, partial = tempfile.mkstemp(dir=directory, prefix=os.path.basename(local) + ".", suffix=".part")
        os.close(handle)
        os.remove(partial)  # downloaders create the file themselves
        try:
            CloudDownloader.direct_download(remote, partial, timeout)
            os.replace(partial, local)
            return True
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            if _is_missing(exc):
                return False
            if attempt == attempts:
                raise
            log.warning("download of %s failed (attempt %d/%d): %s; retrying", remote, attempt, attempts, exc)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return False


def _with_retries(action: Callable[[], Any], what: str, attempts: int = UPLOAD_ATTEMPTS) -> Any:
    """``action()``, retried on any error with backoff 0.25 * 2^k s; the last error is re-raised.

    For calls streaming does not retry itself (creating an uploader checks the bucket once).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - object stores raise many types; re-raised when out of attempts
            if attempt == attempts:
                raise
            log.warning("%s failed (attempt %d/%d): %s: %s; retrying", what, attempt, attempts,
                        type(exc).__name__, exc)
            time.sleep(0.25 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _read_json(root: str, name: str) -> dict[str, Any] | None:
    """``root/name`` parsed (local path or remote URL), None when it does not exist."""
    if "://" not in root:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, name)
        if not fetch_file(root.rstrip("/") + "/" + name, target, attempts=UPLOAD_ATTEMPTS):
            return None
        with open(target) as f:
            return json.load(f)


class _Output:
    """Where the converter writes: a local folder, or a remote root streamed through a local staging folder."""

    def __init__(self, out: str, staging: str | None) -> None:
        self.out = out
        self.remote = out if "://" in out else None
        self._tmp = None
        if self.remote is None:
            self.local = out
        elif staging is not None:
            self.local = staging
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="prx_convert_")
            self.local = self._tmp.name
        self._uploader = None

    def prepare(self) -> None:
        """Take ownership of the output for a (re)write: marker replaced first, only our own files removed."""
        if self.remote is None:
            self._prepare_local()
        else:
            os.makedirs(self.local, exist_ok=True)
        stub = {"status": IN_PROGRESS}
        self.write_json(MARKER_FILE, stub)  # readers and re-runs now see an incomplete conversion
        self.write_json(BUCKETS_FILE, {**stub, "buckets": []})
        if self.remote is None:
            for name in os.listdir(self.local):
                path = os.path.join(self.local, name)
                if _BUCKET_DIR.match(name) and os.path.isdir(path):
                    shutil.rmtree(path)
                elif name == SUMMARY_FILE:
                    os.remove(path)

    def _prepare_local(self) -> None:
        if not os.path.exists(self.local):
            os.makedirs(self.local)
            return
        if not os.path.isdir(self.local):
            raise FileExistsError(f"--out {self.local} is a file; pass a folder (new, empty, or an earlier output "
                                  "of this converter)")
        entries = os.listdir(self.local)
        if entries and MARKER_FILE not in entries:
            raise FileExistsError(
                f"--out {self.local} is not empty and holds no {MARKER_FILE}, so it is not an output of this "
                f"converter ({len(entries)} entries, e.g. {sorted(entries)[:3]}); nothing was changed. Pass a new "
                "or empty folder, e.g. --out " + os.path.join(self.local, "mds"))
        foreign = [e for e in entries if not (_BUCKET_DIR.match(e) or e in (MARKER_FILE, BUCKETS_FILE, SUMMARY_FILE))]
        if foreign:
            log.warning("%s holds entries the converter did not write; leaving them: %s", self.local, sorted(foreign))
        log.warning("rewriting the converter's output in %s (other inputs/settings or an interrupted run)",
                    self.local)

    def writer(self, bucket_name: str, columns: dict[str, str], size_limit: int):
        from streaming import MDSWriter

        local = os.path.join(self.local, bucket_name)
        if self.remote is None:
            return MDSWriter(out=local, columns=columns, size_limit=size_limit)
        return _with_retries(
            lambda: MDSWriter(out=(local, self.remote.rstrip("/") + "/" + bucket_name), columns=columns,
                              size_limit=size_limit, keep_local=False, retry=UPLOAD_ATTEMPTS, exist_ok=True),
            f"opening {self.remote}/{bucket_name} for writing")

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        """Write ``name`` at the output root (atomically locally; uploaded with retries for a remote)."""
        path = os.path.join(self.local, name)
        with open(path + ".part", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".part", path)
        if self.remote is not None:
            if self._uploader is None:
                from streaming.base.storage.upload import CloudUploader

                self._uploader = _with_retries(
                    lambda: CloudUploader.get((self.local, self.remote), keep_local=True, retry=UPLOAD_ATTEMPTS,
                                              exist_ok=True), f"connecting to {self.remote}")
            self._uploader.upload_file(name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _marker(inputs: list[str], cfg: ConvertConfig, image_column: str | None) -> dict[str, Any]:
    marker = {"version": CONVERT_VERSION, "config": asdict(cfg), "image_column": image_column,
              "inputs": [os.path.abspath(p) for p in inputs], "fingerprint": _fingerprint(inputs)}
    return json.loads(json.dumps(marker))  # tuples -> lists: compares equal to the marker read back


def convert(inputs: list[str], out: str, cfg: ConvertConfig = ConvertConfig(), workers: int = 1,
            image_column: str | None = None, staging: str | None = None, text_device: str | None = None,
            text_batch_size: int = 64) -> ConvertSummary:
    """Convert ``inputs`` into per-bucket MDS folders under ``out`` (local path or remote URL).

    With ``cfg.text_encoder``, every caption column also gets ``<column>_emb``: the caption's real tokens
    [L, C] as bf16 (data/text_embeddings.py), encoded on ``text_device`` in batches of ``text_batch_size``.
    Returns a ConvertSummary (also written to out/convert_summary.json). Idempotent via out/convert.json.
    """
    if not inputs:
        raise ValueError("no inputs given; pass folders, .tar or .parquet files")
    marker = _marker(inputs, cfg, image_column)
    if _read_json(out, MARKER_FILE) == marker:
        log.info("%s already holds this conversion (same inputs and settings); nothing to do", out)
        saved = _read_json(out, SUMMARY_FILE) or {}
        return ConvertSummary(written=saved.get("written", {}), rejected=[tuple(r) for r in saved.get("rejected", [])],
                              caption_columns=saved.get("caption_columns", []),
                              ignored_columns=saved.get("ignored_columns", []), skipped_existing=True)
    columns, ignored = choose_caption_columns(inputs, cfg.caption_columns)
    embedder = None
    if cfg.text_encoder is not None:  # loaded before anything is written: bad weights fail at once
        from composer_prx.data.text_embeddings import CaptionEmbedder

        embedder = CaptionEmbedder.load(cfg.text_encoder, cfg.text_max_length, cfg.text_dtype, text_device,
                                        text_batch_size)
    output = _Output(out, staging)
    try:
        output.prepare()
        summary = _write_buckets(inputs, output, cfg, tuple(columns), workers, image_column, embedder)
        summary.caption_columns, summary.ignored_columns = columns, ignored
        manifest = {"buckets": [{"name": n, "height": Bucket.from_name(n).height, "width": Bucket.from_name(n).width,
                                 "num_samples": c} for n, c in sorted(summary.written.items())],
                    "caption_columns": columns, "format": cfg.format, "quality": cfg.quality,
                    "base_resolution": cfg.base_resolution, "patch_size": cfg.patch_size}
        if embedder is not None:
            manifest["text_embeddings"] = embedder.manifest(columns, cfg.text_dtype)
        output.write_json(BUCKETS_FILE, manifest)
        output.write_json(SUMMARY_FILE, {"written": summary.written, "rejected": summary.rejected,
                                         "caption_columns": columns, "ignored_columns": ignored})
        output.write_json(MARKER_FILE, marker)  # last: the dataset is complete
    finally:
        output.close()
    for name, reason in summary.rejected:
        log.warning("rejected %s: %s", name, reason)
    return summary


def _write_buckets(inputs: list[str], output: _Output, cfg: ConvertConfig, columns: tuple[str, ...], workers: int,
                   image_column: str | None, embedder: Any = None) -> ConvertSummary:
    mds_columns = {**{c: "str" for c in columns}, "image": "bytes", "width": "int", "height": "int",
                   "source": "str"}
    if embedder is not None:
        from composer_prx.data.text_embeddings import EMB_ENCODING, embedding_column

        mds_columns.update({embedding_column(c): EMB_ENCODING for c in columns})
    summary = ConvertSummary()
    writers: dict[str, Any] = {}
    pending: list[tuple[str, dict[str, Any]]] = []  # rows waiting for their caption embeddings

    def flush() -> None:
        if embedder is not None:
            embedder.add_to_rows([row for _, row in pending], columns)
        for bucket_name, row in pending:
            if bucket_name not in writers:
                writers[bucket_name] = output.writer(bucket_name, mds_columns, cfg.shard_size)
            writers[bucket_name].write(row)
            summary.written[bucket_name] = summary.written.get(bucket_name, 0) + 1
        pending.clear()

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
            pending.append((bucket_name, row))
            if embedder is None or len(pending) >= embedder.batch_size:
                flush()
        flush()
    finally:
        for writer in writers.values():
            writer.finish()
        if pool is not None:
            pool.close()
            pool.join()
    return summary


def main(argv: list[str] | None = None) -> ConvertSummary:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.data.convert", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="folders of images + side-car captions, .tar, .parquet")
    parser.add_argument("--out", required=True,
                        help="output root: a new/empty local folder, an earlier output, or an s3:// gs:// ... URL")
    parser.add_argument("--base-resolution", type=int, default=1024)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--max-ratio", type=float, default=2.0, help="bucket aspect ratios 1:r ... r:1")
    parser.add_argument("--format", choices=sorted(FORMATS), default="jpeg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality of the stored bytes")
    parser.add_argument("--caption-columns", nargs="+", default=None,
                        help="caption columns to keep (default: caption, prompt, text, description, *_caption ...)")
    parser.add_argument("--image-column", default=None, help="parquet image column (default: auto-detect)")
    parser.add_argument("--min-side", type=int, default=0, help="reject images with a shorter side below this")
    parser.add_argument("--background", type=int, nargs=3, default=list(BACKGROUND),
                        help="RGB colour transparent pixels are composited on (default: white)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--staging", default=None, help="local folder to stream a remote output through")
    parser.add_argument("--text-encoder", default=None, metavar="ID|PATH",
                        help="also store each caption's embeddings (bf16, real tokens only) from this frozen encoder, "
                             "the one model.text_encoder.name_or_path names")
    parser.add_argument("--text-max-length", type=int, default=256,
                        help="tokens kept per caption (= model.text_encoder.max_length)")
    parser.add_argument("--text-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="encoder weights while encoding")
    parser.add_argument("--text-device", default=None, help="device for the text encoder (default: GPU if any)")
    parser.add_argument("--text-batch-size", type=int, default=64, help="captions per encoder forward")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ConvertConfig(base_resolution=args.base_resolution, patch_size=args.patch_size, max_ratio=args.max_ratio,
                        format=args.format, quality=args.quality, min_side=args.min_side,
                        background=tuple(args.background),
                        caption_columns=tuple(args.caption_columns) if args.caption_columns else None,
                        text_encoder=args.text_encoder, text_max_length=args.text_max_length,
                        text_dtype=args.text_dtype)
    summary = convert(args.inputs, args.out, cfg, workers=args.workers, image_column=args.image_column,
                      staging=args.staging, text_device=args.text_device, text_batch_size=args.text_batch_size)
    print(f"{args.out}: {summary.report()}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
