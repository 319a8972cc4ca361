"""Muon single-process behaviour: Newton-Schulz, the update rule, grouping, bad input, Composer checkpoints."""

import copy
import math

import pytest
import torch
from composer.loggers import InMemoryLogger
from torch import nn

from composer_prx.optim import (
    Muon,
    UpdateRMSMonitor,
    build_adamw,
    build_muon,
    muon_param_groups,
    newton_schulz,
    newton_schulz_flops,
)
from composer_prx.optim.newton_schulz import ns_method as _ns_method
from composer_prx.optim.newton_schulz import orthogonalize_chunks, update_scale
from tests.optim import muon_dist_run

A, B, C = 3.4445, -4.7750, 2.0315


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Textbook quintic iteration in float64, one matrix at a time."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("method", ["iterate", "gram", "auto"])
@pytest.mark.parametrize("shape", [(33, 10), (10, 33), (16, 16)])
def test_newton_schulz_matches_reference(shape, method):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, steps=5, dtype=torch.float32, method=method)
    assert ours.shape == g.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_newton_schulz(g), atol=2e-5, rtol=0)
    # the quintic pushes every singular value of a full-rank matrix into a band around 1
    sv = torch.linalg.svdvals(ours)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv


def test_newton_schulz_batched_equals_one_by_one():
    g = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(1))
    batched = newton_schulz(g)
    for k in range(3):
        torch.testing.assert_close(batched[k], newton_schulz(g[k]), atol=1e-6, rtol=0)


def test_newton_schulz_bf16_close_to_fp32():
    g = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    low = newton_schulz(g, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), newton_schulz(g), atol=0.06, rtol=0)


def test_flops_and_scaling_rules():
    assert newton_schulz_flops(33, 10, 5) == 5 * (4 * 10 * 10 * 33 + 2 * 10**3)
    assert newton_schulz_flops(10, 33, 5) == newton_schulz_flops(33, 10, 5)
    assert newton_schulz_flops(33, 10, 5, "gram") == 4 * 10 * 10 * 33 + 34 * 10**3
    # "auto" takes the Gram form only where it is cheaper, and only in fp32/fp64
    assert _ns_method(2304, 384, 5, torch.float32) == "gram" and _ns_method(384, 384, 5, torch.float32) == "iterate"
    assert _ns_method(2304, 384, 5, torch.bfloat16) == "iterate"
    with pytest.raises(ValueError, match="method='svd'"):
        newton_schulz(torch.ones(2, 2), method="svd")
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))  # orthonormal columns
    rms = (update_scale("moonlight", 64, 16) * q).square().mean().sqrt().item()
    assert rms == pytest.approx(0.2, rel=1e-9)  # Moonlight: matches an Adam-like update RMS of 0.2
    assert update_scale("keller", 64, 16) == 2.0 and update_scale("keller", 16, 64) == 1.0
    with pytest.raises(ValueError, match="unknown Muon scaling 'bogus'"):
        update_scale("bogus", 4, 4)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Embedding(5, dim)  # unusual in a block, still Adam
        self.repa_head = nn.Linear(dim, dim)  # REPA projector living inside a block: Adam by default


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.requires_grad_(False)  # frozen: never in the optimizer


