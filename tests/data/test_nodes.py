"""Node partitioning of the epoch plan: each simulated node reads its own shards, the epoch stays exact."""

import collections

import numpy as np
import pytest
from streaming.base.world import World

from composer_prx.data.dataset import (_bucket_batch_sizes, _generate_bucket_work, bucket_plan, build_dataset,
                                       epoch_batches, node_pools)
from tests.data.conftest import write_buckets

# 8x8 PNGs of ~250 bytes: about 12 samples per 4 KiB shard, so a shard is shared unless the plan keeps it home
BUCKETS = {(8, 8): 150, (8, 16): 61, (16, 8): 23}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes") / "ds"
    write_buckets(root, BUCKETS, size_limit=1 << 12)
    ds = build_dataset(None, str(root), batch_size=3, resolution=16, patch_size=8, seed=6)
    assert np.median(ds.samples_per_shard) >= 6  # the test needs several samples per shard
    yield ds
    del ds


def _stream_of_sample(dataset):
    """[samples] bucket (stream) index of every global sample id."""
    return np.repeat(np.arange(dataset.num_streams), dataset.samples_per_stream)


def _node_shards(dataset, work):
    """Per physical node, the set of shards its ranks read samples from."""
    return [{int(dataset.spanner[int(i)][0]) for i in node[node >= 0]} for node in work]


@pytest.mark.parametrize("nodes", [2, 3])
def test_each_node_reads_about_one_nth_of_the_bytes(dataset, nodes):
    shard_bytes = np.array([s.get_raw_size() for s in dataset.shards])
    total = int(shard_bytes.sum())
    work = _generate_bucket_work(dataset, World(nodes, 2, 1, 0), 0, 0)
    shards = _node_shards(dataset, work)
    per_node = [int(shard_bytes[sorted(s)].sum()) for s in shards]
    # a shard is read by two nodes only where a canonical-node boundary splits it: <= nodes - 1 per bucket
    shared = [s for s in range(len(shard_bytes)) if sum(s in node for node in shards) > 1]
    assert len(shared) <= (nodes - 1) * len(BUCKETS), shared
    assert sum(per_node) <= total + int(shard_bytes[shared].sum())
    for read in per_node:
        assert abs(read - total / nodes) <= 0.12 * total, (per_node, total)
    # one canonical node (streaming's partition off): every node reads nearly every shard
    dataset.num_canonical_nodes = 1
    try:
        unpartitioned = _node_shards(dataset, _generate_bucket_work(dataset, World(nodes, 2, 1, 0), 0, 0))
    finally:
        dataset.num_canonical_nodes = None
    assert all(shard_bytes[sorted(s)].sum() >= 0.9 * total for s in unpartitioned)


def test_two_nodes_of_two_ranks_see_every_sample_once_in_equal_batches(dataset):
    world = World(2, 2, 2, 0)  # 2 nodes x 2 ranks x 2 workers
    work = _generate_bucket_work(dataset, world, 1, 0)  # [nodes, ranks, workers, batches, B]
    ids = work[work >= 0]
    assert sorted(ids.tolist()) == list(range(sum(BUCKETS.values())))  # batch 3 x 4 ranks: no repeats here
    batches = work.transpose(0, 1, 3, 2, 4).reshape(4, -1, 3)  # [rank, batch in worker-interleaved order, B]
    per_rank = (batches >= 0).any(-1).sum(1)
    assert per_rank.tolist() == [per_rank[0]] * 4  # every rank yields the same number of batches
    plan = epoch_batches(dataset, 1, num_ranks=4, num_nodes=2)
    stream = _stream_of_sample(dataset)
    for batch in plan:
        assert (batch >= 0).sum(1).min() >= 1  # every rank trains on >= 1 sample at every step
        assert len(set(stream[batch[batch >= 0]].tolist())) == 1  # one bucket per step
    # a mid-epoch resume continues with exactly the rest of the plan
    done = sum(int((b >= 0).sum()) for b in plan[:5])
    resumed = _generate_bucket_work(dataset, World(2, 2, 1, 0), 1, done)
    rest = np.stack(plan[5:]).reshape(len(plan) - 5, 2, 2, 3).transpose(1, 2, 0, 3)
    assert np.array_equal(resumed[:, :, 0, : len(plan) - 5], rest)


def _bucket_sequences(plan, dataset):
    """Per bucket, its sample ids in training order (batch by batch, rank-major)."""
    stream = _stream_of_sample(dataset)
    ids = np.concatenate([b[b >= 0] for b in plan])
    return [ids[stream[ids] == s].tolist() for s in range(dataset.num_streams)]


