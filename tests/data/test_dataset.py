"""Streaming image–caption dataset: per-bucket batches, exactly-once epochs, resumption, corrupt samples."""

import collections
import logging
import os

import numpy as np
import pytest
import torch

from composer_prx.data.dataset import build_dataloader, epoch_batches
from tests.data.conftest import write_buckets

# Uneven bucket sizes: tails smaller than a batch, and one bucket smaller than a batch.
SIZES = {(32, 32): 23, (24, 40): 11, (40, 24): 3}


def _captions(batches):
    return [c for b in batches for c in b["caption"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_covers_every_sample_once_with_single_bucket_batches(tmp_path, num_workers):
    expected = write_buckets(tmp_path / "ds", SIZES)
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=4, resolution=32, patch_size=4,
                              shuffle=True, seed=3, num_workers=num_workers)
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        seen = _captions(batches)
        assert sorted(seen) == sorted(expected), f"epoch {epoch}"
        for batch in batches:
            assert batch["image"].dtype == torch.float32 and batch["image"].shape[1] == 3
            assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
            assert batch["image"].shape[2] % 4 == 0 and batch["image"].shape[3] % 4 == 0
            assert 1 <= len(batch["caption"]) <= 4
            assert batch["corrupt_replaced"].tolist() == [False] * len(batch["caption"])
        shapes = {tuple(b["image"].shape[2:]) for b in batches}
        assert len(shapes) == 3  # three buckets, each batch from exactly one
        if epoch == 0:
            first_order = seen
    assert seen != first_order  # reshuffled per epoch


def test_order_is_seeded_and_resolution_is_applied(tmp_path):
    write_buckets(tmp_path / "ds", {(64, 64): 10})
    orders = []
    for seed in (1, 1, 2):
        loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=5, resolution=32, patch_size=8, seed=seed)
        batches = list(loader)
        assert batches[0]["image"].shape == (5, 3, 32, 32)  # 64 px stored -> 32 px resolution
        orders.append(_captions(batches))
        del loader, batches
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_mid_epoch_resume_through_state_dict_loses_and_repeats_nothing(tmp_path):
    expected = write_buckets(tmp_path / "ds", SIZES)
    kwargs = dict(batch_size=4, resolution=32, patch_size=4, shuffle=True, seed=11)
    loader = build_dataloader(None, str(tmp_path / "ds"), **kwargs)
    it = iter(loader)
    before = [next(it) for _ in range(5)]
    state = loader.dataset.state_dict(num_samples=len(_captions(before)), from_beginning=True)
    full_epoch = _captions(before) + _captions(list(it))
    del it, loader
    resumed = build_dataloader(None, str(tmp_path / "ds"), **kwargs)
    resumed.dataset.load_state_dict(state)
    after = _captions(list(resumed))
    assert _captions(before) + after == full_epoch  # same order as the uninterrupted epoch
    assert sorted(_captions(before) + after) == sorted(expected)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again


def test_corrupt_samples_are_replaced_counted_and_logged(tmp_path, caplog):
    corrupt = {2, 5, 30}
    expected = write_buckets(tmp_path / "ds", SIZES, corrupt=corrupt)
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=4, resolution=32, patch_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="composer_prx.data.dataset"):
        batches = list(loader)
    seen = _captions(batches)
    assert len(seen) == len(expected)  # batch sizes kept
    assert not {f"sample-{i}" for i in corrupt} & set(seen)
    assert loader.dataset.num_corrupt == len(corrupt)
    assert sum(int(b["corrupt_replaced"].sum()) for b in batches) == len(corrupt)
    messages = [r.getMessage() for r in caplog.records]
    for i in corrupt:
        assert any(f"corrupt sample {i} " in m for m in messages)
    # every replacement comes from the same bucket as the corrupt sample (batches stay per-bucket)
    assert all(len({tuple(img.shape) for img in b["image"]}) == 1 for b in batches)


