"""Image–caption MDS streaming: one stream per aspect-ratio bucket, every batch from one bucket.

    dataset root (local path or s3:// gs:// ...)      per sample (worker)              per batch (main process)
    ├── buckets.json   (written by data.convert)      image bytes -> bucket at the      {"image": [B,3,H,W] in [-1,1],
    ├── h512_w512/ index.json shard.*.mds               current resolution -> resize     "caption": list[str],
    └── h384_w704/ ...                                  to cover + centre crop           "corrupt_replaced": [B] bool,
    (or a single MDS folder with index.json at the top) (data/imaging.py) -> uint8       + "text_emb" [B,T,C],
                                                        [3,H,W]; caption column by weight  "text_mask" [B,T] bool}

Epoch plan (batching method ``prx_buckets``, registered with mosaicml-streaming):
each bucket's samples are ordered by streaming's shard-local shuffle over C = ``num_canonical_nodes``
canonical nodes (default: the physical node count P; C must be a multiple or a divisor of P): canonical
node c holds a contiguous span of shards, samples [n c / C, n (c + 1) / C) of the bucket's order. As in
streaming, node p owns canonical nodes p, p + P, ... (C >= P; C < P: the P / C nodes p = c, c + C, ...
share canonical node c). A bucket is cut into global batches of ``batch_size * world_size`` samples and
the batches of all buckets are interleaved by a seeded permutation; each node's ranks fill their part of
every batch from the node's own samples, in order, so a node reads ~1/P of the shards (1/C when C < P).
A bucket's last batch may be smaller: its samples are spread evenly over the ranks (each rank
floor or ceil of size / ranks; the ranks that get one more are chosen on the nodes with the most own
samples left), so every sample is seen exactly once per epoch and nothing is dropped (a tail smaller
than the world size borrows from the batch before it). Crossings (a sample read by a node that does
not own it, at the bucket's tail): none when C = P or C divides P, for any bucket of >= P samples;
with C = k P at most (k - 1)(P - 1) per bucket of >= C samples (``bucket_plan`` returns the count).
A shard straddling a canonical boundary is read by both nodes (<= C - 1 shards per bucket).
Repeats happen only where a bucket tail cannot feed every rank: with ``batch_size=1``, each bucket whose
size is not a multiple of the world size repeats (-size mod world) samples; with larger batches, only a
bucket with fewer samples than ranks does (warning, naming the bucket); a node repeats its own samples
(another node's only in a bucket with fewer samples than nodes or canonical nodes). Every rank yields
the same number of batches, one bucket per step. The order depends on (seed, epoch, C) only, not on
the ranks per node; with one node it is the same as before partitioning. Another node count with the
same world size and C gives every global batch the same samples except a bucket's last two.
Resumption: Composer saves ``state_dict(samples_seen_in_epoch)``; the plan is rebuilt and continues
after the last completed global batch; a checkpoint at an epoch boundary (0 samples) continues with
the next epoch.

Corrupt samples (undecodable image, no caption): the slot is filled by the nearest decodable sample
after it in the same bucket (sample id + 1, + 2, ... wrapping inside the bucket), so batches keep their
size and bucket; that neighbour is then seen once more. Each replaced slot is flagged in the batch as
``corrupt_replaced`` (exactly one flag per unreadable sample in the plan), logged once per process
with the sample id and shard, and ``CorruptSampleCounter`` sums the flags over workers and ranks and
logs ``data/corrupt_replaced`` to Composer's loggers at every epoch end. ``dataset.num_corrupt`` is the
same count for this process only (0 in the main process when DataLoader workers decode).

Images cross the DataLoader worker boundary as uint8 and are normalised to float in [-1, 1] by the
loader in the main process (``image_dtype="uint8"`` leaves that to the model, on the device).
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Callback, State
from composer.loggers import Logger
from streaming import Stream, StreamingDataset
from streaming.base.batching import batching_methods
from streaming.base.shuffle import get_shuffle
from streaming.base.world import World
from torch.utils.data import DataLoader

from composer_prx.data.buckets import Bucket, nearest_bucket
from composer_prx.data.columns import caption_columns_of, check_requested
from composer_prx.data.convert import IN_PROGRESS
from composer_prx.data.imaging import load_for_bucket, normalise_image
from composer_prx.data.text_embeddings import from_bf16_bits

log = logging.getLogger(__name__)

BATCHING_METHOD = "prx_buckets"
BUCKETS_FILE = "buckets.json"
MAX_CORRUPT_IN_A_ROW = 64  # give up (error) when this many consecutive samples of a bucket are corrupt


class CorruptSampleError(ValueError):
    """A sample whose image cannot be decoded or which has no caption."""


@dataclass(frozen=True)
class _Pad:
    """Marker for an empty slot of a smaller (bucket tail) batch; dropped by ``collate_samples``."""


PAD = _Pad()


# ---------------------------------------------------------------------------------------------------
# Epoch plan
# ---------------------------------------------------------------------------------------------------
def canonical_nodes(dataset: "ImageCaptionDataset", num_nodes: int) -> int:
    """The plan's canonical node count: ``dataset.num_canonical_nodes``, else the physical node count."""
    count = dataset.num_canonical_nodes or num_nodes
    if count % num_nodes and num_nodes % count:
        raise ValueError(f"num_canonical_nodes={count} does not split over {num_nodes} physical nodes: one must "
                         "be a multiple of the other; set num_canonical_nodes to a multiple of the node count "
                         "(a checkpoint keeps the count it was saved with)")
    return count


