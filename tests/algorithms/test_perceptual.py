"""LPIPS and DINO perceptual losses: real nets (shipped LPIPS heads, random backbones saved and loaded back),
ladders, gradients, the t_range gate, a real Composer Trainer and what its checkpoint holds."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torchvision
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from composer_prx.algorithms.perceptual import (DinoPerceptualLoss, FrozenLpips, LpipsLoss, _heads_path, load_lpips,
                                                perceptual_term, target_size)
from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import FlowOutput, PRXModel


def _save_features(model: nn.Module, path) -> str:
    """A torchvision-style checkpoint of a random backbone (features.* only: the part LPIPS reads)."""
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)
    return str(path)


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return _save_features(torchvision.models.alexnet(weights=None), tmp_path_factory.mktemp("lpips") / "alex.pth")


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=32)
    path = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def _image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1]: smooth colour fields plus sharp squares (so blur and noise both show)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(batch, 3, 4, 4, generator=gen), size=size, mode="bilinear")
    squares = (torch.rand(batch, 1, 8, 8, generator=gen) > 0.5).float().repeat_interleave(size // 8, -1)
    squares = squares.repeat_interleave(size // 8, -2)
    return (0.6 * low + 0.4 * squares) * 2 - 1


def _ladders(x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    return {"noise": [x + s * noise for s in (0.05, 0.1, 0.2, 0.4)],
            "blur": [gaussian_blur(x, [k, k], [s, s]) for k, s in ((3, 0.5), (5, 1.0), (9, 2.0), (15, 4.0))]}


def _assert_zero_and_monotone(distance) -> None:
    x = _image()
    assert torch.equal(distance(x, x), torch.zeros(x.shape[0]))
    for name, ladder in _ladders(x).items():
        values = torch.stack([distance(rung, x) for rung in ladder]).mean(1)  # [rungs]
        assert (values.diff() > 0).all(), f"{name} ladder not increasing: {values.tolist()}"


# ---- LPIPS: loading ----------------------------------------------------------------------------------
def test_lpips_vgg_from_a_torchvision_file_and_from_a_full_state_dict(tmp_path):
    torch.manual_seed(0)
    cfg = torchvision.models.vgg.cfgs["D"]  # VGG16's features alone, without building the classifier
    features = torchvision.models.vgg.make_layers(cfg)
    path = str(tmp_path / "vgg16-397923af.pth")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = load_lpips("vgg", path)
    assert not [w for w in caught if "pretrained" in str(w.message) or "weights" in str(w.message)]
    assert load_lpips("vgg", path) is frozen  # once per process
    heads = torch.load(_heads_path("vgg"), map_location="cpu", weights_only=True)
    for k in range(5):  # the shipped heads, under the keys use_dropout=True gives them
        assert torch.equal(frozen.net.lins[k].model[1].weight, heads[f"lin{k}.model.1.weight"])
    assert torch.equal(frozen.net.net.slice5[-2].weight, features[28].weight)
    assert not frozen.net.training and not any(p.requires_grad for p in frozen.net.parameters())
    x, y = _image(seed=0), _image(seed=1)
    reference = frozen(x, y)
    frozen.net.train()  # a stray .train() must not switch the heads' Dropout on
    assert torch.equal(frozen(x, y), reference) and not frozen.net.training

    full = tmp_path / "lpips_full.pth"
    torch.save(frozen.net.state_dict(), full)
    torch.testing.assert_close(load_lpips("vgg", str(full))(x, y), reference)


def test_lpips_missing_weights_is_one_line_naming_file_and_setting(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_lpips("vgg", str(tmp_path / "absent.pth"))
    message = str(err.value)
    assert "\n" not in message and "absent.pth" in message and "vgg16-397923af.pth" in message
    assert "backbone_path" in message
    with pytest.raises(ValueError, match="not torchvision's alex"):
        torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        load_lpips("alex", str(tmp_path / "bad.pth"))


# ---- the losses' values ------------------------------------------------------------------------------
def test_lpips_value_and_gradient_are_the_lpips_package_s(alex_file):
    """Our leaner LPIPS (channels-last, one autograd node per layer) against the package's own LPIPS.forward
    and autograd through it, in float64 so the comparison is tight."""
    frozen = load_lpips("alex", alex_file)
    net64 = copy.deepcopy(frozen.net).double()
    frozen64 = FrozenLpips(net64, "alex64")
    x, y = _image(seed=0).double(), _image(seed=1).double()
    pred = x.clone().requires_grad_()
    reference = net64(pred, y).flatten()  # the lpips package's forward: the definition
    (reference * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    ours_pred = x.clone().requires_grad_()
    ours = frozen64(ours_pred, y)
    (ours * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_pred.grad, pred.grad, rtol=1e-8, atol=1e-12)
    assert pred.grad.abs().max() > 0
    # a pixel whose features are all zero (dead ReLUs) gets no gradient, not the package's NaN
    from composer_prx.algorithms.perceptual import _LayerDistance
    f0 = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    f0[:, :, 1, 1] = 0
    f0.requires_grad_()
    _LayerDistance.apply(f0, torch.rand(2, 4, 3, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(f0.grad).all() and (f0.grad[:, :, 1, 1] == 0).all() and f0.grad.abs().sum() > 0
    # fp32 as trained: the same within fp32 rounding
    torch.testing.assert_close(frozen(x.float(), y.float()), reference.float(), rtol=1e-4, atol=1e-6)
    # under bf16 autocast (the accelerator setting) the distance comes back in fp32, near the fp32 value
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = frozen(x.float(), y.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference.float(), rtol=0.1, atol=1e-3)


def test_lpips_zero_for_equal_and_monotone_on_blur_and_noise(alex_file):
    frozen = load_lpips("alex", alex_file)
    _assert_zero_and_monotone(frozen)


@pytest.mark.parametrize("pooled", [True, False])
def test_dino_zero_for_equal_and_monotone_on_blur_and_noise(dino_dir, pooled):
    loss = DinoPerceptualLoss(teacher=dino_dir, resolution=None, pooled=pooled)
    _assert_zero_and_monotone(lambda a, b: loss.distance(a, b).detach())
    x, y = _image(seed=0), _image(seed=1)  # the stated definition, from the teacher's own outputs
    ex, ey = loss.teacher_on(torch.device("cpu")).encode(x), loss.teacher_on(torch.device("cpu")).encode(y)
    cos = (torch.nn.functional.cosine_similarity(ex.pooled, ey.pooled, dim=-1) if pooled else
           torch.nn.functional.cosine_similarity(ex.patch_tokens, ey.patch_tokens, dim=-1).flatten(1).mean(1))
    torch.testing.assert_close(loss.distance(x, y), 1 - cos, atol=1e-5, rtol=1e-4)


def test_resolution_and_grid():
    assert target_size(64, 128, None) == (64, 128)
    assert target_size(64, 128, 32) == (32, 64)  # shorter side, aspect kept
    assert target_size(64, 128, 0.5) == (32, 64)
    assert DinoPerceptualLoss(resolution=224).grid(512, 768, 14) == (16, 24)
    for bad in (0.0, 1.5, 8, "half", True):
        with pytest.raises(ValueError, match="resolution"):
            LpipsLoss(resolution=bad)
    for bad in ((0.5, 0.2), (-0.1, 1.0), 0.3):
        with pytest.raises(ValueError, match="t_range"):
            LpipsLoss(t_range=bad)


# ---- gradients and the gate ----------------------------------------------------------------------------
def _tiny_prx(seed: int = 0) -> PRXModel:
    torch.manual_seed(seed)
    dit = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, bottleneck_dim=16,
                             text_dim=16))
    for name, param in dit.named_parameters():
        if "modulation" in name or "final" in name:
            nn.init.normal_(param, std=0.1)
    return PRXModel(dit, caption_dropout=0.0)


def _batch(b: int = 4, size: int = 32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, size, size, generator=gen) * 2 - 1, "text_emb": torch.randn(b, 5, 16, generator=gen),
            "text_mask": torch.ones(b, 5, dtype=torch.bool)}


def test_gradients_reach_the_denoiser_and_never_the_frozen_nets(alex_file, dino_dir):
    model = _tiny_prx()
    lpips_loss, dino_loss = LpipsLoss(net="alex", backbone_path=alex_file), DinoPerceptualLoss(teacher=dino_dir, resolution=None)
    out = model(_batch())
    out.x_pred.retain_grad()
    (lpips_loss.term(out) + dino_loss.term(out)).backward()
    assert out.x_pred.grad is not None and out.x_pred.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.denoiser.parameters() if p.grad is not None) > 0
    from composer_prx.encoders import load_vision_encoder

    assert dino_loss.teacher_on(torch.device("cpu")) is load_vision_encoder(dino_dir)  # the object REPA gets
    for net in (lpips_loss.lpips_on(torch.device("cpu")).net, dino_loss.teacher_on(torch.device("cpu")).net):
        assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_t_range_gate_applies_exactly_to_the_samples_in_range(alex_file):
    frozen = load_lpips("alex", alex_file)
    x = _image(batch=4, size=32, seed=2)
    x_pred = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    t = torch.tensor([0.1, 0.5, 0.7, 0.9])
    term = perceptual_term(x_pred, x, t, frozen, (0.0, 0.7))  # PixelGen's t_JiT >= 0.3
    per_sample = frozen(x_pred.detach(), x)
    torch.testing.assert_close(term, per_sample[:3].mean())
    term.backward()
    assert (x_pred.grad[:3].flatten(1).abs().sum(1) > 0).all() and torch.equal(x_pred.grad[3], torch.zeros_like(x[3]))
    none = perceptual_term(x_pred, x, t, frozen, (0.95, 1.0))
    assert none.item() == 0.0 and none.requires_grad
    torch.testing.assert_close(perceptual_term(x_pred, x, t, frozen), per_sample.mean())


def test_term_needs_a_flow_output():
    with pytest.raises(TypeError, match="FlowOutput"):
        LpipsLoss().term({"x_pred": torch.zeros(1)})


# ---- a real Trainer ------------------------------------------------------------------------------------
def test_trains_with_both_losses_logged_and_frozen_nets_absent_from_the_checkpoint(alex_file, dino_dir, tmp_path):
    model = _tiny_prx()
    logger = InMemoryLogger()
    batches = [_batch(seed=i) for i in range(3)]
    algorithms = [LpipsLoss(weight=0.1, net="alex", backbone_path=alex_file, t_range=(0.0, 1.0)),
                  DinoPerceptualLoss(weight=0.01, teacher=dino_dir, resolution=32)]
    before = [p.detach().clone() for p in model.denoiser.parameters()]
    trainer = Trainer(model=model, train_dataloader=batches, max_duration="3ba", algorithms=algorithms, device_train_microbatch_size=4,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), loggers=[logger], device="cpu",
                      precision="fp32", save_folder=str(tmp_path / "ckpt"), save_interval="3ba",
                      save_filename="ep{epoch}-ba{batch}.pt", progress_bar=False, log_to_console=False, seed=0)
    trainer.fit()
    trainer.close()
    for name in ("loss/train/lpips", "loss/train/dino_perceptual"):
        values = [float(v) for _, v in logger.data[name]]
        assert len(values) == 3 and all(v > 0 for v in values), (name, values)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.denoiser.parameters()))

    [path] = [p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".pt") and "latest" not in p]
    saved = torch.load(tmp_path / "ckpt" / path, map_location="cpu", weights_only=False)
    weights = saved["state"]["model"]
    assert all(key.startswith("denoiser.") for key in weights), sorted(weights)[:5]
    frozen_numel = sum(p.numel() for p in load_lpips("alex", alex_file).net.parameters())
    frozen_numel += sum(p.numel() for p in algorithms[1].teacher_on(torch.device("cpu")).net.parameters())
    saved_numel = sum(v.numel() for v in weights.values() if torch.is_tensor(v))
    assert saved_numel == sum(v.numel() for v in model.denoiser.state_dict().values())
    opt_state = next(iter(saved["state"]["optimizers"].values()))["state"]
    assert sum(s["exp_avg"].numel() for s in opt_state.values()) == sum(p.numel() for p in model.parameters())
    assert frozen_numel > 0


def test_registry_names():
    from composer_prx import config

    assert config.resolve("algorithms", "lpips") is LpipsLoss
    assert config.resolve("algorithms", "dino_perceptual") is DinoPerceptualLoss
