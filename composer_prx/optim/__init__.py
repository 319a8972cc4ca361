"""Optimizers: Muon (2D matrices of the transformer blocks) + Adam (the rest), FSDP2-aware.

newton_schulz.py holds the maths, exchange.py how matrices move between ranks, groups.py which parameters
go where, muon.py the optimizer and its config builders.
"""

from composer_prx.optim.groups import muon_param_groups
from composer_prx.optim.muon import AdamWSettings, Muon, MuonSettings, UpdateRMSMonitor, build_adamw, build_muon
from composer_prx.optim.newton_schulz import newton_schulz, newton_schulz_flops, update_scale

__all__ = [
    "AdamWSettings",
    "Muon",
    "MuonSettings",
    "UpdateRMSMonitor",
    "build_adamw",
    "build_muon",
    "muon_param_groups",
    "newton_schulz",
    "newton_schulz_flops",
    "update_scale",
]
