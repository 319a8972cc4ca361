"""The run planner: its FLOP formulas against torch's FlopCounterMode, its CLI on the 24 h recipe, memory scaling."""

import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from composer_prx import config as C
from composer_prx import plan as P
from composer_prx.algorithms.tread import Route, tokens_per_block, tread_routing
from composer_prx.model.dit import TRAIN_FLOP_FACTOR, DiTConfig, PixelDiT, dit_matmul_flops

RECIPE = "yamls/prx_24h.yaml"
# The counter sees matmuls and attention products only; the formula counts every Linear's input gradient,
# which autograd skips where the input needs none (patch embedding of x_t, timestep/resolution features,
# text embeddings): counted fwd+bwd <= 3 x forward formula, within this share at these sizes.
FWD_BWD_TOLERANCE = 0.03


def _fwd_bwd_flops(model, x, t, text) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text).square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("routed", [False, True])
def test_denoiser_formula_matches_flop_counter_forward_backward(routed):
    cfg = DiTConfig(patch_size=4, hidden_dim=64, depth=4, num_heads=2, mlp_ratio=3.5, bottleneck_dim=16,
                    text_dim=32, resolution_embeds=True)
    model = PixelDiT(cfg)
    x, t, text = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 7, 32)
    n_img = (32 // 4) ** 2
    seen = tokens_per_block(cfg.depth, n_img, [Route(1, -2, 0.5)]) if routed else [n_img] * cfg.depth
    if routed:
        with tread_routing(model, 1, -2, 0.5, generator=torch.Generator().manual_seed(0)):
            counted = _fwd_bwd_flops(model, x, t, text)
        assert [block.tokens_seen for block in model.blocks] == seen == [64, 32, 32, 64]
    else:
        counted = _fwd_bwd_flops(model, x, t, text)
    predicted = TRAIN_FLOP_FACTOR * dit_matmul_flops(cfg, 2, n_img, 7, seen)
    assert predicted == TRAIN_FLOP_FACTOR * model.matmul_flops(2, n_img, 7, seen if routed else None)
    assert counted <= predicted
    assert (predicted - counted) / predicted < FWD_BWD_TOLERANCE


def test_lpips_vgg_formula_matches_flop_counter():
    import lpips

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's pretrained= deprecation
        net = lpips.LPIPS(pretrained=False, net="vgg", lpips=True, pnet_rand=True, verbose=False)
        image = torch.zeros(1, 3, 64, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        features = net.net(image)
        for lin, feature in zip(net.lins, features):
            lin(feature)
    assert counter.get_total_flops() == P.vgg16_lpips_flops(64, 48)
    assert sum(p.numel() for p in net.net.parameters()) == P.VGG16_LPIPS_PARAMS


def test_vit_teacher_formula_matches_flop_counter(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                                       patch_size=4, image_size=16, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    arch = P.vit_arch(str(tmp_path))
    assert (arch.depth, arch.dim, arch.mlp_dim, arch.patch_size, arch.prefix_tokens) == (2, 32, 128, 4, 5)
    model = Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.zeros(1, 3, 16, 16))
    assert counter.get_total_flops() == arch.forward_flops(4, 4)


def test_text_encoder_formula_from_a_local_config(text_encoder_dir):
    from composer_prx.model.text import load_text_encoder

    arch = P.text_arch(str(text_encoder_dir))
    encoder = load_text_encoder(str(text_encoder_dir))
    ids = torch.zeros(1, 12, dtype=torch.long)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    # the formula runs the BERT pooler (one Linear on the first token only) on every token: a small overcount
    assert 0 <= arch.forward_flops(12) - counter.get_total_flops() <= 0.1 * counter.get_total_flops()
    assert arch.params == sum(p.numel() for p in encoder.model.parameters())


@pytest.fixture(scope="module")
def recipe():
    return C.load_config(RECIPE)


def test_cli_prints_both_stages_of_the_recipe(capsys):
    plan = P.main([RECIPE, "--gpus", "32", "--gpu", "h200", "--mfu", "0.4"])
    out = capsys.readouterr().out
    for name in ("512px", "1024px", "denoiser fwd+bwd", "text encoder fwd", "REPA teacher fwd", "LPIPS fwd+bwd",
                 "DINO fwd+bwd", "MFU needed to fit the whole run in 24 h", "largest microbatch"):
        assert name in out
    assert [s.name for s in plan.stages] == ["512px", "1024px"]
    assert "REPA teacher fwd" not in plan.stages[1].flops  # stage 2 switches REPA off
    assert plan.stages[0].batches == 100000 and plan.stages[1].global_batch == 512
    # the hours follow from the FLOPs: at the needed MFU the run takes exactly 24 h
    assert plan.mfu_for_budget * 24 == pytest.approx(plan.total_hours * plan.mfu)


def test_stage_denoiser_flops_are_the_models_formula(recipe):
    plan = P.make_plan(recipe, gpus=32, gpu="h200")
    dit = recipe.model.dit
    n_img = (512 // dit.patch_size) ** 2
    seen = tokens_per_block(dit.depth, n_img, [Route(1, -2, 0.5)])
    assert plan.stages[0].flops["denoiser fwd+bwd"] == 3 * dit_matmul_flops(dit, 1024, n_img, 256, seen)
    dense = P.make_plan(C.load_config(RECIPE, ["algorithms.tread=null"]), gpus=32, gpu="h200")
    assert dense.stages[0].flops["denoiser fwd+bwd"] > plan.stages[0].flops["denoiser fwd+bwd"]


def test_memory_sharded_parts_halve_when_gpus_double(recipe):
    small, large = (P.make_plan(recipe, gpus=g, gpu="h200").stages[0] for g in (32, 64))
    for key, value in small.memory_gb.items():
        if "sharded" in key:
            assert large.memory_gb[key] == pytest.approx(value / 2)
        else:
            assert large.memory_gb[key] == pytest.approx(value)
    assert small.activation_ckpt_gb < small.activation_gb
    assert small.max_microbatch_ckpt > small.max_microbatch > 0
    bigger = P.make_plan(recipe, gpus=32, gpu="h200", gpu_mem_gb=282).stages[0]
    assert bigger.max_microbatch > 2 * small.max_microbatch
    adamw = P.make_plan(C.load_config("yamls/ablations/adamw_instead_of_muon.yaml"), gpus=32, gpu="h200").stages[0]
    assert adamw.memory_gb["optimizer (sharded)"] > small.memory_gb["optimizer (sharded)"]  # 2 moments, not 1


def test_bad_gpu_name_lists_the_known_ones(recipe, capsys):
    with pytest.raises(P.PlanError, match=r"unknown GPU 'h300'; known GPUs: \['a100', 'b200', 'h100', 'h200'\]"):
        P.make_plan(recipe, gpus=32, gpu="h300")
    with pytest.raises(SystemExit) as exit_info:
        P.main([RECIPE, "--gpus", "32", "--gpu", "h300"])
    assert exit_info.value.code == 2 and "known GPUs" in capsys.readouterr().err


def test_caption_tradeoff_online_encoder_flops_vs_stored_embedding_bytes_per_node(recipe):
    from composer_prx.data.text_embeddings import text_embedding_bytes_per_step

    plan = P.make_plan(recipe, gpus=32, gpu="h200", gpus_per_node=8)
    assert plan.nodes == 4
    for stage, (flops, stored) in zip(plan.stages, plan.text_tradeoff):
        assert flops == stage.flops["text encoder fwd"]  # what encoding online adds to the step
        assert stored == text_embedding_bytes_per_step(stage.global_batch, 256, recipe.model.dit.text_dim, nodes=4)
    stored = P.make_plan(recipe, gpus=32, gpu="h200", precomputed_text=True)
    assert "text encoder fwd" not in stored.stages[0].flops
    assert [f for f, _ in stored.text_tradeoff] == [f for f, _ in plan.text_tradeoff]  # the trade-off still shown
    one_node = P.make_plan(recipe, gpus=8, gpu="h200").text_tradeoff[0][1]
    assert one_node == pytest.approx(4 * plan.text_tradeoff[0][1], rel=1e-3)  # each of 4 nodes streams 1/4
