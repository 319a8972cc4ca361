"""SampleGrid: image grids at fixed prompts and seeds, written as PNG into the run folder.

Generation runs on every rank (a sharded model needs all of them); rank 0 writes the file. When
an EMA algorithm is present, samples use its weights (`ema` names one of several averages). guidance="tread" (self-guidance)
routes the training `Tread` route unless `tread_route` gives another.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
from composer.core import Callback, Event, State, Time, TimeUnit, get_precision_context
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ema_weights(state: State, name: str | None = None):
    """Swap an EMA's weights into the model for the duration: our EMA's average `name` (default: its first),
    else Composer's EMA; a no-op without EMA."""
    from composer.algorithms import EMA as ComposerEMA

    from composer_prx.algorithms.ema import find_ema

    ours = find_ema(state)
    if ours is not None:
        with ours.swapped_in(name):
            yield
        return
    ema = next((a for a in state.algorithms if isinstance(a, ComposerEMA)), None)
    if ema is None or ema.ema_model is None or not ema.ema_started:
        yield
        return
    was_active = ema.ema_weights_active
    ema._ensure_ema_weights_active(state)  # the same swap Composer does at EVAL_START
    try:
        yield
    finally:
        if not was_active:
            ema._ensure_training_weights_active(state)


def check_sampling(size: int, steps: int, guidance: str, owner: str) -> None:
    """Fail at construction, not hours later at the first sample, on bad sampling settings."""
    from composer_prx.model.pipeline import GUIDANCE_MODES

    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"{owner}.guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
    if steps < 1 or size < 1:
        raise ValueError(f"{owner}.steps and .size must be >= 1, got steps={steps}, size={size}")


def check_size_fits(model: torch.nn.Module, size: int, owner: str) -> None:
    patch = getattr(unwrap(model), "patch_size", 1)
    if size % patch:
        raise ValueError(f"{owner}.size {size} is not a multiple of the model's patch size {patch}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def image_grid(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [rows*H, cols*W, 3] with a 2-px white gutter."""
    b, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    gap = 2
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = image
    return grid


def save_png(pixels: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    image.save(path)
    return path


class SampleGrid(Callback):
    """Every `interval` and at the end of training, sample `prompts` (each with `seeds`) into a PNG grid.

    guidance_scale defaults per guidance (cfg 4.0, tread 1.5); tread_route (a [start, end, ratio]
    triple or a list of routes) defaults to the route the model trains with.
    """

    def __init__(
        self,
        prompts: list[str],
        folder: str = "./runs/{run_name}/samples",
        interval: str | None = "500ba",
        size: int = 256,
        steps: int = 25,
        guidance: str = "cfg",
        guidance_scale: float | None = None,
        seeds: list[int] | None = None,
        upscale: int = 1,
        tread_route: list | None = None,
        ema: str | None = None,
    ):
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt")
        check_sampling(size, steps, guidance, "SampleGrid")
        if tread_route is not None:
            from composer_prx.algorithms.tread import parse_routes

            if guidance != "tread":
                raise ValueError(f"SampleGrid.tread_route is only used with guidance='tread', got guidance={guidance!r}")
            parse_routes(tread_route)  # a malformed route fails here, not at the first sample
        self.tread_route = tread_route
        self.ema = ema  # which EMA average samples (default: the EMA's first); the trained weights without EMA
        self.prompts = list(prompts)
        self.folder = folder
        self.interval = Time.from_timestring(interval) if interval else None
        if self.interval is not None and self.interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH):
            raise ValueError(f"SampleGrid.interval must be in batches or epochs ('500ba', '1ep'), got {interval!r}")
        self.size, self.steps = size, steps
        self.guidance, self.guidance_scale = guidance, guidance_scale
        self.seeds = list(seeds or [0])
        self.upscale = upscale
        self.written: list[Path] = []

    def _due(self, state: State, event: Event) -> bool:
        if self.interval is None:
            return False
        unit = self.interval.unit
        if (unit == TimeUnit.BATCH) != (event == Event.BATCH_END):
            return False
        return state.timestamp.get(unit).value % self.interval.value == 0

    def fit_start(self, state: State, logger: Logger) -> None:
        check_size_fits(state.model, self.size, "SampleGrid")
        if self.guidance == "tread":
            try:
                unwrap(state.model).guidance_routes(self.tread_route)  # trained route recorded, indices in range
            except ValueError as err:
                raise ValueError(f"SampleGrid: {err} (SampleGrid.tread_route)") from err

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.BATCH_END):
            self.write(state, logger, f"ba{int(state.timestamp.batch):07d}")

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.EPOCH_END):
            self.write(state, logger, f"ep{int(state.timestamp.epoch):04d}")

    def fit_end(self, state: State, logger: Logger) -> None:
        self.write(state, logger, "final")

    def write(self, state: State, logger: Logger, tag: str) -> Path | None:
        model = unwrap(state.model)
        images = []
        with ema_weights(state, self.ema), get_precision_context(state.precision):  # bf16 autocast when training uses it
            for seed in self.seeds:
                images.append(model.generate(self.prompts, size=self.size, steps=self.steps, guidance=self.guidance,
                                             guidance_scale=self.guidance_scale, seed=seed,
                                             tread_route=self.tread_route))
        grid = image_grid(torch.cat(images), columns=len(self.prompts))
        if dist.get_global_rank() != 0:
            return None
        path = save_png(grid, Path(self.folder.format(run_name=state.run_name)) / f"{tag}.png", self.upscale)
        self.written.append(path)
        log.info("wrote sample grid %s", path)
        return path
