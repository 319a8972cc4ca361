"""Streaming image–caption dataset: per-bucket batches, exactly-once epochs, resumption, corrupt samples."""

import collections
import logging

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
        num_streams, batch_size, shuffle, shuffle_seed = 2, 4, False, 0
        bucket_names = ["a", "b"]
        shard_offset_per_stream = np.array([0, 1])
        shards_per_stream = np.array([1, 1])
        samples_per_shard = np.array([17, 1])
        sample_offset_per_stream = np.array([0, 17])

    batches = epoch_batches(FakeDataset(), epoch=0, num_ranks=2)
    sizes = [len(b) for b in batches]
    assert sum(sizes[:-1]) == 17 and all(s >= 2 for s in sizes)  # tail of 1 borrowed from the batch before
    assert collections.Counter(np.concatenate(batches[:-1]).tolist()) == collections.Counter(range(17))
    assert len(batches[-1]) == 2 and set(batches[-1].tolist()) == {17}  # 1-sample bucket repeated for 2 ranks


def test_missing_dataset_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="composer_prx.data.convert"):
        build_dataloader(None, str(tmp_path / "nothing"), batch_size=2, resolution=32, patch_size=4)


def test_two_ranks_cover_the_epoch_once_and_resume_exactly(tmp_path):
    import json
    import os
    import subprocess

    from composer_prx.bench.common import composer_launch

    expected = write_buckets(tmp_path / "ds", SIZES)
    out = tmp_path / "out"
    out.mkdir()
    script = os.path.join(os.path.dirname(__file__), "dist_epoch.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*composer_launch(2, "--stdout", str(out / "log{rank}.txt"), "--stderr",
                             str(out / "err{rank}.txt"), script, str(tmp_path / "ds"), str(out))],
                            env=env, capture_output=True, text=True, timeout=300)
    logs = "".join((out / f).read_text() for f in os.listdir(out) if f.endswith(".txt"))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["full"]) == len(ranks[1]["full"]) == ranks[0]["len"]  # same number of steps
    for step0, step1 in zip(ranks[0]["full"], ranks[1]["full"]):
        assert step0["shape"] == step1["shape"]  # both ranks train on the same bucket at each step
    seen = [c for r in ranks for b in r["full"] for c in b["caption"]]
    assert sorted(seen) == sorted(expected)
    resumed = [c for r in ranks for part in ("before", "after") for b in r[part] for c in b]
    assert sorted(resumed) == sorted(expected)
    assert len(ranks[0]["after"]) == len(ranks[1]["after"])


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
