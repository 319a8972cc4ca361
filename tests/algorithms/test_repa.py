"""REPA: projector trains, teacher does not; TREAD-aware alignment; Muon + TREAD in a Trainer; checkpoints; until."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from composer import ComposerModel, Trainer
from composer.loggers import InMemoryLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from composer_prx.algorithms.repa import Repa, repa_loss, token_grid
from composer_prx.algorithms.tread import Tread, apply_tread
from composer_prx.encoders import load_vision_encoder
from composer_prx.optim.muon import build_muon
from tests.algorithms.test_tread import MixerBlock, PosContext


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "dinov2-tiny"
    Dinov2Model(Dinov2Config(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=4, image_size=16)).save_pretrained(path)
    return str(path)


@dataclass
class Out:
    x: Tensor  # clean images [B, 3, H, W]
    x_pred: Tensor


class PatchNet(nn.Module):
    """A foreign image denoiser following the protocol: patchify -> blocks(x, ctx) -> unpatchify."""

    def __init__(self, dim: int = 16, depth: int = 4, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.inp = nn.Linear(3 * patch * patch, dim)
        self.pos = nn.Linear(2, dim)
        self.cond = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(MixerBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 3 * patch * patch)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        b, c, height, width = x_t.shape
        p, h, w = self.patch, x_t.shape[2] // self.patch, x_t.shape[3] // self.patch
        tokens = x_t.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij"), -1)
        ctx = PosContext(self.cond(t[:, None]), self.pos(grid.reshape(1, h * w, 2)))
        x = self.inp(tokens)
        for block in self.blocks:
            x = block(x, ctx)
        x = self.out(x).reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, height, width)


class ImageFlow(ComposerModel):
    def __init__(self):
        super().__init__()
        self.denoiser = PatchNet()

    def forward(self, batch):
        x = batch[0]
        t = torch.rand(x.shape[0])
        x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * torch.randn_like(x)
        return Out(x, self.denoiser(x_t, t))

    def loss(self, outputs, batch):
        return F.mse_loss(outputs.x_pred, outputs.x)


def images(n: int = 8, size: tuple[int, int] = (16, 16)) -> Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def trainer_for(model, repa, *, optimizer=None, **kwargs) -> Trainer:
    return Trainer(model=model, train_dataloader=DataLoader(TensorDataset(images()), batch_size=4),
                   optimizers=optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2), device="cpu",
                   progress_bar=False, log_to_console=False, **kwargs)


def test_routed_block_aligns_exactly_the_kept_tokens_and_only_the_projector_learns(teacher_dir):
    torch.manual_seed(0)
    model = ImageFlow()
    repa = Repa(teacher_dir, block=2, hidden=32)
    projector = repa.prepare(model)
    assert model.repa_projector is projector and "repa_projector.net.0.weight" in model.state_dict()
    seen = []  # what a hook registered BEFORE TREAD sees at the route's last block: the kept tokens
    model.denoiser.blocks[2].register_forward_hook(lambda m, a, out: seen.append((out, model.denoiser.routing)))
    apply_tread(model, 1, 2, 0.5, generator=torch.Generator().manual_seed(1))
    repa.attach(model)  # attached after TREAD, still runs before TREAD's scatter
    model.train()
    repa.arm()
    batch = images(2, (16, 24))  # a 4 x 6 token grid: a non-square bucket
    out = model((batch,))
    hidden, keep_idx, n_tokens = repa._captured
    kept_out, routing = seen[0]
    assert n_tokens == 24 and keep_idx.shape == (2, 12) and torch.equal(keep_idx, routing.keep_idx)
    assert torch.equal(hidden, kept_out)
    # the reference: the teacher's 4 x 6 grid tokens at the kept indices
    teacher = load_vision_encoder(teacher_dir)
    target = teacher.encode(batch, grid=(4, 6)).patch_tokens.reshape(2, 24, -1)
    target = torch.stack([target[b, keep_idx[b]] for b in range(2)])
    expected = -F.cosine_similarity(projector(hidden), target, dim=-1).mean()
    term = repa.take_loss(model, out.x)
    torch.testing.assert_close(term, expected)
    assert repa.take_loss(model, out.x) is None  # consumed
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in teacher.net.parameters())
    assert model.denoiser.blocks[1].mlp[0].weight.grad.abs().sum() > 0  # the block being aligned learns too


def test_repa_tread_muon_train_a_foreign_model_and_until_stops_the_teacher(teacher_dir):
    torch.manual_seed(0)
    model = ImageFlow()
    repa = Repa(teacher_dir, block=-2, hidden=32, until="2ba")
    repa.prepare(model)
    optimizer = build_muon(model, lr=0.02)
    adam = next(g for g in optimizer.param_groups if not g["use_muon"])
    assert {id(p) for p in model.repa_projector.parameters()} <= {id(p) for p in adam["params"]}
    logger = InMemoryLogger()
    trainer = trainer_for(model, repa, optimizer=optimizer, max_duration="2ba",
                          algorithms=[Tread(route_start=1, route_end=2), repa], loggers=[logger],
                          device_train_microbatch_size=2)
    trainer.fit()
    assert repa.teacher_forwards == 4  # 2 batches x 2 micro-batches
    assert len(logger.data["loss/train/repa"]) == 2
    after_until = [p.detach().clone() for p in model.repa_projector.parameters()]
    trainer.fit(duration="2ba")  # batches 3 and 4: past `until`
    assert repa.teacher_forwards == 4 and load_vision_encoder(teacher_dir).forward_calls >= 4
    assert all(torch.equal(a, b) for a, b in zip(after_until, model.repa_projector.parameters()))


def test_checkpoint_holds_the_projector_not_the_teacher_and_resume_is_exact(tmp_path, teacher_dir):
    def run(duration, seed_init, **kwargs):
        torch.manual_seed(seed_init)
        model = ImageFlow()
        repa = Repa(teacher_dir, block=1, hidden=32)
        repa.prepare(model)
        trainer_for(model, repa, max_duration=duration, algorithms=[Tread(route_start=1, route_end=2), repa],
                    seed=5, **kwargs).fit()
        return model

    full = run("4ba", 0)
    run("2ba", 0, save_folder=str(tmp_path), save_filename="ba{batch}.pt", save_interval="2ba")
    saved = torch.load(tmp_path / "ba2.pt", weights_only=False)["state"]["model"]
    assert any(k.startswith("repa_projector.") for k in saved)
    assert not any("embeddings" in k or "encoder.layer" in k for k in saved)  # no Dinov2 weights
    assert all(k.startswith(("denoiser.", "repa_projector.")) for k in saved)
    resumed = run("4ba", 1, load_path=str(tmp_path / "ba2.pt"))
    for (name, expected), got in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, got), name


def test_projector_missing_from_the_optimizer_fails_at_init(teacher_dir):
    model = ImageFlow()
    repa = Repa(teacher_dir, block=1, hidden=8)
    with pytest.raises(ValueError, match="prepare"):
        trainer_for(model, repa, max_duration="1ba", algorithms=[repa])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before prepare
    repa.prepare(model)
    with pytest.raises(ValueError, match="not in the optimizer"):
        trainer_for(model, repa, optimizer=optimizer, max_duration="1ba", algorithms=[repa])
    with pytest.raises(ValueError, match="out of range"):
        Repa(teacher_dir, block=7).prepare(ImageFlow())


@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher=""), "hub id"), (dict(block=1.5), "block"), (dict(weight=0), "weight"),
    (dict(hidden=0), "hidden"), (dict(until="soon"), "time string"), (dict(teacher_dtype="f8"), "teacher_dtype"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Repa(**{"teacher": "facebook/dinov2-base", **kwargs})


def test_loss_and_grid_helpers():
    a = torch.randn(2, 5, 8)
    assert float(repa_loss(a, a)) == pytest.approx(-1.0)
    assert float(repa_loss(a, -a)) == pytest.approx(1.0)
    assert token_grid(16 * 32, 512, 1024) == (16, 32) and token_grid(24, 16, 24) == (4, 6)
    with pytest.raises(ValueError, match="grid"):
        token_grid(7, 16, 16)


def test_a_repa_run_samples_and_exports_without_its_projector(tmp_path, teacher_dir):
    from composer_prx import generate, train
    from composer_prx.export import load_checkpoint_model
    from tests.test_train import SHAPES, tiny_overrides

    train.main([SHAPES, *tiny_overrides(tmp_path, tmp_path / "data", "r", "1ba"), "trainer.save_interval=1ba",
                "callbacks.samples.interval=null", f"algorithms.repa.teacher={teacher_dir}", "algorithms.repa.block=1",
                "algorithms.repa.hidden=16"])
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "latest-rank0.pt"
    saved = torch.load(ckpt, weights_only=False)["state"]["model"]
    assert "repa_projector.net.0.weight" in saved and not any("embeddings.patch" in k for k in saved)
    assert generate.main([str(ckpt), "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "g.png")])
    assert not hasattr(load_checkpoint_model(ckpt), "repa_projector")  # EMA storage holds it too: dropped


def test_fsdp2_two_gloo_ranks_train_repa_with_muon_and_shard_the_projector(tmp_path, teacher_dir):
    """train.py calls Repa.prepare before building Muon; FSDP2 shards the projector; the teacher stays out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemReader

    from composer_prx.bench.common import composer_launch

    quickstart = str(Path(__file__).resolve().parents[2] / "yamls" / "shapes.yaml")
    overrides = [
        f"variables.data_root={tmp_path}/data", "variables.size=16", f"run_dir={tmp_path}/runs", "run_name=r",
        "model.dit.hidden_dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
        "data.train.n_train=32", "data.global_batch_size=8", "trainer.max_duration=1ba", "trainer.save_interval=1ba",
        "trainer.progress_bar=false", "callbacks.samples.interval=null", "callbacks.shapes_eval.steps=1",
        "callbacks.shapes_eval.max_prompts=1", "callbacks.shapes_eval.samples_per_prompt=1", "scheduler.t_warmup=1ba",
        "trainer.fsdp={}", "optimizer.name=muon", f"algorithms.repa.teacher={teacher_dir}", "algorithms.repa.block=1",
        "algorithms.repa.hidden=16",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([*composer_launch(2, "-m", "composer_prx.train"), quickstart, *overrides],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    keys = list(FileSystemReader(str(tmp_path / "runs" / "r" / "checkpoints" / "ep0-ba1")).read_metadata()
                .state_dict_metadata)
    assert "state.model.repa_projector.net.0.weight" in keys
    assert any(k.startswith("state.optimizers.") and "repa_projector" in k and k.endswith("exp_avg_sq") for k in keys)
    assert not any("embeddings" in k or "encoder.layer" in k for k in keys)  # the teacher is never saved
