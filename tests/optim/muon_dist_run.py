"""Muon training runs shared by the tests: single process (imported) and `composer -n N muon_dist_run.py OUT`.

Model: a few Linear layers with odd row counts (10, 33, 7, 2) so 2 or 3 ranks do not divide them, two
same-shape block matrices (batched Newton-Schulz), an input and a final projection (Adam). Data: a fixed
tensor dataset, unshuffled, global batch 12 (one batch = samples [12k, 12k + 12) whatever the world size).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerModel
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_prx.optim import Muon, build_muon

GLOBAL_BATCH = 12
STEPS = 4
SETTINGS = dict(lr=0.02, adam_lr=0.01, weight_decay=0.1)


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


def train(
    *,
    fsdp: bool = False,
    save_folder: str | None = None,
    load_path: str | None = None,
    steps: int = STEPS,
    orthogonalize_on: str = "owner",
    load_weights_only: bool = False,
    callbacks: list | None = None,
    loggers: list | None = None,
) -> tuple[dict[str, torch.Tensor], Trainer]:
    """Train ToyModel for `steps` batches of global size GLOBAL_BATCH; returns the whole parameters and the trainer."""
    world = dist.get_world_size()
    model = ToyModel()
    ds = dataset()
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=dist.get_sampler(ds, shuffle=False))
    optimizer = build_muon(model, orthogonalize_on=orthogonalize_on, **SETTINGS)
    parallelism = None
    if fsdp:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(state_dict_type="sharded")}
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        max_duration=f"{steps}ba",
        device="cpu",
        parallelism_config=parallelism,
        save_folder=save_folder,
        save_interval="2ba" if save_folder else "1ep",
        save_overwrite=True,
        load_path=load_path,
        load_weights_only=load_weights_only,
        callbacks=callbacks,
        loggers=loggers,
        progress_bar=False,
        log_to_console=False,
        seed=17,
    )
    trainer.fit()
    assert isinstance(trainer.state.optimizers[0], Muon)
    return full_params(trainer.state.model), trainer


def direct_step_check(steps: int = 3) -> dict[str, float]:
    """Same gradients into row-sharded DTensor parameters and into replicated plain ones: max |difference|."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plain = ToyModel()
    sharded = ToyModel()
    for module in sharded.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    optimizers = {
        "plain": build_muon(plain, **SETTINGS),
        "sharded": build_muon(sharded, **SETTINGS),
        "everywhere": None,
    }
    gathered = ToyModel()
    for module in gathered.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    optimizers["everywhere"] = build_muon(gathered, orthogonalize_on="everywhere", **SETTINGS)
    models = {"plain": plain, "sharded": sharded, "everywhere": gathered}
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in plain.named_parameters()}
        for key, model in models.items():
            for n, p in model.named_parameters():
                p.grad = grads[n].clone() if key == "plain" else distribute_tensor(grads[n], mesh, [Shard(0)])
            optimizers[key].step()
    ref = full_params(plain)
    return {
        key: max((full_params(models[key])[n] - ref[n]).abs().max().item() for n in ref)
        for key in ("sharded", "everywhere")
    }


def main(out: str) -> None:
    out_dir = Path(out)
    dist.initialize_dist("cpu")
    rank = dist.get_global_rank()

    def save(name: str, params: dict) -> None:
        if rank == 0:
            torch.save(params, out_dir / f"{name}.pt")

    save("direct", direct_step_check())
    ckpt = str(out_dir / "ckpt")
    params, trainer = train(fsdp=True, save_folder=ckpt)
    muon = trainer.state.optimizers[0]
    p = next(p for p in trainer.state.model.parameters())
    assert type(p).__name__ == "DTensor", f"FSDP2 did not shard the model: {type(p)}"
    save("fsdp", params)
    save("fsdp_rms", muon.update_rms())
    save("fsdp_ns_flops", {"flops": muon.ns_flops, "rank": rank})
    flops = torch.tensor([muon.ns_flops], dtype=torch.float64)
    gathered = [torch.zeros_like(flops) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(gathered, flops)
    save("fsdp_flops_per_rank", {"per_rank": [float(t) for t in gathered]})
    trainer.close()
    resumed, trainer = train(fsdp=True, load_path=os.path.join(ckpt, "ep0-ba2"))
    save("fsdp_resumed", resumed)
    trainer.close()
    if dist.get_world_size() == 2:
        params, trainer = train(fsdp=False)  # DDP: plain replicated parameters
        save("ddp", params)
        trainer.close()


def newton_schulz_flops_of_model() -> dict[str, int]:
    """Newton-Schulz FLOPs of each Muon matrix of ToyModel."""
    from composer_prx.optim import newton_schulz_flops
    from composer_prx.optim.muon import _ns_method

    model = ToyModel()
    muon_group = build_muon(model).param_groups[0]
    ids = {id(p) for p in muon_group["params"]}
    return {
        n: newton_schulz_flops(*p.shape, 5, _ns_method(*p.shape, 5, torch.float32))
        for n, p in model.named_parameters()
        if id(p) in ids
    }


if __name__ == "__main__":
    main(sys.argv[1])