def _bucket_order(dataset: "ImageCaptionDataset", stream_id: int, epoch: int, num_canonical: int) -> np.ndarray:
    """Global sample ids of one bucket in this epoch's order (shard-local shuffle, world independent).

    Slice c = order[n c // C : n (c + 1) // C] holds canonical node c's samples: a contiguous span of
    shards (streaming's own division, in its seeded shard order; a shard may straddle two slices).
    """
    first_shard = dataset.shard_offset_per_stream[stream_id]
    shard_sizes = dataset.samples_per_shard[first_shard: first_shard + dataset.shards_per_stream[stream_id]]
    offset = dataset.sample_offset_per_stream[stream_id]
    if not dataset.shuffle:
        return offset + np.arange(int(shard_sizes.sum()), dtype=np.int64)
    block = dataset.shuffle_block_size or (1 << 18)
    parts = max(1, min(num_canonical, int(shard_sizes.sum())))  # streaming refuses an empty canonical node
    order = get_shuffle(dataset.shuffle_algo, shard_sizes, parts, dataset.shuffle_seed + 7919 * stream_id, epoch,
                        block)
    return offset + order.astype(np.int64)


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Round-robin merge: part 0's first, part 1's first, ..., part 0's second, ...; longer parts run on."""
    ids = np.concatenate(parts)
    rounds = np.concatenate([np.arange(len(p)) for p in parts])
    which = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return ids[np.lexsort((which, rounds))]


