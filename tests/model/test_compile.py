"""model.compile: each PixelDiT block through torch.compile (inductor on CPU), same loss and gradients as eager,
with TREAD's routing hooks on the blocks and the parameter names unchanged."""

from pathlib import Path

import torch

from composer_prx import config as C
from composer_prx.algorithms.tread import apply_tread
from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel
from tests.conftest import image_batch

SHAPES = str(Path(__file__).resolve().parents[2] / "yamls" / "shapes.yaml")
CFG = DiTConfig(patch_size=4, hidden_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, bottleneck_dim=8, text_dim=32)


def loss_and_grads(model: PRXModel, batch: dict, seed: int, tread: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if tread is not None:  # the same TREAD selection in every call
        tread.manual_seed(seed)
    loss = model.loss(model(batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def model_with(encoder, depth: int) -> PRXModel:
    torch.manual_seed(0)
    denoiser = PixelDiT(DiTConfig(**{**CFG.__dict__, "depth": depth}))
    for block in denoiser.blocks:  # non-zero adaLN so every block changes the loss
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    torch.nn.init.normal_(denoiser.final_proj.weight, std=0.1)
    return PRXModel(denoiser, encoder, caption_dropout=0.0)


def assert_compiled_matches_eager(model: PRXModel, backend: str, tread: torch.Generator | None = None) -> None:
    batch = image_batch(n=2, size=16)
    names = list(model.state_dict())
    eager = loss_and_grads(model, batch, seed=3, tread=tread)
    model.denoiser.compile_blocks(backend)
    compiled = loss_and_grads(model, batch, seed=3, tread=tread)
    assert list(model.state_dict()) == names  # no _orig_mod prefix: checkpoints and export are unchanged
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert eager[1].keys() == compiled[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.denoiser.compile_blocks(None)
    torch.testing.assert_close(loss_and_grads(model, batch, seed=3, tread=tread)[0], eager[0], rtol=0, atol=0)


def test_inductor_compiled_blocks_give_the_eager_loss_and_gradients(tiny_model):
    assert_compiled_matches_eager(model_with(tiny_model.text_encoder, depth=1), "inductor")


def test_tread_hooks_stay_eager_around_compiled_blocks(tiny_model):
    """TREAD's gather / scatter hooks on the blocks run around the compiled computation (aot_eager: dynamo +
    AOTAutograd, the same tracing as inductor without its C++ build, which costs minutes on 2 cores)."""
    model = model_with(tiny_model.text_encoder, depth=3)
    tread = torch.Generator()
    apply_tread(model, 1, -2, 0.5, generator=tread)  # hooks on block 1: 8 of 16 tokens skip it
    assert_compiled_matches_eager(model, "aot_eager", tread)
    model.denoiser.compile_blocks("aot_eager")
    loss_and_grads(model, image_batch(n=2, size=16), seed=3, tread=tread)
    assert [b.tokens_seen for b in model.denoiser.blocks] == [16, 8, 16]  # routed inside the compiled blocks


def test_model_compile_key_compiles_the_blocks(text_encoder_dir):
    from composer_prx.train import build_prx_model

    overrides = ["model.dit={patch_size: 4, hidden_dim: 16, depth: 2, num_heads: 2, bottleneck_dim: 8, text_dim: 32}",
                 f"model.text_encoder.name_or_path={text_encoder_dir}", "model.compile=true"]
    cfg = C.load_config(SHAPES, overrides)
    assert all(block.compiled for block in build_prx_model(cfg).denoiser.blocks)
    cfg.model.compile = False
    assert not any(block.compiled for block in build_prx_model(cfg).denoiser.blocks)
