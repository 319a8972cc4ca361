"""python -m composer_prx.export CKPT --diffusers OUT [--text-encoder PATH] [--ema/--no-ema] -> a diffusers folder.

Writes a diffusers `PRXTransformer2DModel` folder (save_pretrained) from a Composer checkpoint of
ours, EMA weights by default when the run had EMA; with --text-encoder a full `PRXPixelPipeline`
folder (transformer, FlowMatchEulerDiscreteScheduler with the run's shift, text encoder, tokenizer).
`PixelDiT.from_diffusers(path)` is the way back. PixelDiT is PRX's denoiser weight for weight:

    ours (PixelDiT)                      diffusers (PRXTransformer2DModel)
    patch_in, patch_proj                 img_in.0, img_in.1        (img_in when bottleneck_dim is None)
    time_mlp.0, time_mlp.2               time_in.in_layer, time_in.out_layer
    resolution_mlp.0, .2                 resolution_embedder.mlp.in_layer, .out_layer
    text_proj                            txt_in
    blocks.i.qkv, text_kv, proj          blocks.i.attention.img_qkv_proj, txt_kv_proj, to_out.0
    blocks.i.q_norm, k_norm, text_k_norm blocks.i.attention.norm_q, norm_k, norm_added_k
    blocks.i.gate_proj, up_proj, down_proj  blocks.i.gate_proj, up_proj, down_proj
    blocks.i.modulation                  blocks.i.modulation.lin
    final_modulation, final_proj         final_layer.adaLN_modulation.1, final_layer.linear

Conventions shared with the pipeline: t in [0, 1] with t = 1 noise (diffusers' timestep = 1000 t, the
transformer gets t), the transformer predicts x, the pipeline turns it into v = (x_t - x)/max(t, 0.05).
Differences to know: the pipeline's unconditional branch encodes the prompt "" while our caption
dropout masks every text token (the same when the tokenizer adds no special tokens to ""), and its
Euler step at t < 0.05 uses the clamped velocity where our sampler uses (x_t - x)/t.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from composer_prx.model.dit import DiTConfig, PixelDiT

log = logging.getLogger(__name__)

_TOP = {
    "patch_in": "img_in.0",
    "patch_proj": "img_in.1",
    "time_mlp.0": "time_in.in_layer",
    "time_mlp.2": "time_in.out_layer",
    "resolution_mlp.0": "resolution_embedder.mlp.in_layer",
    "resolution_mlp.2": "resolution_embedder.mlp.out_layer",
    "text_proj": "txt_in",
    "final_modulation": "final_layer.adaLN_modulation.1",
    "final_proj": "final_layer.linear",
}
_BLOCK = {
    "qkv": "attention.img_qkv_proj",
    "text_kv": "attention.txt_kv_proj",
    "proj": "attention.to_out.0",
    "q_norm": "attention.norm_q",
    "k_norm": "attention.norm_k",
    "text_k_norm": "attention.norm_added_k",
    "gate_proj": "gate_proj",
    "up_proj": "up_proj",
    "down_proj": "down_proj",
    "modulation": "modulation.lin",
}
_TIME_FACTOR, _TIME_MAX_PERIOD = 1000.0, 10000  # our timestep_embedding(t): sin/cos of 1000 t, period 10^4


def require_diffusers():
    """The diffusers module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "exporting to / importing from diffusers needs the optional diffusers extra: "
            "pip install composer_prx[diffusers]  (or: pip install 'diffusers==0.39.0' ftfy)"
        ) from err
    return diffusers


