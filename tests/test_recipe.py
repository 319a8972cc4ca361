"""yamls/prx_24h.yaml itself, shrunk by dotlist overrides only, on 2 gloo ranks with FSDP2: both stages run with
every technique of the recipe on (TREAD, REPA, LPIPS, DINO, Muon + scheduler, EMA every 10 batches), the
resolution and batch change at the boundary and REPA is off in stage 2. The pretrained parts are tiny random
models of the real architectures, saved to disk and loaded through the same code paths as the hub ids."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from composer_prx import config as C
from composer_prx.bench.common import composer_launch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "yamls" / "prx_24h.yaml")


def test_the_recipe_config_is_prx_scale_and_valid():
    cfg = C.load_config(RECIPE, [])
    from composer_prx.model.dit import PixelDiT

    with torch.device("meta"):
        params = sum(p.numel() for p in PixelDiT(cfg.model.dit).parameters())
    assert 1.18e9 < params < 1.19e9  # 1.181B, the README's count
    assert [s["duration"] for s in cfg.stages] == ["100000ba", "20000ba"]
    assert [(s["resolution"], s["global_batch_size"]) for s in cfg.stages] == [(512, 1024), (1024, 512)]
    assert cfg.stages[1]["algorithms"] == {"repa": "off"} or cfg.stages[1]["algorithms"]["repa"] in (None, False, "off")
    assert set(cfg.algorithms) == {"ema", "gradient_clipping", "tread", "repa", "lpips", "dino_perceptual"}
    assert cfg.optimizer["name"] == "muon" and cfg.trainer.precision == "amp_bf16" and cfg.trainer.fsdp == {}


@pytest.fixture(scope="module")
def local_parts(tmp_path_factory):
    """Shapes MDS data, the word-level text encoder, a tiny DINOv2 (REPA and DINO teacher) and VGG16 features."""
    import torchvision
    from transformers import Dinov2Config, Dinov2Model

    from composer_prx.data.shapes import caption_texts, write_shapes_mds
    from composer_prx.model.text import save_word_level_encoder

    root = tmp_path_factory.mktemp("recipe")
    write_shapes_mds(root / "shapes", n_train=64, size=48)
    save_word_level_encoder(str(root / "text_encoder"), caption_texts())
    Dinov2Model(Dinov2Config(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=4, image_size=16)).save_pretrained(root / "dino")
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, root / "vgg16.pth")
    return root


def test_prx_24h_yaml_runs_both_stages_on_two_ranks(local_parts, tmp_path):
    root = local_parts
    overrides = [
        "variables.data_remote=null", f"variables.data_cache={root / 'shapes' / 'train'}",
        f"variables.text_encoder={root / 'text_encoder'}", f"variables.repa_teacher={root / 'dino'}",
        f"variables.dino_teacher={root / 'dino'}", f"variables.lpips_backbone={root / 'vgg16.pth'}",
        f"variables.run_dir={tmp_path / 'runs'}", "data.train.num_workers=0", "data.train.pin_memory=false",
        "model.dit={patch_size: 8, hidden_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 3.5, bottleneck_dim: 16, "
        "text_dim: 64, resolution_embeds: true}",
        "model.text_encoder.max_length=32", "model.text_encoder.dtype=float32",
        "algorithms.repa.block=1", "algorithms.repa.hidden=32", "algorithms.repa.teacher_dtype=float32",
        "algorithms.dino_perceptual.teacher_dtype=float32", "algorithms.dino_perceptual.resolution=16",
        "scheduler.t_warmup=2ba", "optimizer.lr=0.01",
        "stages=[{name: low, duration: 12ba, resolution: 32, global_batch_size: 8, device_train_microbatch_size: 2},"
        " {name: high, duration: 10ba, resolution: 48, global_batch_size: 4, device_train_microbatch_size: 2,"
        " algorithms: {repa: off}}]",
        "callbacks.samples.size=32", "callbacks.samples.interval=null", "callbacks.samples.steps=2",
        "callbacks.samples.seeds=[0]", "callbacks.memory_monitor=null", "trainer.device=cpu", "trainer.precision=fp32",
        "trainer.save_interval=11ba", "trainer.console_log_interval=1ba",
    ]
    cmd = [*composer_launch(2, "-m", "composer_prx.train"), RECIPE, *overrides]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    stages = re.findall(r"stage (\d) \((\w+)\) from batch (\d+): image \((\d+), (\d+)\), device batch (\d+), "
                        r"microbatch (\d+), algorithms \[([^\]]*)\]", proc.stdout)
    assert [(s[0], s[2], s[3], s[5], s[6]) for s in stages] == [("0", "0", "32", "4", "2"), ("1", "12", "48", "2", "2")]
    first, second = (set(a.replace("'", "").split(", ")) for a in (stages[0][7], stages[1][7]))
    assert {"Repa", "LpipsLoss", "DinoPerceptualLoss", "Tread", "EMA"} <= first
    assert second == first - {"Repa"}
    assert re.search(r"EMA [^\n]*: 2 updates \(every 10 batches\)", proc.stdout), proc.stdout[-3000:]
    logged = out
    for term in ("loss/train/repa", "loss/train/lpips", "loss/train/dino_perceptual"):
        assert term in logged, term
    checkpoints = tmp_path / "runs" / "prx_24h" / "checkpoints"
    assert (checkpoints / "ep0-ba11").is_dir() and (checkpoints / "ep0-ba22").is_dir()  # sharded, in each stage
