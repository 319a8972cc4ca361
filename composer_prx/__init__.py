"""composer_prx: the PRX 24-hour text-to-image recipe as MosaicML Composer algorithms and callbacks.

Public names are imported lazily so that `import composer_prx` stays light (optional extras such as
lpips or streaming load only when the piece that needs them is used).
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "PixelDiT": "composer_prx.model.dit",
    "DiTConfig": "composer_prx.model.dit",
    "PRXModel": "composer_prx.model.pipeline",
    "FlowOutput": "composer_prx.model.pipeline",
    "TextEncoder": "composer_prx.model.text",
    "Tread": "composer_prx.algorithms.tread",
    "apply_tread": "composer_prx.algorithms.tread",
    "tread_routing": "composer_prx.algorithms.tread",
    "Repa": "composer_prx.algorithms.repa",
    "attach_repa_projector": "composer_prx.algorithms.repa",
    "repa_loss": "composer_prx.algorithms.repa",
    "load_vision_encoder": "composer_prx.encoders",
    "VisionEncoder": "composer_prx.encoders",
    "LpipsLoss": "composer_prx.algorithms.perceptual",
    "DinoPerceptualLoss": "composer_prx.algorithms.perceptual",
    "load_lpips": "composer_prx.algorithms.perceptual",
    "EMA": "composer_prx.algorithms.ema",
    "StagedLoader": "composer_prx.algorithms.stages",
    "Stages": "composer_prx.algorithms.stages",
    "StageSection": "composer_prx.algorithms.stages",
    "ExactResume": "composer_prx.callbacks.resume",
    "TimeBudget": "composer_prx.callbacks.budget",
    "QualityEval": "composer_prx.callbacks.quality",
    "mmd_rbf": "composer_prx.callbacks.quality",
    "fid_from_features": "composer_prx.callbacks.quality",
    "Muon": "composer_prx.optim.muon",
    "muon_param_groups": "composer_prx.optim.muon",
    "export_checkpoint": "composer_prx.export",
    "make_plan": "composer_prx.plan",
    "MetricsFileLogger": "composer_prx.report",
    "write_report": "composer_prx.report",
    "CaptionEmbedder": "composer_prx.data.text_embeddings",
    "text_embedding_bytes_per_step": "composer_prx.data.text_embeddings",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'composer_prx' has no attribute {name!r}")
