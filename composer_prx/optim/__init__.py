"""Optimizers: Muon (2D matrices of the transformer blocks) + Adam (the rest), FSDP2-aware."""

from composer_prx.optim.muon import (
    AdamWSettings,
    Muon,
    MuonSettings,
    UpdateRMSMonitor,
    build_adamw,
    build_muon,
    muon_param_groups,
    newton_schulz,
    newton_schulz_flops,
)

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
]