def test_order_depends_on_canonical_nodes_not_on_ranks_per_node(dataset):
    one_node = [_bucket_sequences(epoch_batches(dataset, 0, ranks, 1), dataset) for ranks in (1, 2, 4)]
    assert one_node[0] == one_node[1] == one_node[2]
    two_nodes = []
    for ranks in (1, 3):
        plan = epoch_batches(dataset, 0, 2 * ranks, 2)
        two_nodes.append([_bucket_sequences([b[: ranks] for b in plan], dataset),
                          _bucket_sequences([b[ranks:] for b in plan], dataset)])
    assert two_nodes[0] == two_nodes[1]  # each node's samples, in its order, whatever its rank count
    assert two_nodes[0][0] != one_node[0]


def test_crossings_are_zero_by_default_and_bounded_otherwise():
    for nodes, ranks, batch_size, canonical in [(2, 2, 3, 2), (3, 2, 2, 3), (4, 1, 4, 2), (2, 3, 2, 4), (3, 2, 3, 9)]:
        k = canonical // nodes
        for n in range(1, 120):
            pools = node_pools(np.arange(n), canonical, nodes)
            sizes = _bucket_batch_sizes(n, batch_size, nodes * ranks, "b")
            batches, crossings = bucket_plan(pools, sizes, batch_size, ranks)
            seen = collections.Counter(np.concatenate([b[b >= 0] for b in batches]).tolist())
            assert set(seen) == set(range(n)) and sum(seen.values()) == sum(sizes)
            owner = {int(i): p for p, pool in enumerate(pools) for i in pool}
            moved = sum(owner[int(i)] != r // ranks for b in batches for r, row in enumerate(b) for i in row[row >= 0])
            assert moved == crossings
            if n >= max(canonical, nodes):  # a smaller bucket leaves a node without samples: it repeats others
                assert crossings <= (max(k, 1) - 1) * (nodes - 1), (nodes, ranks, batch_size, canonical, n)


def test_canonical_nodes_must_split_over_the_nodes(dataset):
    dataset.num_canonical_nodes = 3
    try:
        with pytest.raises(ValueError, match="multiple"):
            epoch_batches(dataset, 0, 4, 2)
    finally:
        dataset.num_canonical_nodes = None


def test_num_canonical_nodes_reaches_the_plan_through_the_loader(tmp_path):
    from composer_prx.data.dataset import build_dataloader

    write_buckets(tmp_path / "ds", {(8, 8): 30}, size_limit=1 << 12)
    with pytest.raises(ValueError, match="num_canonical_nodes must be >= 1"):
        build_dataloader(None, str(tmp_path / "ds"), batch_size=2, resolution=16, patch_size=8, num_canonical_nodes=0)
    loader = build_dataloader(None, str(tmp_path / "ds"), batch_size=2, resolution=16, patch_size=8,
                              num_canonical_nodes=2)
    captions = [c for batch in loader for c in batch["caption"]]
    assert sorted(captions) == sorted(f"sample-{i}" for i in range(30))
    assert loader.dataset.state_dict(0, True)["num_canonical_nodes"] == 2  # kept by a checkpoint
    # two canonical nodes on one node: the node alternates between their shard spans
    two_spans = _bucket_sequences(epoch_batches(loader.dataset, 0, 1, 1), loader.dataset)
    loader.dataset.num_canonical_nodes = 1
    assert two_spans != _bucket_sequences(epoch_batches(loader.dataset, 0, 1, 1), loader.dataset)


def test_a_new_node_layout_keeps_every_batch_but_a_buckets_last_two():
    """Same world size and num_canonical_nodes (a checkpoint keeps it), other node count: same batches."""
    order = np.random.default_rng(0).permutation(97)
    layouts = []
    for nodes, ranks in [(1, 4), (2, 2), (4, 1)]:
        sizes = _bucket_batch_sizes(97, 2, nodes * ranks, "b")
        batches = bucket_plan(node_pools(order, 2, nodes), sizes, 2, ranks)[0]
        layouts.append([sorted(b[b >= 0].tolist()) for b in batches])
    assert len(layouts[0]) == 13
    assert layouts[0][:-2] == layouts[1][:-2] == layouts[2][:-2]
    assert sorted(sum(layouts[0][-2:], [])) == sorted(sum(layouts[1][-2:], [])) == sorted(sum(layouts[2][-2:], []))
