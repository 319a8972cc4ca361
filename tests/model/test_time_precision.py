"""Under Composer's FSDP2 mixed-precision policy (amp_bf16) the timestep reaches its embedding in fp32, unrounded."""

import socket

import torch
import torch.distributed as torch_dist

from composer_prx.model import dit
from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel


def test_t_reaches_the_timestep_embedding_in_fp32_under_fsdp2_amp_bf16(monkeypatch):
    from composer.core import Precision
    from composer.distributed.fsdp2 import create_mixed_precision_policy
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    owned = not torch_dist.is_initialized()  # an earlier in-process Trainer may have set up a 1-rank group
    if owned:
        torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = PRXModel(PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=1, num_heads=2, bottleneck_dim=8,
                                            text_dim=16)))
        policy = create_mixed_precision_policy(Precision.AMP_BF16, "DEFAULT")
        assert policy.param_dtype == torch.bfloat16
        fully_shard(model.denoiser, mp_policy=policy)  # Composer wraps each direct child of the ComposerModel
        seen = []
        real = dit.timestep_embedding

        def spy(t, *args, **kwargs):
            seen.append(t.detach().clone())
            return real(t, *args, **kwargs)

        monkeypatch.setattr(dit, "timestep_embedding", spy)
        t = torch.tensor([0.123456789, 0.987654321, 0.0501])
        x_t, text = torch.randn(3, 3, 8, 8), torch.randn(3, 5, 16)
        out = model.call_denoiser(x_t, t, text, None)
        assert out.dtype == torch.bfloat16  # the denoiser itself runs in bf16 under the policy
        assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t)  # t is not rounded to bf16
        assert not torch.equal(t.bfloat16().float(), t)  # (which would have changed it)
        seen.clear()
        model.denoiser(x_t, t, text)  # a float t given directly is cast by the policy: what the bits avoid
        assert not torch.equal(seen[0].float(), t)
    finally:
        if owned:
            torch_dist.destroy_process_group()
