"""Crash-safe relaunch: `kill -9` a training process once it has a checkpoint, run the same command again, and
it ends on exactly the weights, EMA and optimizer state of an uninterrupted run (CPU, bit for bit)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from composer_prx import train
from tests.algorithms.test_stages import assert_same, counters

ROOT = Path(__file__).resolve().parents[1]
SHAPES = str(ROOT / "yamls" / "shapes.yaml")


def shrunk(tmp: Path, run: str) -> list[str]:
    """The quickstart YAML, shrunk: 8 batches, a checkpoint every 3, autoresume on."""
    return [f"variables.data_root={tmp / 'data'}", "variables.size=16", f"run_dir={tmp / 'runs'}", f"run_name={run}",
            "model.dit.hidden_dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
            "data.train.n_train=64", "data.global_batch_size=8", "trainer.max_duration=8ba",
            "trainer.save_interval=3ba", "trainer.save_num_checkpoints_to_keep=-1", "trainer.save_overwrite=false",
            "trainer.autoresume=true", "trainer.progress_bar=false", "callbacks.samples=null",
            "callbacks.shapes_eval=null", "scheduler.t_warmup=2ba"]


def final_state(tmp: Path, run: str) -> dict:
    latest = tmp / "runs" / run / "checkpoints" / "latest-rank0.pt"
    state = torch.load(latest, weights_only=False)["state"]
    return {"model": state["model"], "optimizers": state["optimizers"], "ema": state["callbacks"]["EMAAverages"],
            "timestamp": counters(state["timestamp"]), "latest": os.readlink(latest)}


def test_kill_9_after_a_checkpoint_then_the_same_command_ends_on_the_uninterrupted_weights(tmp_path):
    train.main([SHAPES, *shrunk(tmp_path, "full")])  # also writes the shapes data the relaunches read
    cmd = [sys.executable, "-m", "composer_prx.train", SHAPES, *shrunk(tmp_path, "killed")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    latest = tmp_path / "runs" / "killed" / "checkpoints" / "latest-rank0.pt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (latest.is_symlink() and "ba3" in os.readlink(latest)):  # the first checkpoint is complete
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: somewhere in batches 4-6
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (latest.parent / "ep0-ba8-rank0.pt").exists()
    first = (latest.parent / "ep0-ba3-rank0.pt").stat().st_mtime_ns
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (latest.parent / "ep0-ba3-rank0.pt").stat().st_mtime_ns == first  # resumed from it, not restarted
    full, killed = final_state(tmp_path, "full"), final_state(tmp_path, "killed")
    assert full["timestamp"]["batch"] == 8 and full["latest"] == killed["latest"]
    assert_same(full, killed)
