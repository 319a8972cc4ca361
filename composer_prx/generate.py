"""python -m composer_prx.generate CHECKPOINT --prompt "..." [--out image.png] -> a PNG.

The model is rebuilt from the run's resolved config (config.yaml beside the checkpoints folder, or
--config), then the checkpoint's weights are loaded: its EMA weights when the run used EMA (the first
average, or the one --ema NAME names), the trained ones with --no-ema. --guidance tread (self-guidance) routes the TREAD route the
run trained with, read from that config, unless --tread-route START END RATIO says otherwise.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from composer_prx import config as C
from composer_prx.callbacks.samples import image_grid, save_png
from composer_prx.model.pipeline import DEFAULT_GUIDANCE_SCALE, GUIDANCE_MODES, PRXModel


def find_config(checkpoint: Path) -> Path:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml next to {checkpoint} or its parent folder; pass the run's config with --config"
    )


def record_trained_routes(model: PRXModel, cfg: C.TrainConfig) -> None:
    """Record on the model the TREAD routes the run's config trained with (what self-guidance routes)."""
    from composer_prx.algorithms.tread import Tread, record_routes

    for name, kwargs in cfg.algorithms.items():
        algorithm = C.resolve("algorithms", name)
        if isinstance(algorithm, type) and issubclass(algorithm, Tread):
            record_routes(model, algorithm(**kwargs).routes)


TRAINING_ONLY = ("repa_projector.",)  # heads that train with the model but take no part in sampling


def inference_weights(weights: dict) -> dict:
    """A checkpoint's model weights without the training-only heads (REPA's projector)."""
    return {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY)}


def load_model(checkpoint: str | Path, config: str | Path | None = None, device: str = "cpu") -> PRXModel:
    """Rebuild PRXModel from the run config and load the checkpoint's model weights."""
    from composer_prx.train import build_model

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is a sharded (FSDP2) checkpoint folder; generate reads a single file: "
                         "train with trainer.fsdp.state_dict_type=full, or resume it for one batch on one rank")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    cfg = C.load_config(config or find_config(checkpoint))
    model = build_model(cfg)
    record_trained_routes(model, cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state["state"]["model"] if "state" in state else state
    missing, unexpected = model.load_state_dict(inference_weights(weights), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the config's model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    parser.add_argument("--out", default="generated.png")
    parser.add_argument("--config", default=None)
    parser.add_argument("--size", type=int, default=None, help="default: the run's training resolution")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", choices=GUIDANCE_MODES, default="cfg")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"guidance scale; default per guidance {DEFAULT_GUIDANCE_SCALE}")
    parser.add_argument("--tread-route", nargs=3, metavar=("START", "END", "RATIO"), default=None,
                        help="route of --guidance tread; default: the route the run trained with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("euler", "heun"), default="euler")
    parser.add_argument("--device", default="cpu")
    from composer_prx.export import add_ema_arguments

    add_ema_arguments(parser)
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour enlargement of the PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from composer_prx.export import load_checkpoint_model

    model = load_checkpoint_model(args.checkpoint, args.config, args.ema).to(args.device)
    size = args.size or C.load_config(args.config or find_config(Path(args.checkpoint))).data.resolution
    route = None
    if args.tread_route is not None:
        start, end, ratio = args.tread_route
        route = (int(start), int(end), float(ratio))
    images = model.generate(args.prompt, size=size, steps=args.steps, guidance=args.guidance,
                            guidance_scale=args.scale, seed=args.seed, method=args.method, tread_route=route)
    path = save_png(image_grid(images, columns=len(args.prompt)), args.out, args.upscale)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
