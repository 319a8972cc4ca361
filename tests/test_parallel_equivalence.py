"""The recipe's own set-up from the YAML on 2 gloo ranks: TREAD + Muon + scheduler under DDP, FSDP2 and FSDP2 with
activation checkpointing land on the same weights.

Each rank draws its own t, noise and TREAD selection (Composer seeds rank r with seed + r), the same in the three
runs; what differs is only how gradients are reduced (DDP all-reduce vs FSDP2 reduce-scatter, each divided by the
world size) and whether block activations are recomputed in the backward pass.
"""

import os
import subprocess

import torch

from composer_prx.bench.common import composer_launch
from tests.test_train import SHAPES, sharded_model_state, tiny_overrides

RECIPE = ["model.dit.depth=4", "optimizer={name: muon, lr: 0.01}", "scheduler.t_warmup=1ba",
          "algorithms.tread={route_start: 1, route_end: -2, ratio: 0.5}", "algorithms.ema=null",
          "callbacks.samples.interval=null", "callbacks.shapes_eval=null", "trainer.save_interval=1ba",
          "model.caption_dropout=0.5"]


def _train(tmp_path, data_root, name, *overrides):
    cmd = [*composer_launch(2, "-m", "composer_prx.train"), SHAPES, *tiny_overrides(tmp_path, data_root, name, "5ba"),
           *RECIPE, *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "runs" / name / "checkpoints"


def test_ddp_fsdp2_and_activation_checkpointing_agree(tmp_path, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("shapes")
    ddp_folder = _train(tmp_path, data_root, "ddp")
    ddp = torch.load(ddp_folder / "ep0-ba5-rank0.pt", weights_only=False)["state"]["model"]
    ddp_before = torch.load(ddp_folder / "ep0-ba4-rank0.pt", weights_only=False)["state"]["model"]
    fsdp = sharded_model_state(_train(tmp_path, data_root, "fsdp", "trainer.fsdp={}") / "ep0-ba5",
                               tmp_path / "fsdp.pt")
    ac = sharded_model_state(_train(tmp_path, data_root, "ac", "trainer.fsdp={activation_checkpointing: true}")
                             / "ep0-ba5", tmp_path / "ac.pt")
    keys = [k for k in fsdp if "blocks" in k]
    assert keys and set(fsdp) == set(ac)
    for key in fsdp:
        assert torch.equal(fsdp[key], ac[key]), f"{key}: activation checkpointing changed the weights"
        gap = (fsdp[key] - ddp[key]).norm()
        step = (ddp[key] - ddp_before[key]).norm()  # what the last update moved: the gap must be far below it
        assert gap <= 1e-6 + 1e-2 * step, f"{key}: FSDP2 and DDP differ by {gap:.3g} (the last step moved {step:.3g})"
    moved = [k for k in keys if not torch.equal(ddp[k], ddp_before[k])]
    assert len(moved) == len(keys), "every block weight trains in the last step"  # zero-init layers open first
