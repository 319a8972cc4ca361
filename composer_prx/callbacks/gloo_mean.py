"""FSDP2 on gloo (CPU): make the gradient reduce-scatter a mean, as it is on NCCL.

torch 2.7's FSDP2 reduces fp32/bf16 gradients with reduce_scatter(op=AVG); gloo has no AVG for it and
returns the SUM, so CPU multi-rank gradients are world x the single-process ones (gradient clipping, SGD
and any resumption at another world size see it). The fix divides each reduce-scatter output by the
group size through FSDP2's public post-reduce hook:

    g_r = (sum_k g_k) / world        on every FSDP2 unit whose process group is gloo
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from composer.core import Callback, Event, State
from composer.loggers import Logger
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def fix_gloo_fsdp_mean(model: nn.Module) -> int:
    """Install the divide-by-world hook on every gloo FSDP2 unit of `model`; returns how many were fixed."""
    fixed = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        param = next((p for p in module.parameters() if isinstance(p, DTensor)), None)
        if param is None:
            continue
        mesh = param.device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError(
                "GlooGradientMean handles 1-D FSDP2 meshes only; HSDP on gloo would still sum gradients"
            )
        group = mesh.get_group(0)
        if dist.get_backend(group) != "gloo":
            continue
        world = dist.get_world_size(group)
        module.set_all_reduce_hook(lambda reduced, world=world: reduced.div_(world))
        fixed += 1
    if fixed:
        log.info("FSDP2 on gloo: %d unit(s) now average gradients (reduce-scatter sum / world)", fixed)
    return fixed


class GlooGradientMean(Callback):
    """Composer callback: at FIT_START, after Composer has sharded the model, apply fix_gloo_fsdp_mean.

    A no-op on NCCL and without FSDP2. `python -m composer_prx.train` always adds it.
    """

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            fix_gloo_fsdp_mean(state.model)
