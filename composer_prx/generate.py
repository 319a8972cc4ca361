"""python -m composer_prx.generate CHECKPOINT --prompt "..." [--out image.png] -> a PNG.

The model is rebuilt from the run's resolved config (config.yaml beside the checkpoints folder, or
--config), then the checkpoint's weights are loaded (EMA weights when the run used EMA: Composer's
checkpoints hold them in the model state).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from composer_prx import config as C
from composer_prx.callbacks.samples import image_grid, save_png
from composer_prx.model.pipeline import GUIDANCE_MODES, PRXModel


def find_config(checkpoint: Path) -> Path:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml next to {checkpoint} or its parent folder; pass the run's config with --config"
    )


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
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state["state"]["model"] if "state" in state else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
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
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("euler", "heun"), default="euler")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour enlargement of the PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = load_model(args.checkpoint, args.config, args.device)
    size = args.size or C.load_config(args.config or find_config(Path(args.checkpoint))).data.resolution
    images = model.generate(args.prompt, size=size, steps=args.steps, guidance=args.guidance,
                            guidance_scale=args.scale, seed=args.seed, method=args.method)
    path = save_png(image_grid(images, columns=len(args.prompt)), args.out, args.upscale)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
