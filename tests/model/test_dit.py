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
    assert model.patch_in.bias is not None and model.patch_proj.in_features == 256  # PRX: both layers biased
    assert patchify(torch.zeros(1, 3, 512, 512), 32).shape[1] == 256
    assert patchify(torch.zeros(1, 3, 1024, 1024), 32).shape[1] == 1024
    plain = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8, bottleneck_dim=None))
    assert isinstance(plain.patch_in, torch.nn.Identity) and plain.patch_proj.in_features == 48
    assert plain(torch.randn(1, 3, 8, 12), torch.rand(1), torch.randn(1, 2, 8)).shape == (1, 3, 8, 12)


def test_prx_block_layout():
    """PRX's denoiser: bias-free attention/MLP projections, gated MLP of width int(C * ratio), text-key norm."""
    cfg = DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, mlp_ratio=3.3, text_dim=8)
    model = PixelDiT(cfg)
    block = model.blocks[0]
    assert cfg.mlp_dim == 105  # int(105.6), not round
    for name in ("qkv", "text_kv", "proj", "gate_proj", "up_proj", "down_proj"):
        assert getattr(block, name).bias is None, name
    assert block.gate_proj.out_features == block.up_proj.out_features == block.down_proj.in_features == 105
    assert block.text_k_norm is not block.k_norm and block.text_k_norm.weight.shape == (16,)
    assert block.modulation.bias is not None and model.text_proj.bias is not None
    assert not any("text_norm" in n for n, _ in model.named_parameters())  # no learned text norm by default
    assert cfg.rope_theta == 10000.0 and cfg.resolution_embeds
    with_norm = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8, text_norm=True))
    assert with_norm.text_norm.weight.shape == (8,)


def test_gated_mlp_is_down_gelu_gate_times_up():
    """With the attention gate 0 and the MLP gate 1, a block is x + down(gelu_tanh(gate h) * up h), h = LN(x)."""
    torch.manual_seed(0)
    cfg = DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8)
    model = PixelDiT(cfg)
    block = model.blocks[0]
    with torch.no_grad():
        block.modulation.bias[5 * 32:] = 1.0  # chunks: shift1, scale1, gate1, shift2, scale2, gate2
    ctx = model.context(torch.rand(2), torch.randn(2, 3, 8), None, 2, 2)
    x = torch.randn(2, 4, 32)
    h = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
    gated = torch.nn.functional.gelu(h @ block.gate_proj.weight.T, approximate="tanh") * (h @ block.up_proj.weight.T)
    torch.testing.assert_close(block(x, ctx), x + gated @ block.down_proj.weight.T)


def test_text_key_norm_acts_on_text_keys_only():
    model = _trained_copy(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8))
    x, t, text = torch.randn(1, 3, 8, 8), torch.rand(1), torch.randn(1, 3, 8)
    base = model(x, t, text)
    with torch.no_grad():
        model.blocks[0].text_k_norm.weight.mul_(3.0)
    assert not torch.allclose(model(x, t, text), base)
    # with every text token masked out the text keys are never attended, so their norm cannot matter
    mask = torch.zeros(1, 3, dtype=torch.bool)
    masked = model(x, t, text, mask)
    with torch.no_grad():
        model.blocks[0].text_k_norm.weight.mul_(0.5)
    torch.testing.assert_close(model(x, t, text, mask), masked)


def test_resolution_embedding_conditions_on_image_size():
    cfg = DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8)
    model, t, text = _trained_copy(cfg), torch.rand(2), torch.randn(2, 3, 8)
    square, wide = model.context(t, text, None, 4, 4).temb, model.context(t, text, None, 4, 6).temb
    assert not torch.allclose(square, wide)
    plain = _trained_copy(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8,
                                    resolution_embeds=False))
    torch.testing.assert_close(plain.context(t, text, None, 4, 4).temb, plain.context(t, text, None, 4, 6).temb)
    assert plain.resolution_mlp is None


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


def test_rope_positions_start_at_zero():
    """Token (0, 0) is unrotated; token (r, c) turns its row pairs by r * theta^(-k/(D/4)) and column pairs by c * ..."""
    rope = rope_2d(3, 5, 16, 10000.0, torch.device("cpu"))  # [1, 15, 8]
    torch.testing.assert_close(rope[0, 0], torch.ones(8, dtype=torch.complex64))
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    token = 2 * 5 + 3  # row 2, column 3
    angles = torch.cat([2 * freqs, 3 * freqs])
    torch.testing.assert_close(rope[0, token], torch.polar(torch.ones(8), angles))


