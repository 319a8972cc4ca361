import pytest
import torch

from composer_prx.model.dit import BlockContext, DiTConfig, PixelDiT, patchify, rope_2d, unpatchify


def test_patchify_round_trip_non_square():
    x = torch.randn(2, 3, 32, 48)
    tokens = patchify(x, 16)
    assert tokens.shape == (2, 6, 3 * 16 * 16)
    assert torch.equal(unpatchify(tokens, 16, 32, 48), x)
    # token 1 is the patch at row 0, column 1
    assert torch.equal(tokens[0, 1].view(3, 16, 16), x[0, :, :16, 16:32])


def test_size_not_multiple_of_patch_is_clear_error():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        patchify(torch.randn(1, 3, 40, 32), 16)


def test_forward_shapes_and_zero_init(tiny_dit_cfg):
    model = PixelDiT(tiny_dit_cfg)
    x = torch.randn(2, 3, 16, 24)
    out = model(x, torch.rand(2), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer
    assert isinstance(model.blocks, torch.nn.ModuleList) and model.routing is None


def test_bottleneck_and_reference_token_counts():
    cfg = DiTConfig(patch_size=32, hidden_dim=64, depth=2, num_heads=4, text_dim=8)
    model = PixelDiT(cfg)
    assert model.patch_in.in_features == 3 * 32 * 32 and model.patch_in.out_features == 256
    assert patchify(torch.zeros(1, 3, 512, 512), 32).shape[1] == 256
    assert patchify(torch.zeros(1, 3, 1024, 1024), 32).shape[1] == 1024


def _trained_copy(cfg):
    torch.manual_seed(1)
    model = PixelDiT(cfg)
    for p in model.parameters():  # leave the zero init so every path matters
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_text_conditioning_and_mask(tiny_dit_cfg):
    model = _trained_copy(tiny_dit_cfg)
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    text = torch.randn(1, 6, 32)
    base = model(x, t, text)
    assert not torch.allclose(base, model(x, t, torch.randn(1, 6, 32)))  # the text matters
    mask = torch.tensor([[True, True, True, False, False, False]])
    masked = model(x, t, text, mask)
    changed_pad = text.clone()
    changed_pad[:, 3:] = torch.randn(1, 3, 32)
    torch.testing.assert_close(model(x, t, changed_pad, mask), masked)  # padded tokens are ignored
    torch.testing.assert_close(model(x, t, text[:, :3]), masked, rtol=1e-5, atol=1e-5)


def test_blocks_follow_protocol_with_select(tiny_dit_cfg):
    model = _trained_copy(tiny_dit_cfg)
    x_img, t, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 32)
    ctx = model.context(t, text, None, 4, 4)
    tokens = model.patch_proj(model.patch_in(patchify(x_img, 4)))
    # a block over a subset of tokens with ctx.select == the same tokens of a full run when the block
    # cannot mix them (RoPE follows the tokens; attention over the subset only)
    idx = torch.tensor([[0, 5, 10, 15], [3, 2, 1, 0]])
    sub = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    out_sub = model.blocks[0](sub, ctx.select(idx))
    assert out_sub.shape == sub.shape
    perm = torch.stack([torch.randperm(16) for _ in range(2)])
    permuted = tokens.gather(1, perm.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    out_perm = model.blocks[0](permuted, ctx.select(perm))
    out_full = model.blocks[0](tokens, ctx)
    torch.testing.assert_close(out_perm, out_full.gather(1, perm.unsqueeze(-1).expand(-1, -1, 32)),
                               rtol=1e-5, atol=1e-5)  # permutation-equivariant given the right RoPE rows
    assert isinstance(ctx.select(idx), BlockContext) and ctx.select(idx).text is ctx.text


def test_rope_is_relative():
    from composer_prx.model.dit import apply_rope

    rope = rope_2d(4, 4, 8, 100.0, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    rq, rk = apply_rope(q, rope), apply_rope(k, rope)
    # the same q and k content: token pairs with the same 2D offset give the same score
    # (0,0)->(1,1) is tokens 0 -> 5, (1,1)->(2,2) is 5 -> 10; (0,1)->(1,2) is 1 -> 6
    scores = [(rq[0, 0, i] * rk[0, 0, j]).sum() for i, j in ((0, 5), (5, 10), (1, 6))]
    torch.testing.assert_close(scores[0], scores[1])
    torch.testing.assert_close(scores[0], scores[2])
    assert not torch.allclose((rq[0, 0, 0] * rk[0, 0, 1]).sum(), (rq[0, 0, 0] * rk[0, 0, 4]).sum())
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # rotations keep the norm


def test_gradients_reach_every_parameter(tiny_dit_cfg):
    model = _trained_copy(tiny_dit_cfg)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 32))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="text_dim"):
        PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=16))(
            torch.randn(1, 3, 8, 8), torch.rand(1), torch.randn(1, 2, 8))


def test_matmul_flops_counts_tokens():
    cfg = DiTConfig(patch_size=16, hidden_dim=384, depth=12, num_heads=6, mlp_ratio=3.5, text_dim=2304)
    model = PixelDiT(cfg)
    dense = model.matmul_flops(8, 256, 256)
    routed = model.matmul_flops(8, 256, 256, [256] * 2 + [128] * 9 + [256])
    assert routed < dense
    block = model.blocks[0]
    c, m = 384, 1344
    expected = 2 * 8 * (256 * c * (4 * c + 2 * m) + 256 * c * 2 * c) + 4 * 8 * 256 * 512 * c
    assert block.matmul_flops(8, 256, 256) == expected


def test_composer_fsdp2_policy_wraps_each_block(tiny_model):
    """Composer asks the ComposerModel's children for fsdp_wrap_fn / activation_checkpointing_fn."""
    from composer.distributed.fsdp2_utils import generate_composer_model_policy

    policy = generate_composer_model_policy(tiny_model)
    wrapped = {name for name, module in tiny_model.named_modules() if policy._lambda_fn(module)}
    blocks = {f"denoiser.blocks.{i}" for i in range(len(tiny_model.denoiser.blocks))}
    assert blocks <= wrapped and "denoiser.final_proj" not in wrapped
    assert all(tiny_model.denoiser.activation_checkpointing_fn(b) for b in tiny_model.denoiser.blocks)
    assert not tiny_model.denoiser.activation_checkpointing_fn(tiny_model.denoiser.patch_in)
