"""Stages + our EMA end to end: two stages in one command, exact resume on either side of the boundary,
kill -9 and relaunch, and the same under FSDP2 on 2 ranks (gloo)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from composer_prx import config as C
from composer_prx import generate, train
from composer_prx.bench.common import composer_launch

ROOT = Path(__file__).resolve().parents[2]
SHAPES = str(ROOT / "yamls" / "shapes.yaml")
STAGES = ("stages=[{name: low, duration: 3ba, device_train_microbatch_size: 4}, "
          "{name: high, duration: 3ba, resolution: 24, global_batch_size: 4, algorithms: {tread: off}}]")


EMA = "algorithms.ema={smoothing: {slow: 0.99, fast: 0.9}, update_interval: 1ba}"


def staged(tmp, data, run, *extra, ema=EMA):
    return [f"variables.data_root={data}", "variables.size=16", f"run_dir={tmp}/runs", f"run_name={run}",
            "model.dit.hidden_dim=32", "model.dit.depth=4", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
            "data.train.n_train=96", "data.train.size=16", "data.global_batch_size=8", "trainer.max_duration=null",
            "trainer.save_interval=1ba", "trainer.save_num_checkpoints_to_keep=-1", "trainer.progress_bar=false",
            "trainer.save_overwrite=false", "callbacks.samples.interval=null", "callbacks.samples.steps=1",
            "callbacks.shapes_eval=null", "scheduler.t_warmup=1ba",
            ema, "algorithms.tread={route_start: 1, route_end: -2, ratio: 0.5}", STAGES, *extra]


def assert_same(a, b, where=""):
    """Nested checkpoint entries equal bit for bit (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def final_state(tmp, run, batch=6):
    state = torch.load(tmp / "runs" / run / "checkpoints" / f"ep0-ba{batch}-rank0.pt", weights_only=False)["state"]
    algorithms = dict(state["algorithms"])
    return {"model": state["model"], "ema": {**algorithms["EMA"], **state["callbacks"]["EMAAverages"]}, "optimizers": state["optimizers"],
            "data": state["dataset_state"], "timestamp": counters(state["timestamp"])}


def counters(timestamp: dict) -> dict:
    """A checkpoint's timestamp without its wall-clock fields."""
    stamp = timestamp.get("Timestamp", timestamp)
    return {k: v for k, v in stamp.items() if "wct" not in k}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted two-stage run (every batch checkpointed)."""
    tmp = tmp_path_factory.mktemp("stages")
    data = tmp / "data"
    trainer = train.main([SHAPES, *staged(tmp, data, "full")])
    return tmp, data, trainer


def test_boundary_switches_resolution_batch_microbatch_and_algorithms(full_run):
    tmp, _, trainer = full_run
    stages = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "Stages")
    low, high = stages.seen[0], stages.seen[1]
    assert (low["first_batch"], low["image"], low["device_batch"], low["microbatch"]) == (0, (16, 16), 8, 4)
    assert (high["first_batch"], high["image"], high["device_batch"], high["microbatch"]) == (3, (24, 24), 4, 4)
    assert "Tread" in low["algorithms"] and "Tread" not in high["algorithms"] and "EMA" in high["algorithms"]
    assert low["tokens_per_block"] == [16, 8, 8, 16]  # TREAD routes half the tokens past blocks 1..2
    assert high["tokens_per_block"] == [36, 36, 36, 36]  # off in stage 2, at 24 px (6x6 patches)
    ema = next(a for a in trainer.state.algorithms if type(a).__name__ == "EMA")
    assert ema.updates == 6 and set(ema.averages) == {"slow", "fast"}
    # the boundary is in the checkpoint: after batch 3 the position is stage 1, nothing of it done
    after = torch.load(tmp / "runs" / "full" / "checkpoints" / "ep0-ba3-rank0.pt", weights_only=False)
    assert after["state"]["dataset_state"]["train"]["stage"] == 1
    assert after["state"]["dataset_state"]["train"]["done"] == 0


@pytest.mark.parametrize("stop", [2, 3, 4])  # before, exactly at, and after the boundary (batch 3)
def test_resume_on_either_side_of_the_boundary_is_exact(full_run, stop):
    tmp, data, _ = full_run
    ckpt = tmp / "runs" / "full" / "checkpoints" / f"ep0-ba{stop}-rank0.pt"
    run = f"resumed{stop}"
    resumed = train.main([SHAPES, *staged(tmp, data, run, f"trainer.load_path={ckpt}")])
    assert int(resumed.state.timestamp.batch) == 6
    assert_same(final_state(tmp, "full"), final_state(tmp, run))


def test_generate_and_export_choose_an_ema_by_name(full_run):
    from composer_prx.export import load_checkpoint_model

    tmp, _, _ = full_run
    ckpt = tmp / "runs" / "full" / "checkpoints" / "ep0-ba6-rank0.pt"
    state = final_state(tmp, "full")
    key = "denoiser.blocks.0.qkv.weight"
    for name in ("slow", "fast"):
        model = load_checkpoint_model(ckpt, ema=name)
        assert torch.equal(model.state_dict()[key], state["ema"]["averages"][name][key])
    assert torch.equal(load_checkpoint_model(ckpt, ema=False).state_dict()[key], state["model"][key])
    assert torch.equal(load_checkpoint_model(ckpt).state_dict()[key], state["ema"]["averages"]["slow"][key])
    with pytest.raises(ValueError, match=r"no EMA named 'medium'; its EMAs: \['fast', 'slow'\]"):
        load_checkpoint_model(ckpt, ema="medium")
    out = generate.main([str(ckpt), "--prompt", "a red circle", "--steps", "1", "--ema", "fast",
                         "--out", str(tmp / "g.png")])
    assert out.is_file()


def test_kill_9_mid_run_then_the_same_command_continues(full_run):
    tmp, data, _ = full_run
    cmd = [sys.executable, "-m", "composer_prx.train", SHAPES, *staged(tmp, data, "killed"),
           "trainer.autoresume=true"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    folder = tmp / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (folder / "ep0-ba4-rank0.pt").exists():  # in stage 2 (latest: batch 3 or 4), mid-step
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "ep0-ba6-rank0.pt").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming in stage 1" in again.stderr
    assert_same(final_state(tmp, "full"), final_state(tmp, "killed"))


def test_stage_config_errors_are_clear(tmp_path):
    base = ["model.text_encoder=null", "data.train.n_train=96"]
    with pytest.raises(C.ConfigError, match=r"stages\[0\].duration: a stage's duration must be a positive number "
                                            "of batches"):
        C.load_config(SHAPES, [*base, "trainer.max_duration=null", "stages=[{duration: 10sp}]"])
    with pytest.raises(C.ConfigError, match="differs from the stages' total 5ba"):
        C.load_config(SHAPES, [*base, "stages=[{duration: 5ba}]"])
    with pytest.raises(C.ConfigError, match=r"unknown key stages\[0\].batch; valid keys here"):
        C.load_config(SHAPES, [*base, "trainer.max_duration=null", "stages=[{duration: 5ba, batch: 3}]"])
    with pytest.raises(C.ConfigError, match=r"unknown key stages\[0\].algorithms.tread.ratoi"):
        C.load_config(SHAPES, [*base, "trainer.max_duration=null", "algorithms.tread={}",
                                   "stages=[{duration: 5ba, algorithms: {tread: {ratoi: 0.2}}}]"])
    cfg = C.load_config(SHAPES, [*base, "trainer.max_duration=null", "algorithms.tread={}",
                                     "stages=[{duration: 5ba}, {duration: 2ba, algorithms: {tread: 'off'}}]"])
    assert cfg.trainer.max_duration == "7ba" and cfg.stages[1]["algorithms"] == {"tread": "off"}


def sharded_state(folder: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)["state"]


def test_fsdp2_two_ranks_two_stages_ema_every_10_batches_and_exact_resume(full_run):
    """composer -n 2 with FSDP2 (gloo): both stages, sharded EMA updated every 10 batches, resume before the
    boundary == uninterrupted (weights, EMA, optimizer, data position)."""
    tmp, data, _ = full_run
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stages = ("stages=[{name: low, duration: 6ba, device_train_microbatch_size: 2}, "
              "{name: high, duration: 6ba, resolution: 24, global_batch_size: 4, algorithms: {tread: off}}]")
    extra = ["trainer.fsdp={}", "trainer.save_interval=4ba", stages]
    ema = "algorithms.ema={smoothing: [0.999, 0.9999], update_interval: 10ba}"

    def run(name, *more):
        cmd = [*composer_launch(2, "-m", "composer_prx.train"), SHAPES, *staged(tmp, data, name, *extra, *more, ema=ema)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = run("fsdp")
    assert "stage 0 (low) from batch 0: image (16, 16), device batch 4, microbatch 2" in out
    assert "stage 1 (high) from batch 6: image (24, 24), device batch 2, microbatch 2" in out
    assert "'Tread']" in out.split("stage 1")[0] and "Tread" not in out.split("stage 1 (high)")[1].split("\n")[0]
    assert "EMA ema_0.999=0.999, ema_0.9999=0.9999: 1 updates (every 10 batches)" in out
    folder = tmp / "runs" / "fsdp" / "checkpoints"
    run("fsdp_resumed", f"trainer.load_path={folder / 'ep0-ba4'}")
    full = sharded_state(folder / "ep0-ba12", tmp / "full.pt")
    resumed = sharded_state(tmp / "runs" / "fsdp_resumed" / "checkpoints" / "ep0-ba12", tmp / "resumed.pt")
    ema = {**dict(full["algorithms"])["EMA"], **full["callbacks"]["EMAAverages"]}
    assert ema["updates"] == 1 and set(ema["averages"]) == {"ema_0.999", "ema_0.9999"}
    assert_same(ema["averages"], resumed["callbacks"]["EMAAverages"]["averages"], "ema")
    key = "denoiser.blocks.0.qkv.weight"
    assert ema["averages"]["ema_0.999"][key].shape == full["model"][key].shape  # gathered whole from the shards
    assert not torch.equal(ema["averages"]["ema_0.999"][key], full["model"][key])
    assert_same(dict(full["algorithms"])["EMA"], dict(resumed["algorithms"])["EMA"], "ema")
    for part in ("model", "optimizers", "dataset_state"):
        assert_same(full[part], resumed[part], part)
    assert_same(counters(full["timestamp"]), counters(resumed["timestamp"]), "timestamp")