def test_rope_grid_positions_are_image_fractions():
    """rope_grid=G: patch i of g sits at the centre of its span on a G-patch image, the same place at every g."""
    dev = torch.device("cpu")
    same = rope_2d(8, 8, 16, 10000.0, dev, ref_grid=8)
    torch.testing.assert_close(same, rope_2d(8, 8, 16, 10000.0, dev))  # g = G: PRX's patch indices
    coarse = rope_2d(4, 2, 16, 10000.0, dev, ref_grid=8)  # [1, 8, 8]
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    # row 3 of 4 covers rows 6-7 of 8 (centre 6.5); column 1 of 2 covers columns 4-7 (centre 5.5)
    angles = torch.cat([6.5 * freqs, 5.5 * freqs])
    torch.testing.assert_close(coarse[0, 3 * 2 + 1], torch.polar(torch.ones(8), angles))
    with pytest.raises(ValueError, match="rope_grid"):
        DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8, rope_grid=0)


def test_rope_grid_reaches_the_forward():
    """A model with rope_grid differs from the PRX-position model with the same weights, except at g = G."""
    torch.manual_seed(0)
    base = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8))
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fixed = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, text_dim=8, rope_grid=4))
    fixed.load_state_dict(base.state_dict())
    args = (torch.rand(2), torch.randn(2, 3, 8))
    at_ref = torch.randn(2, 3, 16, 16)  # 4 x 4 patches = the reference grid
    torch.testing.assert_close(fixed(at_ref, *args), base(at_ref, *args))
    small = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(fixed(small, *args), base(small, *args), atol=1e-4)


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


def _counted_flops(fn) -> int:
    """Forward FLOPs as torch's FlopCounterMode counts them (+ CPU SDPA, which it does not map in torch 2.7)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("bottleneck,resolution", [(16, True), (None, False)])
def test_matmul_flops_match_flop_counter(bottleneck, resolution):
    cfg = DiTConfig(patch_size=4, hidden_dim=32, depth=4, num_heads=2, mlp_ratio=2.5, bottleneck_dim=bottleneck,
                    text_dim=24, resolution_embeds=resolution)
    model = PixelDiT(cfg)
    x, t, text = torch.randn(3, 3, 16, 24), torch.rand(3), torch.randn(3, 5, 24)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert _counted_flops(lambda: model(x, t, text, mask)) == model.matmul_flops(3, 24, 5)
    assert _counted_flops(lambda: model(x, t, text)) == model.matmul_flops(3, 24, 5)


def test_matmul_flops_follow_routed_tokens():
    from composer_prx.algorithms.tread import tread_routing

    model = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=4, num_heads=2, bottleneck_dim=16, text_dim=24))
    x, t, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 24)
    with tread_routing(model, 1, -2, 0.5, generator=torch.Generator().manual_seed(0)):
        counted = _counted_flops(lambda: model(x, t, text))
    seen = [block.tokens_seen for block in model.blocks]
    assert seen == [16, 8, 8, 16]
    assert counted == model.matmul_flops(2, 16, 5, seen) < model.matmul_flops(2, 16, 5)


def test_composer_fsdp2_policy_wraps_each_block(tiny_model):
    """Composer asks the ComposerModel's children for fsdp_wrap_fn / activation_checkpointing_fn."""
    from composer.distributed.fsdp2_utils import generate_composer_model_policy

    policy = generate_composer_model_policy(tiny_model)
    wrapped = {name for name, module in tiny_model.named_modules() if policy._lambda_fn(module)}
    blocks = {f"denoiser.blocks.{i}" for i in range(len(tiny_model.denoiser.blocks))}
    assert blocks <= wrapped and "denoiser.final_proj" not in wrapped
    assert all(tiny_model.denoiser.activation_checkpointing_fn(b) for b in tiny_model.denoiser.blocks)
    assert not tiny_model.denoiser.activation_checkpointing_fn(tiny_model.denoiser.patch_in)