def test_caption_column_choice_is_weighted_and_deterministic_per_epoch(tmp_path):
    write_buckets(tmp_path / "ds", {(32, 32): 40}, extra_columns={"short": "str"},
                  make_extra=lambda i: {"short": f"short-{i}"})
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=8, resolution=32, patch_size=4, seed=4,
                              caption_columns={"caption": 1.0, "short": 3.0})
    epochs = [sorted(_captions(list(loader))) for _ in range(2)]
    for captions in epochs:
        ids = sorted(int(c.split("-")[1]) for c in captions)
        assert ids == list(range(40))
        n_short = sum(c.startswith("short") for c in captions)
        assert 20 <= n_short <= 38  # ~3/4 short
    assert epochs[0] != epochs[1]  # a different draw per epoch
    del loader
    again = build_dataloader(None, str(tmp_path / "ds"), batch_size=8,
                             resolution=32, patch_size=4, seed=4, caption_columns={"caption": 1.0, "short": 3.0})
    assert sorted(_captions(list(again))) == epochs[0]


def test_precomputed_embeddings_are_batched(tmp_path):
    write_buckets(tmp_path / "ds", {(32, 32): 6}, extra_columns={"caption_emb": "ndarray:float16",
                                                                "caption_mask": "ndarray:uint8"},
                  make_extra=lambda i: {"caption_emb": np.full((5, 8), i, np.float16),
                                        "caption_mask": (np.arange(5) < 3).astype(np.uint8)})
    batch = next(iter(build_dataloader(None, str(tmp_path / "ds"), batch_size=3, resolution=32, patch_size=4)))
    assert batch["text_emb"].shape == (3, 5, 8) and batch["text_emb"].dtype == torch.float32
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"][0].tolist() == [True] * 3 + [False] * 2
    ids = [int(c.split("-")[1]) for c in batch["caption"]]
    assert batch["text_emb"][:, 0, 0].tolist() == ids


def test_plan_splits_tails_over_ranks():
    class FakeDataset:  # only the fields the epoch plan reads
        num_streams, batch_size, shuffle, shuffle_seed, num_canonical_nodes = 2, 4, False, 0, None
        bucket_names = ["a", "b"]
        shard_offset_per_stream = np.array([0, 1])
        shards_per_stream = np.array([1, 1])
        samples_per_shard = np.array([17, 1])
        sample_offset_per_stream = np.array([0, 17])

    batches = epoch_batches(FakeDataset(), epoch=0, num_ranks=2)  # [ranks, batch_size] ids, -1 = empty
    assert all(b.shape == (2, 4) for b in batches)
    assert all((b >= 0).sum(1).min() >= 1 for b in batches)  # every rank gets a sample of every batch
    sizes = [int((b >= 0).sum()) for b in batches]
    assert sum(sizes[:-1]) == 17 and all(s >= 2 for s in sizes)  # tail of 1 borrowed from the batch before
    real = [b[b >= 0] for b in batches]
    assert collections.Counter(np.concatenate(real[:-1]).tolist()) == collections.Counter(range(17))
    assert len(real[-1]) == 2 and set(real[-1].tolist()) == {17}  # 1-sample bucket repeated for 2 ranks


def test_missing_dataset_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="composer_prx.data.convert"):
        build_dataloader(None, str(tmp_path / "nothing"), batch_size=2, resolution=32, patch_size=4)


# awkward bucket sizes: tails of 1 and 2, a bucket smaller than one global batch, one of fewer samples than ranks
AWKWARD = {(32, 32): 23, (24, 40): 11, (40, 24): 3, (36, 28): 2}


@pytest.mark.parametrize("ranks,batch_size", [(2, 4), (3, 1)])
def test_every_rank_yields_the_same_batches_and_the_epoch_once(tmp_path, ranks, batch_size):
    import json
    import subprocess

    from composer_prx.bench.common import composer_launch

    expected = write_buckets(tmp_path / "ds", AWKWARD)
    out = tmp_path / "out"
    out.mkdir()
    script = os.path.join(os.path.dirname(__file__), "dist_epoch.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*composer_launch(ranks, "--stdout", str(out / "log{rank}.txt"), "--stderr",
                             str(out / "err{rank}.txt"), script, str(tmp_path / "ds"), str(out),
                             str(batch_size))], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join((out / f).read_text() for f in os.listdir(out) if f.endswith(".txt"))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert len({len(r["full"]) for r in per_rank}) == 1 and len(per_rank[0]["full"]) == per_rank[0]["len"]
    for steps in zip(*(r["full"] for r in per_rank)):
        assert len({tuple(s["shape"]) for s in steps}) == 1  # all ranks train on the same bucket at each step
    seen = collections.Counter(c for r in per_rank for b in r["full"] for c in b["caption"])
    assert set(seen) == set(expected)  # every sample at least once
    # repeats, exactly as documented: batch_size 1 pads each bucket to a multiple of the ranks; larger
    # batches only pad a bucket with fewer samples than ranks
    if batch_size == 1:
        repeats = sum(-n % ranks for n in AWKWARD.values())
    else:
        repeats = sum(ranks - n for n in AWKWARD.values() if n < ranks)
    assert sum(seen.values()) - len(expected) == repeats
    resumed = collections.Counter(c for r in per_rank for part in ("before", "after") for b in r[part] for c in b)
    assert set(resumed) == set(expected) and sum(resumed.values()) == sum(seen.values())  # (another epoch)
    assert len({len(r["after"]) for r in per_rank}) == 1


