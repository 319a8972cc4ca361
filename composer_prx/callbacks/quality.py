"""ShapesEval: generate the held-out shapes prompts and score colour, position and shape from pixels.

    held-out scenes (never trained on) -> model.generate(caption) -> data.shapes.score(image, scene)
    -> per-object accuracy of colour / position / shape, for 1-object and 2-object prompts
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from composer.core import Callback, State, Time, TimeUnit, get_precision_context
from composer.loggers import Logger

from composer_prx.callbacks.samples import check_sampling, check_size_fits, ema_weights, image_grid, save_png, unwrap

log = logging.getLogger(__name__)


def evaluate_shapes(model, prompts: list[tuple[str, object]], size: int, steps: int, guidance: str,
                    guidance_scale: float, seed: int = 0, batch_size: int = 64) -> tuple[dict[str, float], torch.Tensor]:
    """Generate each (caption, scene) once and average data.shapes.score over objects and scenes.

    colour / position / shape: per-object recall; precision: per-image matched / detected objects (an
    image with an object it was not asked for scores below 1); all: every object right and nothing extra.
    """
    from composer_prx.data.shapes import score

    flags = {"colour": [], "position": [], "shape": [], "precision": [], "all": []}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        out = model.generate([c for c, _ in chunk], size=size, steps=steps, guidance=guidance,
                             guidance_scale=guidance_scale, seed=seed + start)
        images.append(out)
        pixels = out.permute(0, 2, 3, 1).cpu().numpy()
        for image, (_, scene) in zip(pixels, chunk):
            result = score(image, scene)
            for obj in result["objects"]:
                for key in ("colour", "position", "shape"):
                    flags[key].append(bool(obj[key]))
            flags["precision"].append(result["precision"])
            flags["all"].append(result["all"] == 1.0)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in flags.items()}, torch.cat(images)


class ShapesEval(Callback):
    """At the end of training (and every `interval`), score the held-out prompts of a shapes dataset.

    Up to `max_prompts` held-out scenes per object count, each generated `samples_per_prompt` times
    (different noise), scored from the pixels; logged as shapes_eval/{1,2}obj/{colour,position,shape,precision,all}.
    """

    def __init__(self, root: str, size: int = 32, steps: int = 25, guidance: str = "cfg",
                 guidance_scale: float = 2.0, interval: str | None = None, seed: int = 0,
                 batch_size: int = 64, grid_folder: str | None = "./runs/{run_name}/samples",
                 samples_per_prompt: int = 4, max_prompts: int = 64, ema: str | None = None):
        check_sampling(size, steps, guidance, "ShapesEval")
        self.ema = ema  # which EMA average is scored (default: the EMA's first)
        if samples_per_prompt < 1 or max_prompts < 1:
            raise ValueError(f"samples_per_prompt and max_prompts must be >= 1, got {samples_per_prompt}, {max_prompts}")
        self.samples_per_prompt, self.max_prompts = samples_per_prompt, max_prompts
        self.root = root
        self.size, self.steps = size, steps
        self.guidance, self.guidance_scale = guidance, guidance_scale
        self.interval = Time.from_timestring(interval) if interval else None
        if self.interval is not None and self.interval.unit != TimeUnit.BATCH:
            raise ValueError(f"ShapesEval.interval must be in batches (e.g. '500ba'), got {interval!r}")
        self.seed, self.batch_size = seed, batch_size
        self.grid_folder = grid_folder
        self.results: dict[str, dict[str, float]] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        check_size_fits(state.model, self.size, "ShapesEval")
        prompts = Path(self.root) / "eval_prompts.json"
        if not prompts.is_file():
            raise FileNotFoundError(f"ShapesEval.root {self.root!r} has no eval_prompts.json; point it at the "
                                    "shapes data root (data.train.root), which the shapes data builder writes")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval is not None and int(state.timestamp.batch) % self.interval.value == 0:
            self.run(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.run(state, logger, final=True)

    def run(self, state: State, logger: Logger, final: bool = False) -> dict[str, dict[str, float]]:
        from composer.utils import dist

        from composer_prx.data.shapes import load_eval_prompts

        with ema_weights(state, self.ema), get_precision_context(state.precision):
            for n_objects in (1, 2):
                prompts = load_eval_prompts(self.root, n_objects)
                stride = max(1, len(prompts) // self.max_prompts)  # an evenly spread, fixed subset
                prompts = prompts[::stride][: self.max_prompts] * self.samples_per_prompt
                scores, images = evaluate_shapes(unwrap(state.model), prompts, self.size, self.steps, self.guidance,
                                                 self.guidance_scale, self.seed, self.batch_size)
                self.results[f"{n_objects}obj"] = scores
                logger.log_metrics({f"shapes_eval/{n_objects}obj/{k}": v for k, v in scores.items()})
                if final and self.grid_folder and dist.get_global_rank() == 0:
                    folder = Path(self.grid_folder.format(run_name=state.run_name))
                    save_png(image_grid(images[:64], columns=8), folder / f"heldout_{n_objects}obj.png", upscale=2)
        log.info("%s", self.summary())
        return self.results

    def summary(self) -> str:
        lines = [f"ShapesEval held-out {k}: colour {v['colour']:.2f}  position {v['position']:.2f}  "
                 f"shape {v['shape']:.2f}  precision {v['precision']:.2f}  all-correct {v['all']:.2f}" for k, v in self.results.items()]
        return "\n".join(lines)