# ---- configs ---------------------------------------------------------------------------------------
def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """DiTConfig -> PRXTransformer2DModel keyword arguments."""
    if cfg.text_norm:
        raise ValueError("DiTConfig.text_norm=True (a learned RMSNorm before the text projection) has no "
                         "counterpart in diffusers' PRXTransformer2DModel; only text_norm=False models export")
    if cfg.rope_grid is not None:
        raise ValueError(f"DiTConfig.rope_grid={cfg.rope_grid} (RoPE positions rescaled to a fixed grid) has no "
                         "counterpart in diffusers' PRXTransformer2DModel, which uses patch indices; only "
                         "rope_grid=None models export")
    half = cfg.head_dim // 2
    theta = cfg.rope_theta
    return dict(in_channels=cfg.in_channels, patch_size=cfg.patch_size, context_in_dim=cfg.text_dim,
                hidden_size=cfg.hidden_dim, mlp_ratio=cfg.mlp_ratio, num_heads=cfg.num_heads, depth=cfg.depth,
                axes_dim=[half, half], theta=int(theta) if float(theta).is_integer() else theta,
                time_factor=_TIME_FACTOR, time_max_period=_TIME_MAX_PERIOD, bottleneck_size=cfg.bottleneck_dim,
                resolution_embeds=cfg.resolution_embeds)