def node_pools(order: np.ndarray, num_canonical: int, num_nodes: int) -> list[np.ndarray]:
    """One bucket's ordered ids -> each physical node's own samples (streaming's canonical-node mapping).

    C >= P: node p owns canonical nodes p, p + P, p + 2P, ... interleaved; C < P: the P / C nodes
    p = c, c + C, ... share canonical node c, node p taking every (P / C)-th of its samples.
    """
    bounds = len(order) * np.arange(num_canonical + 1) // num_canonical
    slices = [order[bounds[c]: bounds[c + 1]] for c in range(num_canonical)]
    if num_canonical >= num_nodes:
        return [_interleave(slices[p::num_nodes]) for p in range(num_nodes)]
    share = num_nodes // num_canonical
    return [slices[p % num_canonical][p // num_canonical:: share] for p in range(num_nodes)]


def _bucket_batch_sizes(num_samples: int, batch_size: int, num_ranks: int, name: str) -> list[int]:
    """Global batch sizes of one bucket: full ``batch_size * num_ranks``, then a tail of >= num_ranks.

    A tail smaller than the world borrows from the batch before it (batch_size >= 2), else the bucket
    repeats samples (sum of the sizes - num_samples of them, with a warning).
    """
    global_batch = batch_size * num_ranks
    sizes = [min(global_batch, num_samples - i) for i in range(0, num_samples, global_batch)]
    if sizes[-1] < num_ranks:
        if len(sizes) > 1 and batch_size >= 2:
            merged = sizes[-2] + sizes[-1]  # re-split so both halves feed every rank
            sizes[-2:] = [merged - num_ranks, num_ranks]
        else:
            log.warning("bucket %s has %d samples in its last batch for %d ranks: repeating %d sample(s) "
                        "so that every rank gets one", name, sizes[-1], num_ranks, num_ranks - sizes[-1])
            sizes[-1] = num_ranks
    return sizes


def _tail_extras(sizes: list[int], surplus: np.ndarray, ranks_per_node: int) -> np.ndarray:
    """[batches, nodes] ranks of each node that get one sample more (batch size mod ranks of them per batch).

    Each extra goes to the node with the most own samples still unplaced (lowest node on ties), at most
    one per rank, so nodes whose share of the canonical slices is larger keep their samples at home.
    """
    num_nodes = len(surplus)
    num_ranks = num_nodes * ranks_per_node
    extras = np.zeros((len(sizes), num_nodes), dtype=np.int64)
    left = surplus.copy()
    for g, size in enumerate(sizes):
        for _ in range(size % num_ranks):
            room = np.where(extras[g] < ranks_per_node, left, np.iinfo(np.int64).min)
            node = int(np.argmax(room))
            extras[g, node] += 1
            left[node] -= 1
    return extras


def bucket_plan(pools: list[np.ndarray], sizes: list[int], batch_size: int, ranks_per_node: int
                ) -> tuple[list[np.ndarray], int]:
    """Fill one bucket's global batches from the node pools -> ([num_ranks, batch_size] ids, -1 = empty; crossings).

    Rank r of node p takes its slots from pool p in order; a node whose pool runs short takes the surplus of
    the others (the last samples of their pools, in node order), then, where the sizes repeat samples,
    the first samples of its own pool again. ``crossings`` counts samples read by a node that does not own them.
    """
    num_nodes = len(pools)
    num_ranks = num_nodes * ranks_per_node
    base = np.array([s // num_ranks for s in sizes], dtype=np.int64)  # per rank
    own = np.array([len(p) for p in pools], dtype=np.int64)
    extras = _tail_extras(sizes, own - ranks_per_node * int(base.sum()), ranks_per_node)
    demand = ranks_per_node * base[:, None] + extras  # [batches, nodes]
    wanted = demand.sum(0)
    spare = np.concatenate([p[w:] for p, w in zip(pools, wanted)])
    slots, crossings = [], 0
    for p, pool in enumerate(pools):
        mine = pool[: wanted[p]]
        borrowed = spare[: max(0, wanted[p] - len(mine))]
        spare = spare[len(borrowed):]
        crossings += len(borrowed)
        again = wanted[p] - len(mine) - len(borrowed)
        repeats = np.resize(pool if len(pool) else np.concatenate(pools), again)  # others': bucket < nodes
        crossings += 0 if len(pool) else again
        slots.append(np.concatenate([mine, borrowed, repeats]))
    batches, taken = [], np.zeros(num_nodes, dtype=np.int64)
    for g in range(len(sizes)):
        batch = np.full((num_ranks, batch_size), -1, dtype=np.int64)
        for p in range(num_nodes):
            for r in range(ranks_per_node):
                count = int(base[g] + (r < extras[g, p]))
                batch[p * ranks_per_node + r, :count] = slots[p][taken[p]: taken[p] + count]
                taken[p] += count
        batches.append(batch)
    return batches, crossings


def epoch_batches(dataset: "ImageCaptionDataset", epoch: int, num_ranks: int, num_nodes: int = 1
                  ) -> list[np.ndarray]:
    """The epoch's global batches in training order, before resumption: [num_ranks, batch_size] ids, -1 = empty.

    Ranks are numbered node-major (rank = node * ranks_per_node + rank_of_node), as streaming's World does.
    """
    if num_ranks % num_nodes:
        raise ValueError(f"{num_ranks} ranks do not split evenly over {num_nodes} nodes")
    num_canonical = canonical_nodes(dataset, num_nodes)
    per_bucket = []
    for s in range(dataset.num_streams):
        order = _bucket_order(dataset, s, epoch, num_canonical)
        sizes = _bucket_batch_sizes(len(order), dataset.batch_size, num_ranks, dataset.bucket_names[s])
        pools = node_pools(order, num_canonical, num_nodes)
        per_bucket.append(bucket_plan(pools, sizes, dataset.batch_size, num_ranks // num_nodes)[0])
    origins = np.concatenate([np.full(len(b), s, dtype=np.int64) for s, b in enumerate(per_bucket)])
    if dataset.shuffle:
        np.random.default_rng([dataset.shuffle_seed, epoch]).shuffle(origins)
    next_index = [0] * dataset.num_streams
    batches = []
    for s in origins:
        batches.append(per_bucket[s][next_index[s]])
        next_index[s] += 1
    return batches


def completed_batches(batches: list[np.ndarray], sample_in_epoch: int) -> int:
    """How many global batches ``sample_in_epoch`` real samples cover (rounded down, with a warning)."""
    ends = np.cumsum([int((b >= 0).sum()) for b in batches])
    done = int(np.searchsorted(ends, sample_in_epoch, side="right"))
    if sample_in_epoch and (done == 0 or ends[done - 1] != sample_in_epoch):
        log.warning("resuming at sample %d, which is not the end of a global batch; restarting from the "
                    "last complete batch (%d samples)", sample_in_epoch, ends[done - 1] if done else 0)
    return done


def _generate_bucket_work(dataset: "ImageCaptionDataset", world: World, epoch: int,
                          sample_in_epoch: int) -> np.ndarray:
    """streaming batching hook: [nodes, ranks_per_node, workers_per_rank, batches_per_worker, B], -1 = empty."""
    batches = epoch_batches(dataset, epoch, world.num_ranks, world.num_nodes)
    batches = batches[completed_batches(batches, sample_in_epoch):]
    workers, batch_size = world.workers_per_rank, dataset.batch_size
    per_worker = max(1, math.ceil(len(batches) / workers))
    work = np.full((world.num_nodes, world.ranks_per_node, workers, per_worker, batch_size), -1, np.int64)
    for g, batch in enumerate(batches):  # global batch g is the (g // W)-th batch of worker g % W
        work[:, :, g % workers, g // workers] = batch.reshape(world.num_nodes, world.ranks_per_node, batch_size)
    return work


batching_methods[BATCHING_METHOD] = _generate_bucket_work


# ---------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------
def _normalise_caption_columns(caption_columns: str | list[str] | dict[str, float]) -> dict[str, float]:
    if isinstance(caption_columns, str):
        return {caption_columns: 1.0}
    columns = dict(caption_columns) if isinstance(caption_columns, dict) else {c: 1.0 for c in caption_columns}
    if not columns or any(w < 0 for w in columns.values()) or sum(columns.values()) <= 0:
        raise ValueError(f"caption_columns needs non-negative weights with a positive sum, got {columns}")
    check_requested(list(columns))
    return columns


def decode_image(data: Any, choose_bucket: Callable[[int, int], Bucket] | None = None
                 ) -> tuple["Image.Image", tuple[int, int]]:  # noqa: F821
    """Encoded bytes -> (RGB PIL image of its bucket's size, displayed (width, height) as stored).

    ``choose_bucket(height, width)`` (default: the image's own size) picks the size to cover + crop to.
    EXIF orientation and alpha as in the converter (data/imaging.py); CorruptSampleError if undecodable.
    """
    if choose_bucket is None:
        choose_bucket = Bucket
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise CorruptSampleError(f"image column holds {type(data).__name__} of length "
                                 f"{len(data) if hasattr(data, '__len__') else '?'}, not encoded image bytes")
    try:
        image, _, stored_size = load_for_bucket(bytes(data), choose_bucket)
    except Image.DecompressionBombError as exc:
        raise CorruptSampleError(f"image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptSampleError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    return image, stored_size


def image_to_uint8(image: "Image.Image") -> torch.Tensor:  # noqa: F821
    """PIL RGB -> uint8 [3, H, W] (what crosses the worker boundary: a quarter of float32's bytes)."""
    planes = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W] view
    return torch.from_numpy(np.ascontiguousarray(planes))


class ImageCaptionDataset(StreamingDataset):
    """StreamingDataset over image–caption MDS buckets; samples resized to ``resolution`` on the patch grid.

    Each sample -> {"image": uint8 [3, H, W], "caption": str, "corrupt_replaced": bool, optionally
    "text_emb" [T, C] and "text_mask" [T] bool}, where (H, W) is the bucket of the stored
    image's aspect ratio at ``resolution`` (``buckets.nearest_bucket``), reached by scaling to cover
    and centre-cropping (aspect ratio kept), and the caption column is drawn by ``caption_columns``
    weights from an rng seeded by (seed, epoch, sample id). Precomputed embeddings are read from
    columns ``<caption column>_emb`` / ``<caption column>_mask``: uint16 arrays are bf16 bits and stay
    bf16 (``convert --text-encoder``: real tokens only, no mask column), others become float32;
    ``text_embeddings`` is the encoder recorded in buckets.json (or None). ``collate_samples`` pads
    embeddings to the batch's longest and the loader turns the pixels into float in [-1, 1].

    ``resolution`` may be changed between epochs (``set_resolution``); with persistent DataLoader
    workers, rebuild the loader instead (workers hold their own copy).
    """

    def __init__(self, *, streams: list[Stream], bucket_names: list[str], batch_size: int, resolution: int,
                 patch_size: int, caption_columns: str | list[str] | dict[str, float] | None = None,
                 shuffle: bool = True,
                 seed: int = 17, max_ratio: float = 2.0,
                 predownload: int | None = None, cache_limit: int | str | None = None,
                 shuffle_algo: str = "py1e", shuffle_block_size: int | None = None,
                 num_canonical_nodes: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_canonical_nodes is not None and num_canonical_nodes < 1:
            raise ValueError(f"num_canonical_nodes must be >= 1 (or None: the physical node count), "
                             f"got {num_canonical_nodes}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        super().__init__(streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                         shuffle_algo=shuffle_algo, shuffle_block_size=shuffle_block_size,
                         predownload=predownload, cache_limit=cache_limit, batching_method="per_stream",
                         num_canonical_nodes=num_canonical_nodes)
        self.batching_method = BATCHING_METHOD  # registered above; streaming validates only its own names
        self.bucket_names = list(bucket_names)
        self.caption_columns = self._resolve_caption_columns(caption_columns)
        self.max_ratio = max_ratio
        self.patch_size = patch_size
        self.set_resolution(resolution)
        self.num_corrupt = 0
        self._known_corrupt: set[int] = set()
        self._epoch = 0
        self._worker_plan = np.empty(0, dtype=np.int64)
        self._thread_error: BaseException | None = None
        self.text_embeddings: dict[str, Any] | None = None  # buckets.json's record of the embeddings' encoder
        self.root: str | None = None  # the dataset root build_dataset read (for messages)

    def _resolve_caption_columns(self, caption_columns: str | list[str] | dict[str, float] | None
                                 ) -> dict[str, float]:
        """The requested columns (checked against the shards), or data/columns.py's rule over them."""
        strings = sorted({name for shard in self.shards
                          for name, encoding in zip(shard.column_names, shard.column_encodings) if encoding == "str"})
        if caption_columns is None:
            by_rule = caption_columns_of(strings)
            if not by_rule:
                raise ValueError(f"no caption column among the string columns {strings} of the dataset; "
                                 "pass caption_columns")
            return _normalise_caption_columns(by_rule)
        columns = _normalise_caption_columns(caption_columns)
        missing = [c for c in columns if c not in strings]
        if missing:
            raise ValueError(f"caption columns {missing} are not string columns of the dataset (string columns: "
                             f"{strings}); pass caption_columns from {caption_columns_of(strings) or strings}")
        return columns

    def set_resolution(self, resolution: int) -> None:
        """Resize target for the next iterator: buckets of the table at (resolution, patch_size)."""
        if resolution % self.patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch_size {self.patch_size}")
        self.resolution = resolution

    def __len__(self) -> int:
        """Per-rank sample slots of one epoch: (global batches) x batch_size, so len(loader) = batches."""
        num_ranks = self._parallel_rank_world.num_ranks
        global_batch = self.batch_size * num_ranks
        batches = sum(max(1, math.ceil(int(n) / global_batch)) for n in self.samples_per_stream)
        return batches * self.batch_size

    # --- hooks into StreamingDataset's iteration -------------------------------------------------
    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        self._worker_plan = super()._get_work(epoch, sample_in_epoch)
        return self._worker_plan

    def on_exception(self, future: Future) -> None:
        """Remember why a download/ready thread failed, so the iterator can raise that cause."""
        if future.exception() is not None:
            self._thread_error = future.exception()
        super().on_exception(future)

    def _background_failure(self, cause: BaseException | None = None) -> RuntimeError:
        error = self._thread_error
        if error is None:
            return RuntimeError("the streaming iterator ended before this worker's epoch plan was complete"
                                + (f" ({type(cause).__name__}: {cause})" if cause else ""))
        failed = RuntimeError(f"streaming's download thread failed: {type(error).__name__}: {error}; check the "
                              "remote path and credentials, or raise download_retry / download_timeout")
        failed.__cause__ = error
        return failed

    def __iter__(self) -> Iterator[dict[str, Any] | _Pad]:
        """Samples of this worker in plan order; empty slots of a short batch become PAD markers."""
        self._thread_error = None
        inner = super().__iter__()
        try:
            first = next(inner, None)  # runs the epoch set-up, which stores this worker's plan
        except RuntimeError as exc:
            raise self._background_failure(exc) from exc
        plan = self._worker_plan.reshape(-1, self.batch_size)
        if first is None:
            if (plan >= 0).any():
                raise self._background_failure()
            return
        pending = [first]
        for row in plan:
            real = int((row >= 0).sum())
            if real == 0:
                continue  # padding row at the end of a worker's share: no batch at all
            try:
                for _ in range(real - len(pending)):
                    pending.append(next(inner))
            except StopIteration:
                raise self._background_failure() from None
            except RuntimeError as exc:
                if self._thread_error is None:
                    raise
                raise self._background_failure(exc) from exc
            yield from pending
            pending = []
            yield from [PAD] * (self.batch_size - real)

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Resumption state; ``num_samples`` counts real samples seen this epoch (Composer passes that).

        ``num_samples == 0`` is an epoch boundary (Composer checkpoints there after the epoch ends):
        the state names the next epoch not yet started, so a resume continues rather than replays.
        """
        if not from_beginning:
            raise ValueError("ImageCaptionDataset counts samples from the start of the epoch "
                             "(from_beginning=True, as Composer does); a plain DataLoader is expected")
        state = super().state_dict(num_samples, from_beginning)
        if num_samples == 0:
            state["epoch"] = max(int(state["epoch"]), self.next_epoch)
        state["global_batch_size"] = self.batch_size * self._parallel_rank_world.num_ranks
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        saved = obj.get("global_batch_size")
        current = self.batch_size * self._parallel_rank_world.num_ranks
        if saved is not None and saved != current and obj.get("sample_in_epoch", 0):
            raise ValueError(f"checkpoint was taken mid-epoch with global batch {saved}, now {current}; "
                             "resume with the same batch_size x world size, or resume at an epoch boundary")
        super().load_state_dict(obj)

    # --- per sample ------------------------------------------------------------------------------
    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        """Decoded sample; a corrupt one is replaced by the next decodable sample of its bucket."""
        shard_id, _ = self.spanner[sample_id]
        stream_id = int(self.stream_per_shard[shard_id])
        start = int(self.sample_offset_per_stream[stream_id])
        count = int(self.samples_per_stream[stream_id])
        for step in range(min(count, MAX_CORRUPT_IN_A_ROW)):
            candidate = start + (sample_id - start + step) % count
            if candidate in self._known_corrupt:
                continue
            try:
                sample = self.decode(self.get_item(candidate), candidate)
            except CorruptSampleError as exc:
                self._known_corrupt.add(candidate)
                log.warning("skipping corrupt sample %d (shard %s of bucket %s): %s", candidate,
                            self.shards[self.spanner[candidate][0]].raw_data.basename,
                            self.bucket_names[stream_id], exc)
                continue
            sample["corrupt_replaced"] = step > 0
            self.num_corrupt += step > 0  # one per replaced slot, however long the run of corrupt samples
            return sample
        raise RuntimeError(f"{min(count, MAX_CORRUPT_IN_A_ROW)} consecutive samples from {sample_id} in bucket "
                           f"{self.bucket_names[stream_id]} are corrupt; check the data (see the warnings above)")

    def _choose_caption(self, raw: dict[str, Any], sample_id: int) -> tuple[str, str]:
        """(column, caption text) drawn by the column weights; the other columns are the fallbacks."""
        names = list(self.caption_columns)
        weights = np.array([self.caption_columns[n] for n in names], dtype=np.float64)
        rng = np.random.default_rng([self.shuffle_seed, self._epoch, sample_id])
        first = int(rng.choice(len(names), p=weights / weights.sum()))
        for name in [names[first]] + [n for n in names if n != names[first]]:
            text = raw.get(name)
            if isinstance(text, str) and text.strip():
                if name != names[first]:
                    log.debug("sample %d: caption column %r empty, used %r", sample_id, names[first], name)
                return name, text
        raise CorruptSampleError(f"no caption in columns {names}")

    def _bucket_at_resolution(self, height: int, width: int) -> Bucket:
        return nearest_bucket(height, width, self.resolution, self.patch_size, self.max_ratio)

    def decode(self, raw: dict[str, Any], sample_id: int) -> dict[str, Any]:
        """Raw MDS columns -> training sample (see class docstring); CorruptSampleError if unusable."""
        column, caption = self._choose_caption(raw, sample_id)
        image, (width, height) = decode_image(raw.get("image"), self._bucket_at_resolution)
        recorded = (raw.get("width"), raw.get("height"))
        if None not in recorded and recorded not in ((width, height), (height, width)):
            raise CorruptSampleError(f"image is {width}x{height} but the sample records {recorded[0]}x{recorded[1]}")
        sample: dict[str, Any] = {"image": image_to_uint8(image), "caption": caption}
        if f"{column}_emb" in raw:
            stored = np.asarray(raw[f"{column}_emb"])
            emb = (from_bf16_bits(stored) if stored.dtype == np.uint16  # bf16 bits (convert --text-encoder)
                   else torch.from_numpy(stored.astype(np.float32)))  # [T, C]
            mask = raw.get(f"{column}_mask")
            sample["text_emb"] = emb
            sample["text_mask"] = (torch.from_numpy(np.asarray(mask).astype(bool)) if mask is not None
                                   else torch.ones(emb.shape[0], dtype=torch.bool))
        return sample


def collate_samples(items: list[dict[str, Any] | _Pad]) -> dict[str, Any]:
    """Stack samples of one bucket into a batch dict, dropping PAD slots (a bucket's short last batch).

    Runs in the DataLoader worker: "image" stays uint8 [B, 3, H, W] here (see ``ImageCaptionLoader``).
    """
    samples = [s for s in items if not isinstance(s, _Pad)]
    if not samples:
        raise ValueError("a batch with no samples reached collate; the epoch plan guarantees >= 1 per rank")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"batch mixes image sizes {sorted(shapes)}: an MDS folder must hold one aspect-ratio "
                         "bucket; convert the data with python -m composer_prx.data.convert")
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "corrupt_replaced": torch.tensor([bool(s["corrupt_replaced"]) for s in samples]),
    }
    with_emb = sum("text_emb" in s for s in samples)
    if with_emb not in (0, len(samples)):
        raise ValueError(f"{with_emb} of {len(samples)} samples have precomputed text embeddings; "
                         "all or none of the chosen caption columns must carry <column>_emb")
    if with_emb:  # trimmed embeddings of different lengths: zeros after each caption, masked out
        longest = max(s["text_emb"].shape[0] for s in samples)
        batch["text_emb"] = torch.stack([F.pad(s["text_emb"], (0, 0, 0, longest - s["text_emb"].shape[0]))
                                         for s in samples])
        batch["text_mask"] = torch.stack([F.pad(s["text_mask"], (0, longest - s["text_mask"].shape[0]), value=False)
                                          for s in samples])
    return batch


class ImageCaptionLoader(DataLoader):
    """DataLoader whose batches cross the worker boundary with uint8 images, normalised in this process.

    ``image_dtype="float32"`` (default): "image" is float32 in [-1, 1] (``normalise_image``);
    ``"uint8"``: left as uint8 [B, 3, H, W] for a model that normalises on its device.
    """

    def __init__(self, *args: Any, image_dtype: str = "float32", **kwargs: Any) -> None:
        if image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
        super().__init__(*args, **kwargs)
        self.image_dtype = image_dtype

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = super().__iter__()
        if self.image_dtype == "uint8":
            yield from batches
            return
        for batch in batches:
            batch["image"] = normalise_image(batch["image"])
            yield batch


# ---------------------------------------------------------------------------------------------------
# Corrupt-sample count per epoch, over workers and ranks
# ---------------------------------------------------------------------------------------------------
class CorruptSampleCounter(Callback):
    """Logs ``data/corrupt_replaced`` (slots filled by a neighbour, summed over ranks) at every epoch end.

    Reads the batch's ``corrupt_replaced`` flags, so DataLoader workers are counted too. Also logs
    ``data/corrupt_replaced_fraction`` (of the epoch's samples) and warns when it is not zero.
    """

    def __init__(self) -> None:
        self._replaced = 0
        self._samples = 0

    def epoch_start(self, state: State, logger: Logger) -> None:
        self._replaced = self._samples = 0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        flags = state.batch.get("corrupt_replaced") if isinstance(state.batch, dict) else None
        if flags is not None:
            self._replaced += int(flags.sum())
            self._samples += int(flags.numel())

    def epoch_end(self, state: State, logger: Logger) -> None:
        from composer.utils import dist

        counts = state.device.tensor_to_device(torch.tensor([self._replaced, self._samples], dtype=torch.int64))
        dist.all_reduce(counts, reduce_operation="SUM")
        replaced, samples = (int(v) for v in counts.cpu().tolist())
        logger.log_metrics({"data/corrupt_replaced": replaced,
                            "data/corrupt_replaced_fraction": replaced / max(1, samples)})
        if replaced:
            log.warning("epoch %d: %d of %d samples were unreadable and replaced by a neighbour in their bucket",
                        int(state.timestamp.epoch) - 1, replaced, samples)


# ---------------------------------------------------------------------------------------------------
# Discovery and loader
# ---------------------------------------------------------------------------------------------------
def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


def _fetch_manifest(remote: str, local: str, download_timeout: float, download_retry: int) -> None:
    """Download buckets.json (else index.json) of ``remote`` into ``local``: local rank 0 fetches, others wait."""
    from composer.utils import dist

    from composer_prx.data.convert import fetch_file

    if dist.get_local_rank() == 0:
        os.makedirs(local, exist_ok=True)
        for name in (BUCKETS_FILE, "index.json"):
            if fetch_file(_join(remote, name), os.path.join(local, name), download_timeout, download_retry + 1):
                break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def discover_buckets(remote: str | None, local: str, download_timeout: float = 60.0,
                     download_retry: int = 2) -> tuple[list[str], dict[str, Any]]:
    """(bucket sub-folder names, buckets.json or {}); names are [""] when the root is one MDS folder.

    With a remote, ``buckets.json`` (else ``index.json``) is fetched into ``local`` first (once per
    node, atomically). A conversion in progress or interrupted (buckets.json "status": "in_progress")
    is refused.
    """
    if remote is not None:
        _fetch_manifest(remote, local, download_timeout, download_retry)
    manifest_path = os.path.join(local, BUCKETS_FILE)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("status") == IN_PROGRESS:
            raise RuntimeError(f"the dataset at {remote or local} is being written by composer_prx.data.convert, "
                               "or that conversion was interrupted (buckets.json says in_progress); wait for it "
                               "to finish or re-run the same convert command")
        return [b["name"] for b in manifest["buckets"]], manifest
    if os.path.exists(os.path.join(local, "index.json")):
        return [""], {}
    if remote is None and os.path.isdir(local):
        names = sorted(d for d in os.listdir(local) if os.path.exists(os.path.join(local, d, "index.json")))
        if names:
            return names, {}
    where = f"remote {remote!r}" if remote else f"local {local!r}"
    raise FileNotFoundError(f"no MDS dataset at {where}: expected {BUCKETS_FILE}, index.json, or bucket folders "
                            "with index.json; create one with python -m composer_prx.data.convert "
                            "(or composer_prx.data.shapes.write_shapes_mds)")


def build_dataset(remote: str | None, local: str, batch_size: int, resolution: int, patch_size: int, *,
                  shuffle: bool = True, seed: int = 17,
                  caption_columns: str | list[str] | dict[str, float] | None = None,
                  max_ratio: float = 2.0, download_retry: int = 2, download_timeout: float = 60.0,
                  predownload: int | None = None, cache_limit: int | str | None = None,
                  num_canonical_nodes: int | None = None) -> ImageCaptionDataset:
    """The ``ImageCaptionDataset`` behind ``build_dataloader`` (same arguments)."""
    local = os.fspath(local)
    names, manifest = discover_buckets(remote, local, download_timeout, download_retry)
    if download_retry < 0:
        raise ValueError(f"download_retry must be >= 0 (re-attempts after a failed download), got {download_retry}")
    streams = [Stream(remote=None if remote is None else (_join(remote, n) if n else remote),
                      local=os.path.join(local, n) if n else local,
                      # streaming uses this number as the total attempts: one more than the re-attempts
                      download_retry=download_retry + 1, download_timeout=download_timeout)
               for n in names]
    if caption_columns is None:
        caption_columns = manifest.get("caption_columns")  # None: the dataset applies data/columns.py's rule
    dataset = ImageCaptionDataset(streams=streams, bucket_names=[n or os.path.basename(local.rstrip("/")) for n in names],
                                  batch_size=batch_size, resolution=resolution, patch_size=patch_size,
                                  shuffle=shuffle, seed=seed, caption_columns=caption_columns,
                                  max_ratio=max_ratio, predownload=predownload, cache_limit=cache_limit,
                                  num_canonical_nodes=num_canonical_nodes)
    dataset.text_embeddings = manifest.get("text_embeddings")
    dataset.root = remote or local
    return dataset


def build_dataloader(remote: str | None, local: str, batch_size: int, resolution: int, patch_size: int, *,
                     shuffle: bool = True, seed: int = 17, num_workers: int = 0,
                     caption_columns: str | list[str] | dict[str, float] | None = None,
                     max_ratio: float = 2.0, download_retry: int = 2, download_timeout: float = 60.0,
                     predownload: int | None = None, cache_limit: int | str | None = None,
                     persistent_workers: bool = False, pin_memory: bool = False,
                     prefetch_factor: int | None = None, image_dtype: str = "float32",
                     num_canonical_nodes: int | None = None) -> ImageCaptionLoader:
    """Per-device DataLoader of image–caption batches from MDS buckets (local path or s3:// / gs:// ...).

    remote: dataset root in object storage, or None to read ``local`` directly; local: cache / dataset
    root (one MDS folder with index.json, or bucket folders + buckets.json). batch_size: per device.
    resolution, patch_size: images are scaled to cover their aspect-ratio bucket at ``resolution`` on the
    ``patch_size`` grid and centre-cropped to it. seed: shuffle order and caption choice.
    caption_columns: a column name, a list (equal weights) or {column: weight}; default: the columns
    the converter recorded in buckets.json (equal weights), else data/columns.py's rule over the
    folder's string columns. image_dtype: "float32" (in [-1, 1]) or "uint8" (normalise on the device).
    num_canonical_nodes: shard partitions of the epoch plan, each read by one node (default: the
    physical node count; a multiple or divisor of it; kept by a checkpoint).

    Batches: {"image": float [B, 3, H, W] in [-1, 1], "caption": list[str], "corrupt_replaced": bool [B]}
    (+ "text_emb" [B, T, C], "text_mask" [B, T] bool when the shards carry embeddings). B is
    ``batch_size`` except for a bucket's last batch. ``loader.dataset`` has ``state_dict`` /
    ``load_state_dict``, which Composer checkpoints for exact mid-epoch resumption.
    """
    dataset = build_dataset(remote, local, batch_size, resolution, patch_size, shuffle=shuffle, seed=seed,
                            caption_columns=caption_columns, max_ratio=max_ratio, download_retry=download_retry,
                            download_timeout=download_timeout, predownload=predownload, cache_limit=cache_limit,
                            num_canonical_nodes=num_canonical_nodes)
    extra = {} if num_workers == 0 else {"persistent_workers": persistent_workers,
                                         "prefetch_factor": prefetch_factor or 2}
    return ImageCaptionLoader(dataset, batch_size=batch_size, collate_fn=collate_samples, num_workers=num_workers,
                              pin_memory=pin_memory, drop_last=False, image_dtype=image_dtype, **extra)
