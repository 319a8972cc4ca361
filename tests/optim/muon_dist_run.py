"""Muon training runs shared by the tests: single process (imported) and `composer -n N muon_dist_run.py OUT`.

Model: a few Linear layers with odd row counts (10, 33, 7, 2) so 2 or 3 ranks do not divide them, two
same-shape block matrices (batched Newton-Schulz), an input and a final projection (Adam). Data: a fixed
tensor dataset, unshuffled, global batch 12 (one batch = samples [12k, 12k + 12) whatever the world size).
"""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, Event
from composer.models import ComposerModel
from composer.optim import CosineAnnealingWithWarmupScheduler
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_prx.callbacks.gloo_mean import GlooGradientMean
from composer_prx.optim import Muon, build_muon, newton_schulz_flops
from composer_prx.optim.newton_schulz import ns_method

GLOBAL_BATCH = 12
STEPS = 4
SETTINGS = dict(lr=0.02, adam_lr=0.01, weight_decay=0.1)
# Two Muon groups that differ in every setting the exchange and the update rule read.
MIXED = [
    dict(pattern="blocks.[0-2].*", lr=0.02, ns_dtype="float32", nesterov=True),
    dict(pattern="blocks.[3-6].*", lr=0.01, ns_dtype="bfloat16", nesterov=False, momentum=0.9, ns_chunks=2),
]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 10)
        self.blocks = nn.ModuleList(
            [
                nn.Linear(10, 33),
                nn.Linear(33, 7, bias=False),
                nn.Linear(7, 10),
                nn.Linear(10, 10),
                nn.Linear(10, 10),
                nn.Linear(10, 2),
                nn.Linear(2, 10),
            ]  # [2, 10] weight: 3 ranks hold 1, 1 and 0 rows
        )
        self.norm = nn.LayerNorm(10)
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(self.norm(x))


class ToyModel(ComposerModel):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Toy()

    def forward(self, batch):
        return self.net(batch[0])

    def loss(self, outputs, batch):
        return F.mse_loss(outputs, batch[1])


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH * STEPS, 12, generator=gen)
    return TensorDataset(x, torch.randn(GLOBAL_BATCH * STEPS, 3, generator=gen))


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters (DTensors gathered; collective under FSDP2)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = full.detach().clone()
    return out


def mixed_muon(model: nn.Module) -> Muon:
    """Muon with the two MIXED groups (block matrices) and an Adam group (the rest)."""
    groups, taken = [], set()
    for spec in MIXED:
        spec = dict(spec)
        pattern = spec.pop("pattern")
        params = [p for n, p in model.named_parameters()
                  if p.ndim == 2 and fnmatch.fnmatchcase(n.split("net.", 1)[-1], pattern) and id(p) not in taken]
        taken |= {id(p) for p in params}
        groups.append({"params": params, "use_muon": True, "name": pattern, **spec})
    rest = [p for p in model.parameters() if id(p) not in taken]
    groups.append({"params": rest, "use_muon": False, "name": "adam", "lr": 0.01})
    return Muon(groups, weight_decay=0.1)


def make_optimizer(model: nn.Module, kind: str):
    if kind == "muon":
        return build_muon(model, **SETTINGS)
    if kind == "mixed":
        return mixed_muon(model)
    if kind == "sgd":  # linear in the gradient: a world x gradient shows as a world x step
        return torch.optim.SGD(model.parameters(), lr=0.1)
    raise ValueError(kind)


class DropOptimizerState(Callback):
    """Control for the resume tests: forget the optimizer state (momentum, Adam moments) after loading."""

    def run_event(self, event, state, logger) -> None:
        if event == Event.FIT_START:
            for optimizer in state.optimizers:
                optimizer.state.clear()


def train(
    *,
    fsdp: bool = False,
    optimizer: str = "muon",
    scheduler: bool = False,
    save_folder: str | None = None,
    load_path: str | None = None,
    steps: int = STEPS,
    callbacks: list | None = None,
    loggers: list | None = None,
) -> tuple[dict[str, torch.Tensor], Trainer]:
    """Train ToyModel for `steps` batches of global size GLOBAL_BATCH; returns the whole parameters and the trainer."""
    world = dist.get_world_size()
    model = ToyModel()
    ds = dataset()
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=dist.get_sampler(ds, shuffle=False))
    parallelism = None
    if fsdp:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(state_dict_type="sharded")}
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=make_optimizer(model, optimizer),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup="1ba") if scheduler else None,
        max_duration=f"{steps}ba",
        device="cpu",
        parallelism_config=parallelism,
        save_folder=save_folder,
        save_interval="2ba" if save_folder else "1ep",
        save_overwrite=True,
        load_path=load_path,
        callbacks=[GlooGradientMean(), *(callbacks or [])],
        loggers=loggers,
        progress_bar=False,
        log_to_console=False,
        seed=17,
    )
    trainer.fit()
    return full_params(trainer.state.model), trainer