class Denoiser(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.patch_embed = nn.Linear(12, dim)
        self.text_proj = nn.Linear(6, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.final = nn.Linear(dim, 12)
        self.conv = nn.Conv2d(3, 3, 3)


class Pipeline(nn.Module):
    def __init__(self):
        super().__init__()
        self.denoiser = Denoiser()
        self.repa_projector = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        self.teacher = Teacher()


def names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_default_grouping_on_a_dit_like_model():
    model = Pipeline()
    muon, adam = muon_param_groups(model)
    assert muon["use_muon"] and not adam["use_muon"]
    assert names(model, muon) == {f"denoiser.blocks.{i}.{m}.weight" for i in (0, 1) for m in ("qkv", "proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names(model, adam) == trainable - names(model, muon)
    assert "denoiser.blocks.0.table.weight" in names(model, adam)
    assert not any(n.startswith("teacher") for n in names(model, adam) | names(model, muon))


def test_grouping_overrides_and_their_errors():
    model = Pipeline()
    muon, adam = muon_param_groups(
        model,
        muon_params=["denoiser.final.weight"],
        adam_params=["denoiser.blocks.1.*"],
        muon_settings={"lr": 3e-4},
        adam_settings={"eps": 1e-6},
    )
    assert names(model, muon) == {
        "denoiser.final.weight",
        "denoiser.blocks.0.qkv.weight",
        "denoiser.blocks.0.proj.weight",
    }
    assert "denoiser.blocks.1.qkv.weight" in names(model, adam)
    assert muon["lr"] == 3e-4 and adam["eps"] == 1e-6
    with pytest.raises(ValueError, match=r"\['\*nothing\*'\] matched no trainable parameter"):
        muon_param_groups(model, adam_params=["*nothing*"])
    with pytest.raises(ValueError, match="denoiser.final.bias.*2D matrices only"):
        muon_param_groups(model, muon_params=["denoiser.final.*"])
    with pytest.raises(TypeError, match="lists of name patterns"):
        muon_param_groups(model, muon_params="denoiser.final.weight")


def test_bad_input_is_a_clear_error():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*2D matrices only.*use_muon=False"):
        Muon([{"params": [lin.weight, lin.bias], "use_muon": True}])
    with pytest.raises(ValueError, match=r"unknown Muon param-group key 'momentun'; did you mean 'momentum'\?"):
        Muon([{"params": [lin.weight], "use_muon": True, "momentun": 0.9}])
    with pytest.raises(ValueError, match=r"ns_chunks=2 does not divide the 3 rows"):
        Muon([{"params": [lin.weight], "use_muon": True, "ns_chunks": 2}])
    with pytest.raises(ValueError, match=r"grouping='prx'"):
        build_muon(Pipeline(), grouping="prx")
    with pytest.raises(ValueError, match="needs use_muon=True or False"):
        Muon([{"params": [lin.weight]}])
    with pytest.raises(ValueError, match="not a flat parameter list"):
        Muon(lin.parameters())
    with pytest.raises(ValueError, match=r"scaling='rms'.*moonlight"):
        Muon([{"params": [lin.weight], "use_muon": True, "scaling": "rms"}])
    with pytest.raises(ValueError, match="momentum=1.5"):
        Muon([{"params": [lin.weight], "use_muon": True}], momentum=1.5)
    with pytest.raises(
        ValueError, match=r"optimizer 'muon': unknown setting\(s\) \['learning_rate'\]; valid settings are \['lr'"
    ):
        build_muon(Pipeline(), learning_rate=1e-4)
    with pytest.raises(ValueError, match=r"optimizer 'adamw': unknown setting\(s\) \['momentum'\]"):
        build_adamw(Pipeline(), momentum=0.9)


def test_builders_use_recipe_defaults():
    opt = build_muon(Pipeline())
    muon, adam = opt.param_groups
    assert (muon["lr"], muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (1e-4, 0.95, True, 5)
    assert (adam["lr"], adam["betas"], adam["eps"]) == (1e-4, (0.9, 0.95), 1e-8)
    assert muon["scaling"] == "moonlight" and muon["ns_dtype"] == "auto" and muon["ns_method"] == "auto"
    adamw = build_adamw(Pipeline(), betas=[0.9, 0.99])
    assert adamw.param_groups[0]["betas"] == (0.9, 0.99) and adamw.param_groups[0]["lr"] == 1e-4
    assert sum(p.numel() for p in adamw.param_groups[0]["params"]) == sum(
        p.numel() for p in Pipeline().parameters() if p.requires_grad
    )


def test_step_follows_the_update_rule_and_adam_groups_match_torch_adamw():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 33))
    b = nn.Parameter(torch.randn(10))
    lr, mu, wd, adam_lr = 0.02, 0.95, 0.1, 0.01
    opt = Muon(
        [{"params": [w], "use_muon": True, "name": "m"}, {"params": [b], "use_muon": False, "lr": adam_lr}],
        lr=lr,
        momentum=mu,
        weight_decay=wd,
        scaling="keller",
    )
    b_ref = nn.Parameter(b.detach().clone())
    adamw = torch.optim.AdamW([b_ref], lr=adam_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    w_ref, buf = w.detach().clone().double(), torch.zeros(10, 33, dtype=torch.float64)
    for _ in range(3):
        gw, gb = torch.randn(10, 33), torch.randn(10)
        w.grad, b.grad, b_ref.grad = gw, gb, gb.clone()
        opt.step()
        adamw.step()
        buf = mu * buf + (1 - mu) * gw.double()
        nesterov = (1 - mu) * gw.double() + mu * buf
        w_ref = w_ref * (1 - lr * wd) - lr * math.sqrt(max(1, 10 / 33)) * reference_newton_schulz(nesterov)
    torch.testing.assert_close(w.detach().double(), w_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.detach(), b_ref.detach(), atol=1e-6, rtol=0)
    assert set(opt.update_rms()) == {"m", "group1"}
    assert opt.ns_flops == newton_schulz_flops(10, 33, 5, "gram")


def test_update_rms_of_moonlight_scaling_is_about_adams():
    w = nn.Parameter(torch.zeros(16, 64))
    opt = Muon([{"params": [w], "use_muon": True, "name": "muon"}])
    w.grad = torch.randn(16, 64)
    opt.step()
    assert 0.14 < opt.update_rms()["muon"] < 0.23  # 0.2 x (NS singular values, which sit in ~[0.7, 1.15])


def test_zero_gradient_step_with_zero_lr_changes_nothing():
    """What torch's distributed checkpoint does to initialise optimizer state before loading."""
    model = Pipeline()
    opt = build_muon(model, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("momentum_buffer" in opt.state[p] for p in opt.param_groups[0]["params"])


def test_composer_checkpoint_resume_is_bit_exact(tmp_path):
    full, _ = muon_dist_run.train(save_folder=str(tmp_path))
    ckpt = str(tmp_path / "ep0-ba2-rank0.pt")
    resumed, trainer = muon_dist_run.train(load_path=ckpt)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # control: the same resume (timestamp and data position restored) but without the optimizer state
    dropped, control = muon_dist_run.train(load_path=ckpt, callbacks=[muon_dist_run.DropOptimizerState()])
    assert int(control.state.timestamp.batch) == int(trainer.state.timestamp.batch) == muon_dist_run.STEPS
    assert not all(torch.equal(full[k], dropped[k]) for k in full)


def test_scheduler_keys_pass_through():
    """Composer's LambdaLR-based schedulers add `initial_lr`; Muon keeps keys it does not own."""
    lin = nn.Linear(4, 3)
    opt = Muon([{"params": [lin.weight], "use_muon": True, "initial_lr": 1e-4}])
    assert opt.param_groups[0]["initial_lr"] == 1e-4
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.add_param_group({"params": [lin.bias], "use_muon": False, "initial_lr": 1e-4})


def test_nesterov_off_follows_plain_momentum():
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(12, 20))
    lr, mu = 0.05, 0.9
    opt = Muon([{"params": [w], "use_muon": True}], lr=lr, momentum=mu, nesterov=False, scaling="none")
    w_ref, buf = w.detach().clone().double(), torch.zeros(12, 20, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(12, 20)
        w.grad = g
        opt.step()
        buf = mu * buf + (1 - mu) * g.double()
        w_ref = w_ref - lr * reference_newton_schulz(buf)
    torch.testing.assert_close(w.detach().double(), w_ref, atol=1e-5, rtol=0)


def test_ns_chunks_orthogonalise_each_row_block_apart():
    """A fused [3C, C] qkv with ns_chunks=3: each C x C block is its own Muon matrix (update and scale)."""
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(24, 8))
    g = torch.randn(24, 8)
    opt = Muon([{"params": [w], "use_muon": True, "ns_chunks": 3}], lr=0.1, momentum=0.0, nesterov=False)
    before = w.detach().clone().double()
    w.grad = g
    opt.step()
    blocks = [reference_newton_schulz(block) for block in g.chunk(3)]
    expected = before - 0.1 * update_scale("moonlight", 8, 8) * torch.cat(blocks)
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-5, rtol=0)
    assert opt.ns_flops == 3 * newton_schulz_flops(8, 8, 5)
    # tall and wide blocks are batched (one wide shape; Gram form: one r, any s) with the same result
    mats = [torch.randn(16, 6), torch.randn(6, 16), torch.randn(12, 16), torch.randn(6, 40)]
    refs = [reference_newton_schulz(mats[0]), reference_newton_schulz(mats[1]),
            torch.cat([reference_newton_schulz(b) for b in mats[2].chunk(2)]), reference_newton_schulz(mats[3])]
    for method in ("iterate", "gram"):
        outs = orthogonalize_chunks(mats, [1, 1, 2, 1], [5] * 4, [method] * 4, torch.float32)
        for out, ref, mat in zip(outs, refs, mats):
            assert out.shape == mat.shape
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ["iterate", "gram"])
@pytest.mark.parametrize("shape", [(33, 10), (10, 64)])
def test_newton_schulz_flops_match_flop_counter(shape, method):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        newton_schulz(torch.randn(shape), steps=5, method=method)
    assert counter.get_total_flops() == newton_schulz_flops(*shape, 5, method)


def test_update_rms_monitor_logs_each_group():
    logger = InMemoryLogger()
    muon_dist_run.train(steps=2, callbacks=[UpdateRMSMonitor()], loggers=[logger])
    muon_rms = logger.data["optimizer/update_rms/muon"]
    assert len(muon_rms) == 2 and all(0 < v < 0.25 for _, v in muon_rms)
    assert len(logger.data["optimizer/update_rms/adam"]) == 2
    with pytest.raises(ValueError, match="interval=0"):
        UpdateRMSMonitor(interval=0)


def test_default_grouping_on_pixel_dit(tiny_model):
    """Our own denoiser: block matrices -> Muon; adaLN modulation, norms, biases, input/output -> Adam."""
    from composer_prx.optim import muon_param_groups

    groups = {g["name"]: g["params"] for g in muon_param_groups(tiny_model)}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    adam = {names[id(p)] for p in groups["adam"]}
    assert "denoiser.blocks.0.qkv.weight" in muon and "denoiser.blocks.3.down_proj.weight" in muon
    assert "denoiser.blocks.0.text_kv.weight" in muon
    assert "denoiser.blocks.0.modulation.weight" in muon  # the recipe: every 2D block matrix
    assert {"denoiser.patch_in.weight", "denoiser.final_proj.weight",
            "denoiser.text_proj.weight", "denoiser.blocks.0.modulation.bias"} <= adam
    assert all(p.ndim == 2 for p in groups["muon"])
    assert len(muon) + len(adam) == sum(1 for _ in tiny_model.parameters())
    split = {g["name"]: g["params"] for g in muon_param_groups(tiny_model, grouping="modulation_adam")}
    assert "denoiser.blocks.0.modulation.weight" in {names[id(p)] for p in split["adam"]}
