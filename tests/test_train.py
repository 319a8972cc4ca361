"""The trainer end to end on tiny sizes: quickstart config, checkpoints, exact resume, generate CLI, 2 ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_prx import generate, train
from composer_prx.bench.common import composer_launch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = str(ROOT / "yamls" / "shapes.yaml")


def tiny_overrides(tmp_path, data_root, run_name="tiny", duration="4ba"):
    return [
        f"variables.data_root={data_root}", "variables.size=16", f"run_dir={tmp_path}/runs", f"run_name={run_name}",
        "model.dit.hidden_dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
        "data.train.n_train=96", "data.global_batch_size=8", f"trainer.max_duration={duration}",
        "trainer.save_interval=2ba", "trainer.save_num_checkpoints_to_keep=-1", "trainer.progress_bar=false",
        "callbacks.samples.interval=2ba", "callbacks.samples.steps=2", "callbacks.shapes_eval.steps=2",
        "callbacks.shapes_eval.max_prompts=4", "callbacks.shapes_eval.samples_per_prompt=1",
        "scheduler.t_warmup=1ba",
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def test_quickstart_config_trains_checkpoints_samples_and_evaluates(tmp_path, data_root):
    trainer = train.main([SHAPES, *tiny_overrides(tmp_path, data_root)])
    run = tmp_path / "runs" / "tiny"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest-rank0.pt").exists()
    assert {p.name for p in (run / "samples").iterdir()} >= {"ba0000002.png", "ba0000004.png", "final.png",
                                                             "heldout_1obj.png"}
    shapes_eval = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "ShapesEval")
    assert set(shapes_eval.results) == {"1obj", "2obj"}
    assert sum(type(cb).__name__ == "CorruptSampleCounter" for cb in trainer.state.callbacks) == 1  # by default
    assert 0.0 <= shapes_eval.results["1obj"]["colour"] <= 1.0
    # no frozen helper in the checkpoint (contract 5)
    state = torch.load(run / "checkpoints" / "latest-rank0.pt", weights_only=False)["state"]["model"]
    assert state and not any("text_encoder" in k for k in state)
    out = generate.main([str(run / "checkpoints" / "latest-rank0.pt"), "--prompt", "a red circle",
                         "--prompt", "a blue square", "--steps", "2", "--out", str(tmp_path / "g.png")])
    from PIL import Image

    assert Image.open(out).size == (16 * 2 + 2, 16)
    ckpt = str(run / "checkpoints" / "latest-rank0.pt")
    with pytest.raises(ValueError, match="no recorded TREAD route"):  # this run trained without TREAD
        generate.main([ckpt, "--prompt", "a red circle", "--steps", "1", "--guidance", "tread"])
    routed = generate.main([ckpt, "--prompt", "a red circle", "--steps", "1", "--guidance", "tread",
                            "--tread-route", "0", "-1", "0.5", "--out", str(tmp_path / "t.png")])
    assert Image.open(routed).size == (16, 16)


def test_generate_routes_the_tread_route_of_the_run_config():
    from composer_prx import config as C
    from composer_prx.algorithms.tread import Route, trained_routes

    cfg = C.load_config(SHAPES, ["model.text_encoder=null", "algorithms.tread={route_start: 1, route_end: -2, "
                                     "ratio: 0.25}"])
    model = train.build_model(cfg)
    assert trained_routes(model) is None
    generate.record_trained_routes(model, cfg)
    assert trained_routes(model) == [Route(1, 2, 0.25)]  # quickstart depth 4: -2 is block 2


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


def test_resume_is_exact(tmp_path, data_root):
    full = train.main([SHAPES, *tiny_overrides(tmp_path, data_root, "full", "6ba")])
    first = train.main([SHAPES, *tiny_overrides(tmp_path, data_root, "split", "3ba"),
                        "trainer.save_interval=3ba"])
    ckpt = tmp_path / "runs" / "split" / "checkpoints" / "ep0-ba3-rank0.pt"
    assert ckpt.exists()
    resumed = train.main([SHAPES, *tiny_overrides(tmp_path, data_root, "split", "6ba"),
                          f"trainer.load_path={ckpt}", "trainer.save_overwrite=true"])
    assert int(resumed.state.timestamp.batch) == 6 and first is not resumed
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_ranks_with_composer_launcher(tmp_path, data_root):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [*composer_launch(2, "-m", "composer_prx.train"), SHAPES, *tiny_overrides(tmp_path, data_root, "ddp", "2ba"),
           "callbacks.samples.interval=null"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "latest-rank0.pt").exists()
    assert "ShapesEval held-out 1obj" in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_durattion=1ba", "config error: unknown key trainer.max_durattion; valid keys here:"),
        ("model.dit.patch_size=5", "config error: data.resolution 16 is not a multiple of the patch size 5"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, data_root, override, message):
    cmd = [sys.executable, "-m", "composer_prx.train", SHAPES, *tiny_overrides(tmp_path, data_root), override]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_missing_text_encoder_weights_named(tmp_path, data_root):
    with pytest.raises(OSError, match=r"text encoder weights '/no/such/encoder' could not be loaded"):
        train.main([SHAPES, *tiny_overrides(tmp_path, data_root), "model.text_encoder.name_or_path=/no/such/encoder"])


def sharded_model_state(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (DCP) Composer checkpoint folder, gathered into one dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)["state"]["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_fsdp2_two_ranks_trains_and_resumes(tmp_path, data_root):
    """FSDP2 (gloo, CPU): sharded training, sharded checkpoint, and a resume that lands on the weights of an
    uninterrupted run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # trainer.fsdp means FSDP2 without FSDP_VERSION=2
    base = [*composer_launch(2, "-m", "composer_prx.train"), SHAPES, "callbacks.samples.interval=null", "trainer.fsdp={}",
            "algorithms.ema=null"]

    def run(*overrides):
        proc = subprocess.run(base + list(overrides), env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run(*tiny_overrides(tmp_path, data_root, "fsdp", "2ba"))
    ckpt = tmp_path / "runs" / "fsdp" / "checkpoints" / "ep0-ba2"
    assert ckpt.is_dir(), list((tmp_path / "runs" / "fsdp" / "checkpoints").iterdir())
    second = run(*tiny_overrides(tmp_path, data_root, "fsdp", "3ba"), f"trainer.load_path={ckpt}",
                 "trainer.save_overwrite=true", "trainer.save_interval=3ba")
    assert "ShapesEval held-out 1obj" in second.stdout
    run(*tiny_overrides(tmp_path, data_root, "fsdp_full", "3ba"), "trainer.save_interval=3ba",
        "callbacks.shapes_eval=null")
    resumed = sharded_model_state(tmp_path / "runs" / "fsdp" / "checkpoints" / "ep0-ba3", tmp_path / "resumed.pt")
    full = sharded_model_state(tmp_path / "runs" / "fsdp_full" / "checkpoints" / "ep0-ba3", tmp_path / "full.pt")
    assert resumed.keys() == full.keys() and any("blocks" in k for k in full)
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_bad_sampling_settings_fail_before_training(tmp_path, data_root):
    from composer_prx.callbacks.quality import ShapesEval
    from composer_prx.callbacks.samples import SampleGrid

    with pytest.raises(ValueError, match="guidance must be one of"):
        SampleGrid(["a red circle"], guidance="CFG")
    with pytest.raises(ValueError, match="steps and .size must be >= 1"):
        ShapesEval(str(data_root), steps=0)
    with pytest.raises(ValueError, match="ShapesEval.size 18 is not a multiple of the model's patch size 4"):
        train.main([SHAPES, *tiny_overrides(tmp_path, data_root), "callbacks.shapes_eval.size=18"])
    with pytest.raises(FileNotFoundError, match="has no eval_prompts.json"):
        train.main([SHAPES, *tiny_overrides(tmp_path, data_root), f"callbacks.shapes_eval.root={tmp_path}"])


def test_the_recipe_in_miniature_trains_its_own_teacher_and_runs_both_stages(tmp_path):
    recipe = tmp_path / "recipe.yaml"  # yamls/quickstart.yaml with 2 + 2 batches
    recipe.write_text(f"base: {ROOT / 'yamls' / 'quickstart.yaml'}\n"
                      "stages:\n"
                      "  - {name: 8px, duration: 2ba, resolution: 8, global_batch_size: 8}\n"
                      "  - {name: 16px, duration: 2ba, resolution: 16, global_batch_size: 4, algorithms: {repa: off}}\n")
    data_root = tmp_path / "shapes"
    overrides = [o for o in tiny_overrides(tmp_path, data_root, run_name="recipe")
                 if not o.startswith(("trainer.max_duration", "callbacks.samples"))]
    trainer = train.main([str(recipe), *overrides, "model.dit.depth=4", "data.train.teacher_steps=2",
                          "data.train.size=16"])
    assert (data_root / "teacher" / "config.json").is_file()  # trained by the data builder, then loaded by REPA
    names = {type(a).__name__ for a in trainer.state.algorithms}
    assert {"Tread", "EMA"} <= names and not names & {"Repa", "DinoPerceptualLoss"}  # stage 2: REPA off
    assert trainer.state.model.denoiser.cfg.rope_grid == 8  # positions carry over between the stages
    assert int(trainer.state.timestamp.batch) == 4
    assert type(trainer.state.optimizers[0]).__name__ == "Muon"
    log = (tmp_path / "runs" / "recipe" / "logs" / "metrics-rank0.txt").read_text()
    assert "loss/train/repa" in log and "shapes_eval/1obj/all" in log