def _sharded_copy(mesh) -> ToyModel:
    from torch.distributed.tensor import Shard, distribute_tensor

    model = ToyModel()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    return model


def direct_step_check(kind: str, steps: int = 3) -> float:
    """Same gradients into row-sharded DTensor parameters and into plain replicated ones: max |difference|."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plain, sharded = ToyModel(), _sharded_copy(mesh)
    opt_plain, opt_sharded = make_optimizer(plain, kind), make_optimizer(sharded, kind)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in plain.named_parameters()}
        for n, p in plain.named_parameters():
            p.grad = grads[n].clone()
        for n, p in sharded.named_parameters():
            p.grad = distribute_tensor(grads[n], mesh, [Shard(0)])
        opt_plain.step()  # plain tensors on N ranks: the replicated (DDP) exchange
        opt_sharded.step()
    ref = full_params(plain)
    return max((full_params(sharded)[n] - ref[n]).abs().max().item() for n in ref)


def inconsistent_step() -> str:
    """Rank 1 lacks the gradient of one Muon matrix: every rank must fail with the same message (no hang)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _sharded_copy(mesh)
    optimizer = build_muon(model)
    for n, p in model.named_parameters():
        p.grad = distribute_tensor(torch.ones(p.shape), mesh, [Shard(0)])
    if dist.get_global_rank() == 1:
        model.net.blocks[3].weight.grad = None
    try:
        optimizer.step()
    except ValueError as err:
        return str(err)
    return "no error"


def main(out: str) -> None:
    out_dir = Path(out)
    dist.initialize_dist("cpu")
    rank = dist.get_global_rank()

    def save(name: str, value) -> None:
        if rank == 0:
            torch.save(value, out_dir / f"{name}.pt")

    save("direct", {kind: direct_step_check(kind) for kind in ("muon", "mixed")})
    messages = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(messages, inconsistent_step())
    save("inconsistent", messages)
    ckpt = str(out_dir / "ckpt")
    params, trainer = train(fsdp=True, save_folder=ckpt)
    muon = trainer.state.optimizers[0]
    p = next(p for p in trainer.state.model.parameters())
    assert type(p).__name__ == "DTensor", f"FSDP2 did not shard the model: {type(p)}"
    save("fsdp", params)
    save("fsdp_rms", muon.update_rms())
    flops = torch.tensor([muon.ns_flops], dtype=torch.float64)
    gathered = [torch.zeros_like(flops) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(gathered, flops)
    save("fsdp_flops_per_rank", {"per_rank": [float(t) for t in gathered]})
    trainer.close()
    for name, kwargs in {
        "fsdp_resumed": dict(load_path=os.path.join(ckpt, "ep0-ba2")),
        "fsdp_resumed_without_state": dict(load_path=os.path.join(ckpt, "ep0-ba2"), callbacks=[DropOptimizerState()]),
        "fsdp_sgd": dict(optimizer="sgd"),
        "fsdp_mixed": dict(optimizer="mixed"),
        "fsdp_scheduler": dict(scheduler=True),
    }.items():
        params, trainer = train(fsdp=True, **kwargs)
        save(name, params)
        if name.startswith("fsdp_resumed"):
            save(name + "_batches", int(trainer.state.timestamp.batch))
        trainer.close()
    if dist.get_world_size() == 2:
        params, trainer = train(fsdp=False)  # DDP: plain replicated parameters
        save("ddp", params)
        trainer.close()


def newton_schulz_flops_of_model() -> dict[str, int]:
    """Newton-Schulz FLOPs of each Muon matrix of ToyModel."""
    model = ToyModel()
    muon_group = build_muon(model).param_groups[0]
    ids = {id(p) for p in muon_group["params"]}
    return {
        n: newton_schulz_flops(*p.shape, 5, ns_method(*p.shape, 5, torch.float32))
        for n, p in model.named_parameters()
        if id(p) in ids
    }


if __name__ == "__main__":
    main(sys.argv[1])
