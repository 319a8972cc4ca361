"""Quality of generated images: ShapesEval (shapes data, scored from pixels) and FID / CMMD / DINO-MMD.

ShapesEval:
    held-out scenes (never trained on) -> model.generate(caption) -> data.shapes.score(image, scene)
    -> per-object recall of colour / position / shape and per-image precision, for 1- and 2-object prompts

QualityEval (FID, CMMD, DINO-MMD against a held-out set of real images and their captions):
    held-out sample i (rank i % world) --caption, seed + i--> generate --8-bit [B, 3, H, W]--> feature nets
    real image i --cover-resize + centre crop to H x W--> the same nets          (once, cached)
        all_gather rows in sample order --> fid_from_features / mmd_rbf --> quality/<metric>
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Callback, State, Time, TimeUnit, get_precision_context
from composer.loggers import Logger
from torch import Tensor, nn

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
                 f"shape {v['shape']:.2f}  precision {v['precision']:.2f}  all-correct {v['all']:.2f}"
                 for k, v in self.results.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# FID / CMMD / DINO-MMD: the pixel convention, the distances, the feature nets
# ---------------------------------------------------------------------------------------------------
QUALITY_METRICS = ("fid", "cmmd", "dino_mmd")
MMD_SIGMA, MMD_SCALE = 10.0, 1000.0  # CMMD's reference constants (Jayasumana et al. 2024)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (when the folder gives none)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] as uint8 in [0, 255]: uint8 passes through, float in [0, 1] becomes round(255 x).

    Every metric sees these 8-bit pixels (what a saved PNG holds), so a uint8 set and its float / 255
    twin score the same. Other float ranges fail: [-1, 1] model space, or uint8 values cast to float.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"quality metrics take images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"quality metrics take uint8 [0, 255] or float [0, 1] images, got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must be in [0, 1] (what generate returns), got range [{lo:.3f}, {hi:.3f}]; "
                         "map [-1, 1] with (x + 1) / 2 and pass 0-255 pixels as uint8")
    return (images.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def to_unit(images: Tensor) -> Tensor:
    """The 8-bit pixels of to_uint8(images) as float32 [B, 3, H, W] in [0, 1]."""
    return to_uint8(images).float().div_(255.0)


def _mean_rbf(a: Tensor, b: Tensor, gamma: float, chunk: int = 1024) -> Tensor:
    """mean over all (i, j) of exp(-gamma ||a_i - b_j||^2), a [N, D], b [M, D], in row chunks of a."""
    b_sq = (b * b).sum(1)[None, :]  # [1, M]
    total = a.new_zeros(())
    for start in range(0, a.shape[0], chunk):
        rows = a[start: start + chunk]  # [c, D]
        sq = ((rows * rows).sum(1)[:, None] + b_sq - 2.0 * rows @ b.T).clamp_(min=0.0)  # [c, M]
        total = total + torch.exp(-gamma * sq).sum()
    return total / (a.shape[0] * b.shape[0])


def mmd_rbf(x: Tensor, y: Tensor, sigma: float = MMD_SIGMA, scale: float = MMD_SCALE) -> Tensor:
    """Biased RBF-kernel MMD^2, times `scale` (CMMD): mean k(x, x') + mean k(y, y') - 2 mean k(x, y).

    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)), means over all pairs (diagonals included), x [N, D],
    y [M, D]; float64. 0 for identical sets.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"mmd_rbf takes non-empty features [N, D] and [M, D], got {tuple(x.shape)}, {tuple(y.shape)}")
    if sigma <= 0:
        raise ValueError(f"mmd_rbf sigma must be > 0, got {sigma}")
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * sigma * sigma)
    return scale * (_mean_rbf(x, x, gamma) + _mean_rbf(y, y, gamma) - 2.0 * _mean_rbf(x, y, gamma))


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """d^2 = ||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)); mu [D], cov [D, D], float64.

    Tr (cov1 cov2)^(1/2) = sum of sqrt(eig(S cov2 S)), S = cov1^(1/2): a symmetric PSD matrix, so the
    eigenvalues are real (clamped at 0 against round-off).
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    values, vectors = torch.linalg.eigh(cov1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # cov1^(1/2)
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2.0 * trace_root


def fid_from_features(real: Tensor, fake: Tensor) -> Tensor:
    """FID: frechet_distance of the Gaussian fits (mean, unbiased covariance) of real [N, D] and fake [M, D]."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1] or len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 feature rows [N, D] per set, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    real, fake = real.double(), fake.double()
    return frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))


DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"fid": fid_from_features, "cmmd": mmd_rbf,
                                                             "dino_mmd": mmd_rbf}


class FeatureNet:
    """A frozen image embedder: embed(images [B, 3, H, W] uint8 or float [0, 1]) -> float32 [B, D]."""

    def __init__(self, name: str, net: nn.Module, embed: Callable[[nn.Module, Tensor], Tensor]):
        net.eval().requires_grad_(False)
        self.name, self.net, self._embed = name, net, embed

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters(), torch.empty(0)).device
        return self._embed(self.net, images.to(device)).flatten(1).float()


def _inception_embed(net: nn.Module, images: Tensor) -> Tensor:
    return net(to_uint8(images))  # torchmetrics' Inception (normalize=False) wants uint8 [0, 255]


def fid_feature_net(feature: int | nn.Module = 2048, feature_extractor_weights_path: str | None = None) -> FeatureNet:
    """FID's embedder: torchmetrics' InceptionV3 (`feature`: 64/192/768/2048) or a module taking uint8 [B, 3, H, W].

    The Inception weights come from `feature_extractor_weights_path` (torch-fidelity's
    pt_inception-2015-12-05 .pth file), else torch-fidelity downloads them into the torch hub cache.
    """
    if isinstance(feature, nn.Module):
        return FeatureNet("fid", feature, _inception_embed)
    if feature_extractor_weights_path is not None and not os.path.isfile(feature_extractor_weights_path):
        raise FileNotFoundError(
            f"feature_extractor_weights_path {feature_extractor_weights_path!r} is not a file; download "
            "torch-fidelity's Inception weights (pt_inception-2015-12-05-6726825d.pth, from the torch-fidelity "
            "GitHub releases) where there is internet and point feature_extractor_weights_path at the file "
            "(README, Quality metrics)")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except ImportError as err:
        raise ImportError("FID's Inception needs torch-fidelity: pip install torch-fidelity (or torchmetrics[image]); "
                          "or pass fid_feature=<your nn.Module>") from err
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(int(feature))],
                                 feature_extractor_weights_path=feature_extractor_weights_path)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError: no download offline
        raise FileNotFoundError(
            f"FID's Inception weights could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "download pt_inception-2015-12-05-6726825d.pth where there is internet and set "
            "feature_extractor_weights_path to the file (README, Quality metrics)") from err
    return FeatureNet("fid", net, _inception_embed)


def _from_pretrained(cls: Any, name: str, what: str) -> Any:
    """cls.from_pretrained(name): the local folder or cache first, the hub only when it answers."""
    from composer_prx.encoders import TeacherNotFoundError, _hub_reachable

    try:
        return cls.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub rejects a missing path as a repo id
        if os.path.exists(name) or not _hub_reachable():
            raise TeacherNotFoundError(
                f"{what} weights {name!r} are not available here ({type(err).__name__}: {str(err).splitlines()[0]}); "
                f"download them where there is internet (`huggingface-cli download {name}` or "
                "`model.save_pretrained(DIR)`) and pass the local folder (README, Quality metrics)") from err
    return cls.from_pretrained(name)


