"""Muon under `composer -n 2` / `composer -n 3` (gloo, CPU): FSDP2 and DDP against one process.

Tolerance for FSDP2/DDP vs one process: atol 1e-4 on every parameter after 4 steps. Given identical
gradients the distributed step is bit-exact (the `direct` check below: difference 0.0), so what remains
comes from the gradient all-reduce / reduce-scatter summing per-rank means in another order than one
process does (fp32, ~1e-7 relative). Newton-Schulz amplifies such noise by up to its slope at zero,
a^5 ~ 490, and a Muon step moves entries by lr * 0.2 * sqrt(33) ~ 0.023, so 4 steps give up to ~5e-5
(observed max 2.0e-5 on the 33 x 10 and 7 x 33 matrices, <= 1.4e-6 elsewhere). 1e-4 is still ~150x below
the smallest per-tensor movement of the parameters (1.5e-2): a lost, duplicated or misplaced row shard fails.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from composer_prx.bench.common import composer_launch
from tests.optim import muon_dist_run

SCRIPT = Path(muon_dist_run.__file__)
ATOL = 1e-4


def _launch(world: int, out: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = composer_launch(world, str(SCRIPT), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"composer -n {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


@pytest.fixture(scope="module")
def single():
    params, trainer = muon_dist_run.train()
    return params, trainer.state.optimizers[0].ns_flops


@pytest.fixture(scope="module", params=[2, 3], ids=["n2", "n3"])
def launched(request, tmp_path_factory):
    return request.param, _launch(request.param, tmp_path_factory.mktemp(f"muon_n{request.param}"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sharded_step_is_bit_exact_given_the_same_gradients(launched):
    _, out = launched
    assert out["direct"] == {"sharded": 0.0, "everywhere": 0.0}


def test_fsdp2_matches_one_process(launched, single):
    world, out = launched
    params, _ = single
    init = muon_dist_run.ToyModel().net.state_dict()
    assert min((params[k] - init[k.removeprefix("net.")]).abs().max().item() for k in params) > 1e-2  # all moved
    assert _max_diff(out["fsdp"], params) < ATOL
    if world == 2:
        assert _max_diff(out["ddp"], params) < ATOL


def test_fsdp2_sharded_checkpoint_resume_is_bit_exact(launched):
    _, out = launched
    assert _max_diff(out["fsdp_resumed"], out["fsdp"]) == 0.0


def test_each_matrix_is_orthogonalised_once_and_work_is_balanced(launched, single):
    world, out = launched
    _, total = single
    per_rank = out["fsdp_flops_per_rank"]["per_rank"]
    assert len(per_rank) == world and sum(per_rank) == total  # no matrix twice, none skipped
    largest = max(muon_dist_run.newton_schulz_flops_of_model().values())
    assert max(per_rank) <= total / world + largest  # greedy balance bound
    assert out["fsdp_rms"]["muon"] > 0 and out["fsdp_rms"]["adam"] > 0