def test_composer_trainer_checkpoint_resumes_mid_epoch(tmp_path):
    from composer import Trainer
    from composer.models import ComposerModel

    class Recorder(ComposerModel):
        """Smallest trainable model; remembers the captions of every batch it trained on."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[str] = []

        def forward(self, batch):
            self.seen += batch["caption"]
            return (batch["image"].mean() * self.weight).reshape(1)

        def loss(self, outputs, batch):
            return (outputs - 1.0).pow(2).mean()

    expected = write_buckets(tmp_path / "ds", SIZES)

    def trainer(model, **kw):
        loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=4, resolution=32, patch_size=4, seed=9)
        return Trainer(model=model, train_dataloader=loader, max_duration="1ep", device="cpu",
                       save_folder=str(tmp_path / "ckpt"), save_interval="4ba", progress_bar=False,
                       log_to_console=False, **kw)

    first = Recorder()
    trainer(first).fit(duration="4ba")
    before = list(first.seen)
    second = Recorder()
    trainer(second, load_path=str(tmp_path / "ckpt" / "latest-rank0.pt")).fit()
    after = list(second.seen)
    assert 12 <= len(before) <= 16  # 4 batches, one may be a short bucket tail
    assert sorted(before + after) == sorted(expected)


# --- issue 11 ---------------------------------------------------------------------------------------
def _circle_image(height, width, radius):
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - height / 2 + 0.5) ** 2 + (xx - width / 2 + 0.5) ** 2 <= radius ** 2
    pixels = np.full((height, width, 3), 255, np.uint8)
    pixels[inside] = 0
    return pixels


def test_training_below_the_stored_resolution_keeps_the_aspect_ratio(tmp_path):
    from streaming import MDSWriter

    from tests.data.conftest import encode

    # stored 56x72 (a 64-base bucket); at resolution 32, patch 8 its nearest bucket is 32x32 (aspect 1.29 -> 1)
    with MDSWriter(out=str(tmp_path / "ds" / "h56_w72"),
                   columns={"image": "bytes", "caption": "str", "width": "int", "height": "int"}) as writer:
        writer.write({"image": encode(_circle_image(56, 72, 20)), "caption": "a circle", "width": 72, "height": 56})
    batch = next(iter(build_dataloader(None, str(tmp_path / "ds"), batch_size=1, resolution=32, patch_size=8)))
    assert batch["image"].shape == (1, 3, 32, 32)
    dark = batch["image"][0, 0] < 0  # [H, W]
    rows, cols = np.nonzero(dark.numpy())
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(width / height - 1.0) < 0.1, (height, width)  # a circle stays a circle (a stretch gives ~0.78)


def test_runs_of_corrupt_samples_count_once_per_slot(tmp_path):
    corrupt = {3, 4, 5}  # a run of three in the 23-sample bucket
    write_buckets(tmp_path / "ds", SIZES, corrupt=corrupt)
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=4, resolution=32, patch_size=4, seed=0)
    batches = list(loader)
    assert sum(int(b["corrupt_replaced"].sum()) for b in batches) == 3
    assert loader.dataset.num_corrupt == 3  # not 1 + 2 + 3 = 6
    seen = collections.Counter(_captions(batches))
    assert seen["sample-6"] == 4  # the neighbour after the run fills the three slots once more each
    assert sum(seen.values()) == sum(SIZES.values())


def test_corrupt_count_is_logged_per_epoch_over_workers_by_the_trainer(tmp_path):
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerModel

    from composer_prx.data.dataset import CorruptSampleCounter

    class Tiny(ComposerModel):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            return (batch["image"].mean() * self.weight).reshape(1)

        def loss(self, outputs, batch):
            return (outputs - 1.0).pow(2).mean()

    write_buckets(tmp_path / "ds", SIZES, corrupt={2, 5, 6, 30})
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=4, resolution=32, patch_size=4, seed=0,
                              num_workers=2)
    memory = InMemoryLogger()
    Trainer(model=Tiny(), train_dataloader=loader, max_duration="2ep", device="cpu", loggers=[memory],
            callbacks=[CorruptSampleCounter()], progress_bar=False, log_to_console=False).fit()
    logged = [int(v) for _, v in memory.data["data/corrupt_replaced"]]
    assert logged == [4, 4]  # once per epoch, counted in the workers
    assert loader.dataset.num_corrupt == 0  # the main process decoded nothing: the callback is the count


def test_images_cross_the_worker_boundary_as_uint8(tmp_path):
    from composer_prx.data.dataset import collate_samples

    write_buckets(tmp_path / "ds", {(32, 32): 4})
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=2, resolution=32, patch_size=4, shuffle=False)
    raw = collate_samples([loader.dataset[0], loader.dataset[1]])
    assert raw["image"].dtype == torch.uint8  # what the worker sends
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.float32 and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert torch.equal(batch["image"], raw["image"].float() / 127.5 - 1)
    as_uint8 = build_dataloader(None, str(tmp_path / "ds"), batch_size=2, resolution=32, patch_size=4,
                                shuffle=False, image_dtype="uint8")
    assert torch.equal(next(iter(as_uint8))["image"], raw["image"])


def test_epoch_boundary_checkpoint_resumes_with_the_next_epoch(tmp_path):
    write_buckets(tmp_path / "ds", SIZES, extra_columns={"short": "str"},
                  make_extra=lambda i: {"short": f"short-{i}"})
    kwargs = dict(batch_size=4, resolution=32, patch_size=4, seed=8, caption_columns=["caption", "short"])
    loader = build_dataloader(None, str(tmp_path / "ds"), **kwargs)
    first = _captions(list(loader))
    state = loader.dataset.state_dict(num_samples=0, from_beginning=True)  # what Composer saves at epoch end
    second = _captions(list(loader))
    del loader
    resumed = build_dataloader(None, str(tmp_path / "ds"), **kwargs)
    resumed.dataset.load_state_dict(state)
    after = _captions(list(resumed))
    assert after == second and after != first  # order and caption draws of epoch 1, not a replay of epoch 0


def test_fetch_replaces_the_cached_manifest_atomically(tmp_path, monkeypatch):
    from streaming.base.storage.download import CloudDownloader

    from composer_prx.data.convert import fetch_file

    local = tmp_path / "cache" / "buckets.json"
    local.parent.mkdir()
    local.write_text('{"old": true}')
    seen_during_download = []

    def download(remote, path, timeout):
        seen_during_download.append(local.exists())  # another rank reading now must find a file
        with open(path, "w") as f:
            f.write('{"new": true}')

    monkeypatch.setattr(CloudDownloader, "direct_download", staticmethod(download))
    assert fetch_file("s3://bucket/buckets.json", str(local))
    assert seen_during_download == [True] and local.read_text() == '{"new": true}'
    assert sorted(os.listdir(local.parent)) == ["buckets.json"]  # no partial file left


def test_a_failed_download_thread_surfaces_its_cause(tmp_path):
    import glob

    write_buckets(tmp_path / "remote", {(32, 32): 40})
    shards = sorted(glob.glob(str(tmp_path / "remote" / "h32_w32" / "shard.*.mds")))
    assert len(shards) > 2
    os.remove(shards[1])
    loader = build_dataloader(str(tmp_path / "remote"), str(tmp_path / "cache"), batch_size=4, resolution=32,
                              patch_size=4, shuffle=False, download_retry=0)
    with pytest.raises(RuntimeError, match="download thread failed") as info:
        list(loader)
    assert os.path.basename(shards[1]) in str(info.value) and "StopIteration" not in str(info.value)
