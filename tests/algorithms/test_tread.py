"""TREAD: exactness of the route, the routing contract, the Trainer path on a foreign model, resumption."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerModel
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.data import DataLoader, TensorDataset

from composer_prx.algorithms.tread import Route, Tread, apply_tread, draw_keep_idx, find_denoiser, tread_routing
from composer_prx.model.dit import DiTConfig, PixelDiT

N_IMG = 16  # 16x16 image, patch 4


def make_dit(depth: int = 6, seed: int = 0) -> PixelDiT:
    """Tiny PixelDiT with the zero-initialised adaLN / output layers randomised, so every block matters."""
    torch.manual_seed(seed)
    dit = PixelDiT(DiTConfig(patch_size=4, hidden_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                             bottleneck_dim=16, text_dim=16))
    for name, param in dit.named_parameters():
        if "modulation" in name or "final" in name:
            nn.init.normal_(param, std=0.1)
    return dit


def dit_inputs(batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 16, 16, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 5, 16, generator=gen))


# ---- exactness -------------------------------------------------------------------------------------
def test_ratio_zero_is_bit_exact_dense():
    dit = make_dit()
    x_t, t, text = dit_inputs()
    dense = dit(x_t, t, text)
    handle = apply_tread(dit, 1, -2, ratio=0.0)
    routed = dit(x_t, t, text)
    assert dit.routing is None
    assert torch.equal(dense, routed)
    handle.remove()


def test_route_passes_skipped_tokens_unchanged_and_kept_tokens_match_dense_blocks():
    dit = make_dit()
    x_t, t, text = dit_inputs()
    seen = {}

    def grab_in(module, args):
        seen["x_in"], seen["ctx"] = args[0].detach().clone(), args[1]

    def grab_out(module, args, output):
        seen["x_out"], seen["routing"] = output.detach().clone(), dit.routing

    dit.blocks[1].register_forward_pre_hook(grab_in)  # before TREAD's hooks: sees the full tokens
    handle = apply_tread(dit, 1, 4, ratio=0.5, generator=torch.Generator().manual_seed(5))
    keep_seen = []
    probes = [dit.blocks[2].register_forward_hook(lambda m, a, o: keep_seen.append(dit.routing.keep_idx)),
              dit.blocks[4].register_forward_hook(grab_out)]  # after TREAD's: sees the scattered result
    dit(x_t, t, text)
    for probe in probes:
        probe.remove()
    keep = keep_seen[0]  # [B, K]
    assert keep.shape == (3, N_IMG // 2) and seen["routing"] is None
    skipped = torch.ones(3, N_IMG, dtype=torch.bool)
    skipped[torch.arange(3)[:, None], keep] = False
    assert torch.equal(seen["x_out"][skipped], seen["x_in"][skipped])

    handle.remove()
    idx = keep.unsqueeze(-1).expand(-1, -1, seen["x_in"].shape[-1])
    x, ctx = seen["x_in"].gather(1, idx), seen["ctx"].select(keep)
    with torch.no_grad():
        for block in dit.blocks[1:5]:
            x = block(x, ctx)
    torch.testing.assert_close(seen["x_out"].gather(1, idx), x, rtol=0, atol=1e-6)


def test_gradients_reach_every_block_and_the_global_rng_is_untouched():
    dit = make_dit()
    x_t, t, text = dit_inputs()
    apply_tread(dit, 1, -2, 0.5)
    rng = torch.get_rng_state()
    dit(x_t, t, text).square().mean().backward()
    assert torch.equal(rng, torch.get_rng_state())
    for i, block in enumerate(dit.blocks):
        for name, param in block.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"block {i} {name} got no gradient"
    assert [block.tokens_seen for block in dit.blocks] == [16, 8, 8, 8, 8, 16]


def test_several_routes_and_routing_is_published_only_inside_a_route():
    dit = make_dit()
    x_t, t, text = dit_inputs()
    apply_tread(dit, routes=[(3, -2, 0.25), Route(0, 1, 0.5)])
    observed = []
    for i, block in enumerate(dit.blocks):
        def record(module, args, i=i):
            routing = dit.routing
            observed.append((i, args[0].shape[1], None if routing is None else routing.keep_idx.shape[1],
                             None if routing is None else (routing.route_start, routing.route_end, routing.n_tokens)))
        block.register_forward_pre_hook(record)  # after TREAD's pre-hooks
    dit(x_t, t, text)
    assert observed == [(0, 8, 8, (0, 1, 16)), (1, 8, 8, (0, 1, 16)), (2, 16, None, None),
                        (3, 12, 12, (3, 4, 16)), (4, 12, 12, (3, 4, 16)), (5, 16, None, None)]
    assert dit.routing is None


@pytest.mark.filterwarnings("ignore:Please specify CheckpointImpl")
@pytest.mark.parametrize(
    ("impl", "hooks_inside"),
    # (REENTRANT, outside) is left out: reentrant checkpointing cannot see the tensors inside a ctx
    # dataclass, so it fails for the dense model already; the protocol needs non-reentrant checkpoints.
    [(CheckpointImpl.NO_REENTRANT, True), (CheckpointImpl.NO_REENTRANT, False), (CheckpointImpl.REENTRANT, True)],
)
def test_activation_checkpointing_recomputes_the_same_selection(impl, hooks_inside):
    x_t, t, text = dit_inputs()
    grads = []
    for checkpointed in (False, True):
        dit = make_dit()
        if checkpointed and not hooks_inside:
            dit.blocks = nn.ModuleList(checkpoint_wrapper(b, checkpoint_impl=impl) for b in dit.blocks)
        apply_tread(dit, 1, -2, 0.5, generator=torch.Generator().manual_seed(3))
        if checkpointed and hooks_inside:  # hooks end up inside the recomputed region
            dit.blocks = nn.ModuleList(checkpoint_wrapper(b, checkpoint_impl=impl) for b in dit.blocks)
            if impl == CheckpointImpl.REENTRANT:  # the scatter would escape the checkpoint: refused
                with pytest.raises(RuntimeError, match="reentrant activation checkpoint"):
                    dit(x_t, t, text)
                return
        dit(x_t, t, text).square().mean().backward()
        grads.append([p.grad.clone() for p in dit.parameters()])
    for dense_grad, ckpt_grad in zip(*grads):
        torch.testing.assert_close(ckpt_grad, dense_grad, rtol=1e-5, atol=1e-7)


# ---- when it routes ----------------------------------------------------------------------------------
def test_training_only_and_sampling_context():
    dit = make_dit()
    x_t, t, text = dit_inputs()
    apply_tread(dit, 1, -2, 0.5)
    tokens = lambda: [block.tokens_seen for block in dit.blocks]  # noqa: E731
    with torch.no_grad():
        dit(x_t, t, text)
    assert tokens() == [16] * 6  # no autograd: not a training forward
    dit.eval()
    dense = dit(x_t, t, text)
    assert tokens() == [16] * 6
    with tread_routing(dit, 2, 3, 0.75, generator=torch.Generator().manual_seed(0)) as handle:
        first = dit(x_t, t, text)
        assert tokens() == [16, 16, 4, 4, 16, 16]
        second = dit(x_t, t, text)
        dit.train()  # the training route is paused inside the context
        dit(x_t, t, text)
        assert tokens() == [16, 16, 4, 4, 16, 16]
        dit.eval()
    assert not handle.attached and not torch.equal(first, second)  # fresh selection per call
    with tread_routing(dit, 2, 3, 0.75, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(dit(x_t, t, text), first)  # reproducible from the generator
    assert torch.equal(dit(x_t, t, text), dense)


def test_draw_keep_idx_is_a_sorted_subset_per_sample():
    keep = draw_keep_idx(4, 10, 0.3, torch.Generator().manual_seed(0))
    assert keep.shape == (4, 7)
    assert all(len(set(row.tolist())) == 7 and row.tolist() == sorted(row.tolist()) for row in keep)
    assert not all(torch.equal(keep[0], row) for row in keep[1:])


def test_bad_arguments_fail_with_clear_messages():
    with pytest.raises(ValueError, match="ratio"):
        Tread(ratio=1.0)
    with pytest.raises(ValueError, match="either routes"):
        Tread(routes=[(1, 2, 0.5)], ratio=0.5)
    with pytest.raises(ValueError, match="after its end"):
        Tread(route_start=4, route_end=2)
    dit = make_dit()
    with pytest.raises(ValueError, match="out of range"):
        apply_tread(dit, 1, 6)
    with pytest.raises(ValueError, match="overlap"):
        apply_tread(dit, routes=[(0, 2, 0.5), (2, 4, 0.5)])
    handle = apply_tread(dit, 1, 2)
    with pytest.raises(ValueError, match="already has TREAD routing"):
        apply_tread(dit, 3, 4)
    handle.remove()
    with pytest.raises(ValueError, match="found no denoiser"):
        apply_tread(nn.Linear(2, 2))


# ---- a foreign model that follows the protocol, in a real Trainer -----------------------------------
@dataclass
class PosContext:
    """Our own context type: a per-image conditioning vector and per-token positions."""

    cond: Tensor  # [B, C]
    pos: Tensor  # [B or 1, N, C]

    def select(self, idx: Tensor) -> PosContext:
        pos = self.pos.expand(idx.shape[0], -1, -1)
        return PosContext(self.cond, pos.gather(1, idx.unsqueeze(-1).expand(-1, -1, pos.shape[-1])))


class MixerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, ctx: PosContext) -> Tensor:
        h = x + ctx.pos + ctx.cond[:, None]
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """A denoiser that is not ours: tokens in, tokens out; no `routing` attribute of its own."""

    def __init__(self, dim: int = 16, depth: int = 4, n_tokens: int = 8, in_dim: int = 4, block=MixerBlock):
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, n_tokens, dim))
        self.cond = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, in_dim)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        ctx = PosContext(self.cond(t[:, None]), self.pos)
        x = self.inp(x_t)
        for block in self.blocks:
            x = block(x, ctx)
        return self.out(x)


class TinyFlow(ComposerModel):
    """x-prediction flow matching on token sequences; the net is found through its `blocks`."""

    def __init__(self, block=MixerBlock):
        super().__init__()
        self.net = TinyNet(block=block)
        self.selections: list[Tensor] = []
        self.net.blocks[1].register_forward_hook(self._record)

    def _record(self, module, args, output):
        routing = getattr(self.net, "routing", None)
        if routing is not None:
            self.selections.append(routing.keep_idx.clone())

    def forward(self, batch):
        x = batch[0]
        t = torch.rand(x.shape[0])
        eps = torch.randn_like(x)
        x_t = (1 - t[:, None, None]) * x + t[:, None, None] * eps
        return self.net(x_t, t), x

    def loss(self, outputs, batch):
        x_pred, x = outputs
        return F.mse_loss(x_pred, x)


def tiny_trainer(model: ComposerModel, **kwargs) -> Trainer:
    data = TensorDataset(torch.randn(16, 8, 4, generator=torch.Generator().manual_seed(0)))
    return Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )


def test_find_denoiser_rule():
    model = TinyFlow()
    assert find_denoiser(model) is model.net
    assert find_denoiser(model.net) is model.net
    holder = nn.Module()
    holder.denoiser = nn.Linear(1, 1)
    assert find_denoiser(holder) is holder.denoiser


def test_trains_a_foreign_model_in_a_composer_trainer():
    torch.manual_seed(0)
    model = TinyFlow()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = tiny_trainer(model, max_duration="3ba", algorithms=[Tread(route_start=1, route_end=-2, ratio=0.5)],
                           seed=3, device_train_microbatch_size=2)
    trainer.fit()
    # 3 batches x 2 micro-batches, each with its own selection of 4 of the 8 tokens per sample
    assert len(model.selections) == 6 and all(s.shape == (2, 4) for s in model.selections)
    assert len({tuple(s.flatten().tolist()) for s in model.selections}) == 6
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # hooks are gone after fit: a training forward is dense again
    model.selections.clear()
    model(next(iter(trainer.state.train_dataloader)))
    assert model.selections == [] and model.net.routing is None


class NoCtxBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


class PlainCtx:
    pass


class NoSelectBlock(NoCtxBlock):
    def forward(self, x: Tensor, ctx: PlainCtx) -> Tensor:
        return self.lin(x)


@pytest.mark.parametrize(
    ("block", "tread", "message"),
    [
        (NoCtxBlock, Tread(), "cannot be called as block"),
        (NoSelectBlock, Tread(), "no select"),
        (MixerBlock, Tread(route_start=1, route_end=7), "out of range"),
    ],
)
def test_protocol_violations_fail_at_init(block, tread, message):
    with pytest.raises(ValueError, match=message):
        tiny_trainer(TinyFlow(block=block), max_duration="1ba", algorithms=[tread])


def test_resumption_routes_and_trains_exactly_like_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    full = TinyFlow()
    tiny_trainer(full, max_duration="4ba", algorithms=[Tread(route_start=1, route_end=2)], seed=7).fit()

    torch.manual_seed(0)
    first = TinyFlow()
    tiny_trainer(first, max_duration="2ba", algorithms=[Tread(route_start=1, route_end=2)], seed=7,
                 save_folder=str(tmp_path), save_filename="ba{batch}.pt", save_interval="2ba").fit()
    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    resumed = TinyFlow()
    tiny_trainer(resumed, max_duration="4ba", algorithms=[Tread(route_start=1, route_end=2)], seed=123,
                 load_path=str(tmp_path / "ba2.pt")).fit()

    assert len(full.selections) == 4 and len(resumed.selections) == 2
    for expected, got in zip(full.selections, first.selections + resumed.selections):
        assert torch.equal(expected, got)
    for (name, expected), got in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, got), name


# ---- honest FLOPs --------------------------------------------------------------------------------------
def test_prx_flops_per_batch_counts_routed_tokens():
    from composer_prx.model.pipeline import PRXModel

    torch.manual_seed(0)
    model = PRXModel(make_dit(depth=6), caption_dropout=0.0)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "text_emb": torch.randn(2, 5, 16),
             "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    model(batch)
    dense = model.flops_per_batch(batch)
    assert dense == 3 * model.denoiser.matmul_flops(2, N_IMG, 5)
    apply_tread(model, 1, -2, 0.5)
    model(batch)
    routed = model.flops_per_batch(batch)
    predicted_drop = 3 * sum(model.denoiser.blocks[i].matmul_flops(2, N_IMG, 5)
                             - model.denoiser.blocks[i].matmul_flops(2, N_IMG // 2, 5) for i in range(1, 5))
    assert dense - routed == predicted_drop > 0


def test_prx_generate_self_guidance():
    from composer_prx.model.pipeline import PRXModel

    model = PRXModel(make_dit(depth=6), caption_dropout=0.0)
    apply_tread(model, 1, -2, 0.5)  # a training route attached: sampling must not be affected by it
    text = (torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    sample = lambda guidance, scale: model.generate(text=text, size=16, steps=2, guidance=guidance,  # noqa: E731
                                                    guidance_scale=scale, seed=4)
    none = sample("none", 1.0)
    torch.testing.assert_close(sample("tread", 1.0), none)  # routed + 1 (dense - routed) = dense
    guided = sample("tread", 3.0)
    assert not torch.allclose(guided, none, atol=1e-4)
    assert torch.equal(guided, sample("tread", 3.0))  # routing seeded per call
    assert model.denoiser.routing is None


def _tokens_per_forward(dit: PixelDiT) -> tuple[list[list[int]], list]:
    """Record, per denoiser forward, the image tokens each block processed (block.tokens_seen after its call)."""
    calls: list[list[int]] = []
    hooks = [dit.register_forward_pre_hook(lambda module, args: calls.append([]))]
    for block in dit.blocks:
        hooks.append(block.register_forward_hook(lambda module, args, out: calls[-1].append(module.tokens_seen)))
    return calls, hooks


def test_self_guidance_routes_the_trained_route_with_its_own_default_scale(monkeypatch):
    from composer_prx.algorithms import tread as tread_module
    from composer_prx.model.pipeline import DEFAULT_GUIDANCE_SCALE, PRXModel

    model = PRXModel(make_dit(depth=6), caption_dropout=0.0)
    handle = apply_tread(model, 2, 3, 0.75)  # trained with blocks 2..3 routing 75% of the tokens
    handle.remove()  # training is over; the recorded route stays
    assert find_denoiser(model).tread_routes == [Route(2, 3, 0.75)]
    text = (torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool))
    plans = []
    real_plan = tread_module._plan
    monkeypatch.setattr(tread_module, "_plan", lambda *a: plans.append(1) or real_plan(*a))
    calls, hooks = _tokens_per_forward(model.denoiser)
    default = model.generate(text=text, size=16, steps=4, guidance="tread", seed=2)
    for hook in hooks:
        hook.remove()
    assert len(plans) == 1  # hooks planned once for the whole sampling loop, not per step
    assert calls == [[16] * 6, [16, 16, 4, 4, 16, 16]] * 4  # dense then routed at each step, on the trained route
    explicit = model.generate(text=text, size=16, steps=4, guidance="tread", guidance_scale=1.5,
                              tread_route=(2, 3, 0.75), seed=2)
    assert torch.equal(default, explicit) and DEFAULT_GUIDANCE_SCALE["tread"] == 1.5
    cfg_scale = model.generate(text=text, size=16, steps=4, guidance="tread", guidance_scale=4.0, seed=2)
    other_route = model.generate(text=text, size=16, steps=4, guidance="tread", tread_route=(1, -2, 0.5), seed=2)
    assert not torch.allclose(default, cfg_scale, atol=1e-4) and not torch.allclose(default, other_route, atol=1e-4)


def test_self_guidance_without_a_trained_route_asks_for_one():
    from composer_prx.model.pipeline import PRXModel

    model = PRXModel(make_dit(depth=6), caption_dropout=0.0)
    text = (torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no recorded TREAD route.*pass tread_route=\(route_start, route_end, ratio\)"):
        model.generate(text=text, size=16, steps=1, guidance="tread")
    with pytest.raises(ValueError, match="out of range for a denoiser with 6 blocks"):
        model.generate(text=text, size=16, steps=1, guidance="tread", tread_route=(1, 9, 0.5))
    routed = model.generate(text=text, size=16, steps=1, guidance="tread", tread_route=[(0, 1, 0.5), (3, 4, 0.5)])
    assert routed.shape == (1, 3, 16, 16)


def test_ranks_draw_different_selections_of_the_same_batch(monkeypatch):
    """Each rank reseeds from (seed, rank, batch, micro-batch): same batch, different tokens per rank."""
    from types import SimpleNamespace

    from composer.core import Event

    from composer_prx.algorithms import tread as tread_module

    state = SimpleNamespace(timestamp=SimpleNamespace(batch=SimpleNamespace(value=5)))
    draws = {}
    for rank in (0, 1, 0):
        monkeypatch.setattr(tread_module.dist, "get_global_rank", lambda rank=rank: rank)
        algorithm = Tread(seed=3)
        algorithm.apply(Event.BATCH_START, state, None)
        algorithm.apply(Event.BEFORE_FORWARD, state, None)
        keep = draw_keep_idx(4, 64, 0.5, algorithm._generator)
        assert torch.equal(draws.setdefault(rank, keep), keep)  # the same rank redraws the same tokens
    assert not torch.equal(draws[0], draws[1])


def test_tread_algorithm_records_its_routes_at_init():
    model = TinyFlow()
    tiny_trainer(model, max_duration="1ba", algorithms=[Tread(routes=[(0, 1, 0.25), {"route_start": -2,
                                                                                     "route_end": -1}])])
    assert find_denoiser(model).tread_routes == [Route(0, 1, 0.25), Route(2, 3, 0.5)]


# ---- FSDP2 (2 processes, gloo) ---------------------------------------------------------------------------
def _fsdp2_worker() -> None:
    """Run by torchrun: routed grads of a fully_shard-ed PixelDiT equal those of the unsharded model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    x_t, t, text = dit_inputs()
    reference = make_dit()
    apply_tread(reference, 1, -2, 0.5, generator=torch.Generator().manual_seed(3))
    reference(x_t, t, text).square().mean().backward()
    sharded = make_dit()
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    apply_tread(sharded, 1, -2, 0.5, generator=torch.Generator().manual_seed(3))
    sharded(x_t, t, text).square().mean().backward()
    assert [block.tokens_seen for block in sharded.blocks] == [16, 8, 8, 8, 8, 16]
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    expected = [p.grad for p in reference.parameters()]
    # every rank saw the same batch; gloo's reduce-scatter may sum instead of average
    norm = lambda tensors: torch.stack([g.norm() for g in tensors]).norm()  # noqa: E731
    factor = round(float(norm(grads) / norm(expected)))
    assert factor in (1, dist.get_world_size()), factor
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got / factor, want, rtol=1e-5, atol=1e-7)
    dist.destroy_process_group()


def test_fsdp2_sharded_routing_matches_unsharded(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_hooks_leave_state_dict_alone():
    dit = make_dit()
    keys = list(dit.state_dict())
    handle = apply_tread(dit, 1, -2, 0.5)
    assert list(dit.state_dict()) == keys
    fresh = make_dit(seed=1)
    fresh.load_state_dict(dit.state_dict())
    handle.remove()
    x_t, t, text = dit_inputs()
    assert torch.equal(fresh(x_t, t, text), dit(x_t, t, text))


if __name__ == "__main__":
    _fsdp2_worker()