def clip_feature_net(name_or_path: str, device: torch.device | str = "cpu") -> FeatureNet:
    """CMMD's embedder: CLIPVisionModelWithProjection's image_embeds, L2-normalised, [B, D].

    Pixels are resized (bicubic, antialiased) to the model's image_size and normalised with the
    folder's preprocessor mean/std (OpenAI CLIP's when it has none).
    """
    import json

    from transformers import CLIPVisionModelWithProjection

    model = _from_pretrained(CLIPVisionModelWithProjection, name_or_path, "CLIP vision (CMMD)").to(device)
    mean, std = CLIP_MEAN, CLIP_STD
    processor = Path(name_or_path) / "preprocessor_config.json"
    if processor.is_file():
        config = json.loads(processor.read_text())
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    side = int(model.config.image_size)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def embed(net: nn.Module, images: Tensor) -> Tensor:
        x = to_unit(images)  # [B, 3, H, W] in [0, 1]
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        return F.normalize(net(pixel_values=(x - mean_t) / std_t).image_embeds.float(), dim=-1)

    return FeatureNet("cmmd", model, embed)


def dino_feature_net(name_or_path: str, size: int = 224, device: torch.device | str = "cpu") -> FeatureNet:
    """DINO-MMD's embedder: the teacher's pooled (final-norm cls) embedding, L2-normalised, [B, D].

    Loaded with encoders.load_vision_encoder (hub id, local folder or timm:<name>); images are resized
    to (size // p) patches a side.
    """
    from composer_prx.encoders import load_vision_encoder

    encoder = load_vision_encoder(name_or_path, device=device)
    grid = (max(1, size // encoder.patch_size),) * 2

    def embed(net: nn.Module, images: Tensor) -> Tensor:
        return F.normalize(encoder.encode(to_unit(images) * 2.0 - 1.0, grid=grid).pooled.float(), dim=-1)

    return FeatureNet("dino_mmd", encoder.net, embed)


def embed_images(net: FeatureNet, images: Tensor, batch_size: int = 64) -> Tensor:
    """net.embed over images [N, 3, H, W] in batches -> [N, D]."""
    return torch.cat([net.embed(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])


def quality_distances(real: dict[str, Tensor], fake: dict[str, Tensor]) -> dict[str, float]:
    """{metric: distance} for the metrics both feature dicts hold (DISTANCES: FID, CMMD, DINO-MMD)."""
    return {name: float(DISTANCES[name](real[name], fake[name])) for name in real if name in fake}


# ---------------------------------------------------------------------------------------------------
# The held-out set and the per-rank split
# ---------------------------------------------------------------------------------------------------
class HeldOutSet:
    """Real images with their captions: a local MDS folder (or a dataset root of bucket folders), or an
    image folder where each image has a same-named .txt caption. image(i, size) -> uint8 [3, size, size]."""

    def __init__(self, path: str, caption_column: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"QualityEval.data {path!r} is not a folder; give a local MDS folder (index.json) "
                                    "or a folder of images with same-named .txt captions")
        indexes = [self.path] if (self.path / "index.json").is_file() else sorted(
            p.parent for p in self.path.glob("*/index.json"))
        self._mds, self._files = [], []
        if indexes:
            from streaming.base.local import LocalDataset

            self._mds = [LocalDataset(str(folder)) for folder in indexes]
            self._spans = np.cumsum([0] + [len(d) for d in self._mds])
            self.caption_column = caption_column or self._caption_column(indexes[0])
            self.captions = [self._raw(i)[self.caption_column] for i in range(int(self._spans[-1]))]
        else:
            self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            missing = [p.name for p in self._files if not p.with_suffix(".txt").is_file()]
            if not self._files or missing:
                raise FileNotFoundError(
                    f"QualityEval.data {path!r} has no index.json (MDS) and "
                    + (f"images without a caption file: {missing[:3]}" if missing else "no images")
                    + "; an image folder needs NAME.png (or .jpg) with its caption in NAME.txt")
            self.captions = [p.with_suffix(".txt").read_text().strip() for p in self._files]
        if not self.captions:
            raise ValueError(f"QualityEval.data {path!r} holds no samples")

    def _caption_column(self, folder: Path) -> str:
        import json

        from composer_prx.data.columns import caption_columns_of

        shard = json.loads((folder / "index.json").read_text())["shards"][0]
        names = [n for n, e in zip(shard["column_names"], shard["column_encodings"]) if e == "str"]
        found = caption_columns_of(names)
        if not found:
            raise ValueError(f"MDS folder {folder} has no caption column among its string columns {names}; "
                             "set QualityEval.caption_column")
        return found[0]

    def _raw(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self._spans, index, side="right")) - 1
        return self._mds[part][index - int(self._spans[part])]

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int, size: int) -> Tensor:
        """Sample `index`'s image, cover-resized (antialiased bicubic) and centre-cropped: uint8 [3, size, size]."""
        from composer_prx.data.buckets import Bucket
        from composer_prx.data.dataset import decode_image, image_to_uint8

        data = self._raw(index)["image"] if self._mds else self._files[index].read_bytes()
        return image_to_uint8(decode_image(data, lambda h, w: Bucket(size, size))[0])


def spread_subset(total: int, count: int) -> list[int]:
    """`count` indices evenly spread over range(total) (all of them when count >= total)."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Sample positions rank `rank` of `world` handles: rank, rank + world, ... (ceil(n / world) of them).

    Every rank gets the same count (a sharded model needs every rank in every forward); positions >= n
    are padding, computed and dropped. gather_rows puts the rows back in position order.
    """
    if not 0 <= rank < world or n < 1:
        raise ValueError(f"shard_indices needs n >= 1 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    return [rank + world * j for j in range(math.ceil(n / world))]


def interleave(parts: list[Tensor], n: int) -> Tensor:
    """Per-rank rows (rank r's j-th row is position r + world j) -> [n, D] in position order, padding dropped."""
    return torch.stack(list(parts), dim=1).flatten(0, 1)[:n]  # [per, world, D] -> row j * world + r


def gather_rows(local: Tensor, n: int) -> Tensor:
    """Rows [ceil(n / world), D] of every rank's shard_indices, all-gathered -> [n, D] in position order."""
    from composer.utils import dist

    return interleave(list(dist.all_gather(local.contiguous())), n)


class QualityEval(Callback):
    """FID, CMMD and DINO-MMD of generated images against a held-out set of real images and their captions.

    The first `num_samples` held-out samples (evenly spread) are generated from their captions, sample i
    with noise seed `seed + i`, split over the ranks (i % world) and gathered; EMA weights when an EMA
    runs (`ema` names one). Logged as quality/<metric> every `interval` and at the end of training.
    sweep: {"guidance_scale": [...], "ema": [...] or "all"} scores every pair at the end of training
    (quality/sweep/<ema>/w<scale>/<metric>) and reports the best pair by `select`.
    """

    def __init__(self, data: str, metrics: list[str] | tuple[str, ...] = QUALITY_METRICS, num_samples: int = 1000,
                 size: int = 256, steps: int = 25, guidance: str = "cfg", guidance_scale: float | None = None,
                 ema: str | None = None, sweep: dict[str, Any] | None = None, select: str | None = None,
                 seed: int = 0, batch_size: int = 16, interval: str | None = None,
                 fid_feature: int | nn.Module = 2048, feature_extractor_weights_path: str | None = None,
                 clip: str = "openai/clip-vit-large-patch14-336", dino: str = "facebook/dinov2-base",
                 dino_size: int = 224, caption_column: str | None = None):
        check_sampling(size, steps, guidance, "QualityEval")
        self.metrics = list(metrics)
        unknown = [m for m in self.metrics if m not in QUALITY_METRICS]
        if not self.metrics or unknown:
            raise ValueError(f"QualityEval.metrics must be a non-empty list of {list(QUALITY_METRICS)}, got {metrics}")
        if num_samples < 2 or batch_size < 1:
            raise ValueError(f"QualityEval needs num_samples >= 2 and batch_size >= 1, got {num_samples}, {batch_size}")
        self.sweep = self._check_sweep(sweep)
        self.select = select or self.metrics[0]
        if self.select not in self.metrics:
            raise ValueError(f"QualityEval.select {self.select!r} is not one of the metrics {self.metrics}")
        self.interval = Time.from_timestring(interval) if interval else None
        if self.interval is not None and self.interval.unit != TimeUnit.BATCH:
            raise ValueError(f"QualityEval.interval must be in batches (e.g. '5000ba'), got {interval!r}")
        if "fid" in self.metrics and not isinstance(fid_feature, nn.Module):
            if feature_extractor_weights_path is not None and not os.path.isfile(feature_extractor_weights_path):
                fid_feature_net(fid_feature, feature_extractor_weights_path)  # the clear error, at construction
        self.data, self.caption_column, self.num_samples = data, caption_column, num_samples
        from composer_prx.model.pipeline import DEFAULT_GUIDANCE_SCALE

        self.size, self.steps, self.guidance = size, steps, guidance
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE[guidance] if guidance_scale is None else float(guidance_scale)
        self.ema, self.seed, self.batch_size = ema, seed, batch_size
        self.fid_feature, self.feature_extractor_weights_path = fid_feature, feature_extractor_weights_path
        self.clip, self.dino, self.dino_size = clip, dino, dino_size
        self._nets: dict[str, FeatureNet] | None = None
        self._set: tuple[HeldOutSet, list[int]] | None = None
        self._real: dict[str, Tensor] | None = None
        self.results: dict[tuple[str | None, float], dict[str, float]] = {}
        self.best: tuple[str | None, float] | None = None

    @staticmethod
    def _check_sweep(sweep: dict[str, Any] | None) -> dict[str, list] | None:
        if sweep is None:
            return None
        unknown = set(sweep) - {"guidance_scale", "ema"}
        if unknown or not sweep:
            raise ValueError(f"QualityEval.sweep takes keys 'guidance_scale' (list of floats) and 'ema' (list of "
                             f"names or 'all'), got {sorted(sweep)}")
        scales = sweep.get("guidance_scale")
        emas = sweep.get("ema")
        return {"guidance_scale": [float(w) for w in scales] if scales is not None else None,
                "ema": emas if emas in (None, "all") else [str(e) for e in emas]}

    # ---- setup --------------------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        check_size_fits(state.model, self.size, "QualityEval")
        self._heldout()  # a wrong data path or missing weights fail now, not at the first evaluation
        self.feature_nets(next(unwrap(state.model).parameters()).device)

    def _heldout(self) -> tuple[HeldOutSet, list[int]]:
        """The held-out set (read once) and the indices scored."""
        if self._set is None:
            heldout = HeldOutSet(self.data, self.caption_column)
            self._set = heldout, spread_subset(len(heldout), self.num_samples)
        return self._set

    def feature_nets(self, device: torch.device) -> dict[str, FeatureNet]:
        """The metrics' frozen embedders on `device`, loaded once."""
        if self._nets is None:
            builders = {"fid": lambda: fid_feature_net(self.fid_feature, self.feature_extractor_weights_path),
                        "cmmd": lambda: clip_feature_net(self.clip, device),
                        "dino_mmd": lambda: dino_feature_net(self.dino, self.dino_size, device)}
            self._nets = {m: builders[m]() for m in self.metrics}
            for net in self._nets.values():
                net.net.to(device)
        return self._nets

    # ---- events -------------------------------------------------------------------------------------
    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval is not None and int(state.timestamp.batch) % self.interval.value == 0:
            self.evaluate(state, logger, self.ema, self.guidance_scale)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.sweep is None:
            self.evaluate(state, logger, self.ema, self.guidance_scale)
        else:
            self.run_sweep(state, logger)
        log.info("%s", self.summary())

    # ---- evaluation ---------------------------------------------------------------------------------
    def _shard(self, n: int) -> list[int]:
        from composer.utils import dist

        return shard_indices(n, dist.get_global_rank(), dist.get_world_size())

    def real_features(self, device: torch.device) -> dict[str, Tensor]:
        """Features [n, D] of the held-out real images per metric (every rank takes part; cached)."""
        if self._real is None:
            heldout, subset = self._heldout()
            mine = self._shard(len(subset))
            nets = self.feature_nets(device)
            local: dict[str, list[Tensor]] = {m: [] for m in nets}
            for start in range(0, len(mine), self.batch_size):
                chunk = [subset[p % len(subset)] for p in mine[start: start + self.batch_size]]
                images = torch.stack([heldout.image(i, self.size) for i in chunk]).to(device)
                for m, net in nets.items():
                    local[m].append(net.embed(images))
            self._real = {m: gather_rows(torch.cat(v), len(subset)) for m, v in local.items()}
        return self._real

    def evaluate(self, state: State, logger: Logger, ema: str | None, guidance_scale: float,
                 prefix: str = "quality") -> dict[str, float]:
        """Generate the held-out captions with EMA average `ema` and `guidance_scale`; log and return the metrics."""
        model = unwrap(state.model)
        device = next(model.parameters()).device
        heldout, subset = self._heldout()
        real = self.real_features(device)
        nets = self.feature_nets(device)
        mine = self._shard(len(subset))
        local: dict[str, list[Tensor]] = {m: [] for m in nets}
        with ema_weights(state, ema):
            for start in range(0, len(mine), self.batch_size):
                positions = mine[start: start + self.batch_size]
                captions = [heldout.captions[subset[p % len(subset)]] for p in positions]
                with get_precision_context(state.precision):  # bf16 autocast when training uses it; state fp32
                    images = model.generate(captions, size=self.size, steps=self.steps, guidance=self.guidance,
                                            guidance_scale=guidance_scale, seed=[self.seed + p for p in positions])
                for m, net in nets.items():
                    local[m].append(net.embed(images))
        fake = {m: gather_rows(torch.cat(v), len(subset)) for m, v in local.items()}
        scores = quality_distances(real, fake)
        self.results[(ema, guidance_scale)] = scores
        logger.log_metrics({f"{prefix}/{m}": v for m, v in scores.items()})
        return scores

    def sweep_settings(self, state: State) -> list[tuple[str | None, float]]:
        """The (ema, guidance_scale) pairs of `sweep`; ema 'all' is every average the run keeps."""
        from composer_prx.algorithms.ema import find_ema

        sweep = self.sweep or {}
        emas = sweep.get("ema")
        if emas == "all":
            ours = find_ema(state)
            emas = list(ours.smoothings) if ours is not None else [None]
        scales = sweep.get("guidance_scale") or [self.guidance_scale]
        return [(e, w) for e in (emas or [self.ema]) for w in scales]

    def run_sweep(self, state: State, logger: Logger) -> tuple[str | None, float]:
        """Score every (ema, guidance_scale) pair; log quality/best/<metric> of the pair lowest in `select`."""
        for ema, scale in self.sweep_settings(state):
            self.evaluate(state, logger, ema, scale, prefix=f"quality/sweep/{ema or 'model'}/w{scale:g}")
        swept = {k: self.results[k] for k in self.sweep_settings(state)}
        self.best = min(swept, key=lambda k: swept[k][self.select])
        logger.log_metrics({f"quality/best/{m}": v for m, v in swept[self.best].items()})
        return self.best

    def summary(self) -> str:
        lines = [f"QualityEval ema={e or 'none'} guidance_scale={w}: "
                 + "  ".join(f"{m} {v:.4g}" for m, v in r.items()) for (e, w), r in self.results.items()]
        if self.best is not None:
            ema, scale = self.best
            lines.append(f"QualityEval best by {self.select}: ema={ema or 'none'} guidance_scale={scale}")
        return "\n".join(lines)