def dit_config(config: Mapping[str, Any]) -> DiTConfig:
    """PRXTransformer2DModel config -> DiTConfig; settings PixelDiT does not have are a clear error."""
    hidden, heads = config["hidden_size"], config["num_heads"]
    head_dim = hidden // heads
    axes = list(config.get("axes_dim") or [32, 32])
    if axes != [head_dim // 2, head_dim // 2]:
        raise ValueError(f"PixelDiT splits each head's RoPE dims equally between rows and columns "
                         f"(axes_dim [{head_dim // 2}, {head_dim // 2}]); this model has axes_dim {axes}")
    if float(config.get("time_factor", _TIME_FACTOR)) != _TIME_FACTOR or \
            float(config.get("time_max_period", _TIME_MAX_PERIOD)) != _TIME_MAX_PERIOD:
        raise ValueError(f"PixelDiT embeds timesteps with time_factor {_TIME_FACTOR} and time_max_period "
                         f"{_TIME_MAX_PERIOD}; this model has {config.get('time_factor')} and "
                         f"{config.get('time_max_period')}")
    return DiTConfig(patch_size=config["patch_size"], hidden_dim=hidden, depth=config["depth"], num_heads=heads,
                     mlp_ratio=float(config["mlp_ratio"]), bottleneck_dim=config.get("bottleneck_size"),
                     text_dim=config["context_in_dim"], in_channels=config["in_channels"],
                     rope_theta=float(config.get("theta", 10000)),
                     resolution_embeds=bool(config.get("resolution_embeds", False)), text_norm=False)


# ---- weights ---------------------------------------------------------------------------------------
def _module_names(cfg: DiTConfig) -> dict[str, str]:
    """Our module path -> diffusers module path for this geometry."""
    names = dict(_TOP)
    if cfg.bottleneck_dim is None:
        del names["patch_in"]
        names["patch_proj"] = "img_in"
    for i in range(cfg.depth):
        names.update({f"blocks.{i}.{ours}": f"blocks.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


def _rename(state: Mapping[str, Tensor], names: Mapping[str, str], what: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module not in names:
            raise KeyError(f"{what}: parameter {key!r} has no counterpart (known modules: {sorted(names)[:8]} ...)")
        out[f"{names[module]}.{leaf}"] = value
    return out


def to_diffusers_state_dict(dit: PixelDiT) -> dict[str, Tensor]:
    """PixelDiT weights under PRXTransformer2DModel's parameter names."""
    diffusers_config(dit.cfg)  # raises for settings diffusers cannot express
    return _rename(dit.state_dict(), _module_names(dit.cfg), "PixelDiT -> diffusers")


def from_diffusers_state_dict(state: Mapping[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """PRXTransformer2DModel weights under PixelDiT's parameter names."""
    inverse = {theirs: ours for ours, theirs in _module_names(cfg).items()}
    return _rename(state, inverse, "diffusers -> PixelDiT")


def to_diffusers(dit: PixelDiT):
    """A PRXTransformer2DModel holding the PixelDiT's weights (strict: every tensor on both sides)."""
    transformer = require_diffusers().PRXTransformer2DModel(**diffusers_config(dit.cfg))
    transformer.load_state_dict(to_diffusers_state_dict(dit), strict=True)
    return transformer.eval()


def pixeldit_from_diffusers(path_or_model: str | Path | nn.Module) -> PixelDiT:
    """PixelDiT from a PRXTransformer2DModel folder (save_pretrained) or instance, strictly, in fp32."""
    diffusers = require_diffusers()
    if isinstance(path_or_model, nn.Module):
        transformer = path_or_model
    else:
        path = Path(path_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers PRXTransformer2DModel folder (no config.json); "
                                    "pass the folder written by save_pretrained (a pipeline's transformer/ folder)")
        transformer, info = diffusers.PRXTransformer2DModel.from_pretrained(str(path), output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise RuntimeError(f"{path} does not load cleanly into PRXTransformer2DModel: {bad}")
    cfg = dit_config(transformer.config)
    dit = PixelDiT(cfg)
    dit.load_state_dict(from_diffusers_state_dict(transformer.state_dict(), cfg), strict=True)
    return dit


# ---- pipeline --------------------------------------------------------------------------------------
def build_pipeline(dit: PixelDiT, text_encoder, *, shift: float = 1.0, resolution: int | None = None):
    """A PRXPixelPipeline around the exported transformer and a frozen TextEncoder (model + tokenizer).

    noise_scale 1 (we train on x_t = (1 - t) x + t eps with unit noise), scheduler shift = the run's
    sampling shift, prompt_max_tokens = the encoder's max_length, default_sample_size = resolution.
    """
    diffusers = require_diffusers()
    tokens = text_encoder.tokenizer([""], padding="max_length", max_length=text_encoder.max_length,
                                    return_tensors="pt")
    if int(tokens["attention_mask"].sum()):
        log.warning("the tokenizer turns the empty prompt into %d tokens: the pipeline's unconditional branch "
                    "(negative_prompt='') is not our null prompt (every text token masked); for the trained "
                    "unconditional prediction pass negative_prompt_embeds with negative_prompt_attention_mask all "
                    "False", int(tokens["attention_mask"].sum()))
    if resolution != 1024:
        log.info("the pipeline's resolution binning exists only for 1024 px; call it with "
                 "use_resolution_binning=False")
    return diffusers.PRXPixelPipeline(
        transformer=to_diffusers(dit), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer, default_sample_size=resolution,
        prompt_max_tokens=text_encoder.max_length, noise_scale=1.0)


# ---- checkpoints -----------------------------------------------------------------------------------
def _ema_state(checkpoint_state: Mapping) -> dict | None:
    """Composer's EMA algorithm state from a loaded checkpoint (None without EMA or before it started)."""
    algorithms = checkpoint_state.get("state", {}).get("algorithms") or []
    for name, state in algorithms:
        if name == "EMA" and state.get("ema_started") and state.get("ema_model") is not None:
            return state
    return None


def load_checkpoint_model(checkpoint: str | Path, config: str | Path | None = None,
                          ema: bool | str | None = None):
    """PRXModel with a checkpoint's EMA weights (ema None: when present; True: required; a name: that
    average of several) or its trained weights (False).

    composer_prx's EMA keeps the trained weights in the model state and its averages by name in its
    own entry. Composer's EMA (old checkpoints) swaps its average into the model at a checkpoint, so
    the model state holds the EMA weights and its storage the trained ones when `ema_weights_active`.
    """
    from composer_prx.algorithms.ema import checkpoint_averages
    from composer_prx.generate import inference_weights, load_model

    model = load_model(checkpoint, config)  # the model state as saved
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=False)
    averages = checkpoint_averages(loaded)
    if averages is not None:
        if ema is False:
            return model
        name = ema if isinstance(ema, str) else next(iter(averages))
        if name not in averages:
            raise ValueError(f"{checkpoint} has no EMA named {name!r}; its EMAs: {sorted(averages)}")
        missing, unexpected = model.load_state_dict(inference_weights(averages[name]), strict=False)
        if unexpected:
            raise RuntimeError(f"EMA {name!r} of {checkpoint} does not match the model: unexpected {unexpected[:5]}")
        log.info("using EMA %r of %s", name, checkpoint)
        return model
    if isinstance(ema, str):
        raise ValueError(f"{checkpoint} holds no composer_prx EMA named {ema!r} (the run had no algorithms.ema, or "
                         "used Composer's EMA: pass --ema without a name)")
    state = _ema_state(loaded)
    if state is None:
        if ema:
            raise ValueError(f"{checkpoint} holds no EMA weights (the run had no algorithms.ema, or EMA had not "
                             "started); export the trained weights with --no-ema")
        log.info("%s has no EMA weights; exporting the trained weights", checkpoint)
        return model
    want_ema = ema is None or ema
    if bool(state["ema_weights_active"]) != want_ema:  # the wanted set is in the EMA's storage
        stored = state["ema_model"]
        weights = {**stored["named_parameters_dict"], **stored["named_buffers_dict"]}
        missing, unexpected = model.load_state_dict(inference_weights(weights), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"the EMA storage of {checkpoint} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    log.info("exporting the %s weights of %s", "EMA" if want_ema else "trained", checkpoint)
    return model


def export_checkpoint(checkpoint: str | Path, out: str | Path, text_encoder: str | None = None,
                      ema: bool | str | None = None, config: str | Path | None = None) -> Path:
    """Checkpoint -> diffusers folder: the transformer alone, or with text_encoder a PRXPixelPipeline."""
    from composer_prx import config as C
    from composer_prx.generate import find_config
    from composer_prx.model.text import load_text_encoder

    require_diffusers()
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_checkpoint_model(checkpoint, config, ema)
    if text_encoder is None:
        to_diffusers(model.denoiser).save_pretrained(str(out))
        return out
    cfg = C.load_config(config or find_config(checkpoint))
    max_length = cfg.model.text_encoder.max_length if cfg.model.text_encoder is not None else 256
    encoder = load_text_encoder(text_encoder, max_length)
    if encoder.hidden_size != model.denoiser.cfg.text_dim:
        raise ValueError(f"text encoder {text_encoder!r} has hidden size {encoder.hidden_size} but the model was "
                         f"trained on text_dim {model.denoiser.cfg.text_dim}; pass the run's text encoder")
    shift = model.time_sampling.shift
    build_pipeline(model.denoiser, encoder, shift=shift, resolution=cfg.data.resolution).save_pretrained(str(out))
    return out


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """--ema [NAME] / --no-ema: which weights of a checkpoint (default: its first EMA when it has one)."""
    parser.add_argument("--ema", nargs="?", const=True, default=None, metavar="NAME",
                        help="EMA weights (default when the checkpoint has them); NAME picks one of several "
                             "smoothings (e.g. ema_0.9999)")
    parser.add_argument("--no-ema", dest="ema", action="store_const", const=False, help="the trained weights")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Composer checkpoint file of a composer_prx run")
    parser.add_argument("--diffusers", required=True, metavar="OUT", help="folder to write")
    parser.add_argument("--text-encoder", default=None, metavar="PATH",
                        help="hub id or folder of the run's text encoder: write a full PRXPixelPipeline")
    add_ema_arguments(parser)
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found beside the checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_checkpoint(args.checkpoint, args.diffusers, args.text_encoder, args.ema, args.config)
    log.info("wrote %s to %s", "PRXPixelPipeline" if args.text_encoder else "PRXTransformer2DModel", out)
    return out


if __name__ == "__main__":
    main()
