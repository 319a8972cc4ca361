"""python -m composer_prx.train CONFIG.yaml [key=value ...]   (or: composer -n N -m composer_prx.train ...)

Builds everything from one strict config (composer_prx.config) and runs Composer's Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from composer import Trainer
from composer.utils import dist, get_device, reproducibility
from composer.utils.parallelism import FSDP2Config

from composer_prx import config as C
from composer_prx.algorithms.stages import StagedLoader, Stages, StageSection, stage_algorithm_settings
from composer_prx.callbacks.gloo_mean import GlooGradientMean
from composer_prx.callbacks.resume import ExactResume
from composer_prx.data.dataset import CorruptSampleCounter
from composer_prx.data.text_embeddings import check_text_embeddings
from composer_prx.model.dit import PixelDiT
from composer_prx.model.pipeline import PRXModel
from composer_prx.model.text import load_text_encoder
from composer_prx.report import LOG_NAME, MetricsFileLogger

log = logging.getLogger(__name__)


def build_model(cfg: C.TrainConfig):
    """The model registry's builder model.name (default "prx") called as builder(cfg, **model.settings)."""
    return C.resolve("model", cfg.model.name)(cfg, **cfg.model.settings)


def build_prx_model(cfg: C.TrainConfig) -> PRXModel:
    """PixelDiT + frozen text encoder -> PRXModel (weights seeded by model.init_seed or seed)."""
    m = cfg.model
    reproducibility.seed_all(m.init_seed if m.init_seed is not None else cfg.seed)
    denoiser = PixelDiT(m.dit) if m.init_from is None else PixelDiT.from_diffusers(m.init_from)
    if denoiser.cfg != m.dit:  # model.dit must describe the weights it starts from
        fix = [f"model.dit.{f.name}={getattr(denoiser.cfg, f.name)!r}" for f in dataclasses.fields(denoiser.cfg)
               if getattr(denoiser.cfg, f.name) != getattr(m.dit, f.name)]
        raise C.ConfigError(f"model.init_from {m.init_from!r} is a different architecture than model.dit; "
                            f"set {' '.join(fix)}")
    encoder = None
    if m.text_encoder is not None:
        encoder = load_text_encoder(m.text_encoder.name_or_path, m.text_encoder.max_length,
                                    getattr(torch, m.text_encoder.dtype))
        if encoder.hidden_size != m.dit.text_dim:
            raise C.ConfigError(
                f"model.dit.text_dim is {m.dit.text_dim} but the text encoder {m.text_encoder.name_or_path!r} "
                f"has hidden size {encoder.hidden_size}; set model.dit.text_dim={encoder.hidden_size}"
            )
    if m.compile:
        if not callable(getattr(denoiser, "compile_blocks", None)):
            raise C.ConfigError(f"model.compile compiles each block of a PixelDiT; {type(denoiser).__name__} has no "
                                "compile_blocks(); set model.compile=false")
        denoiser.compile_blocks()
    return PRXModel(denoiser, encoder, time_sampling=m.time_sampling,
                    caption_dropout=m.caption_dropout, t_min=m.t_min, eval_t_values=tuple(m.eval_t_values))


def build_dataloader(cfg: C.TrainConfig, spec: dict, batch_size: int, split: str, resolution: int | None = None):
    """A registered data builder with the trainer-owned arguments filled in."""
    name, kwargs = C._split_component(spec, f"data.{split}")
    world = dist.get_world_size()
    if batch_size % world:
        raise C.ConfigError(f"data batch size {batch_size} is not divisible by the world size {world}")
    builder = C.resolve("data", name)
    return builder(batch_size=batch_size // world, seed=cfg.seed, patch_size=cfg.model.dit.patch_size,
                   resolution=resolution or cfg.data.resolution, **kwargs)


def build_stages(cfg: C.TrainConfig) -> tuple[StagedLoader, Stages, list]:
    """cfg.stages -> (the staged train loader, its Stages callback, stage 0's algorithms)."""
    stages = [StageSection(**s) for s in cfg.stages]
    base = dict(cfg.algorithms)
    made: dict[tuple, object] = {}  # one instance per (name, settings): unchanged algorithms are shared

    def algorithm(name: str, kwargs: dict):
        key = (name, repr(sorted(kwargs.items())))
        if key not in made:
            made[key] = C.resolve("algorithms", name)(**kwargs)
        return made[key]

    per_stage = [[algorithm(n, kw) for n, kw in stage_algorithm_settings(base, s.algorithms).items()]
                 for s in stages]

    def builder(stage: StageSection):
        return lambda: build_dataloader(cfg, cfg.data.train, stage.global_batch_size or cfg.data.global_batch_size,
                                        "train", stage.resolution)

    for s in stages:  # a batch that does not split over the ranks fails now, not at the boundary
        if (s.global_batch_size or cfg.data.global_batch_size) % dist.get_world_size():
            raise C.ConfigError(f"stage {s.name!r}: global batch {s.global_batch_size} is not divisible by "
                                f"the world size {dist.get_world_size()}")
    loader = StagedLoader([builder(s) for s in stages], [s.batches for s in stages])
    loader.inner()  # stage 0's loader now: data preparation (and anything it writes) happens before the model
    microbatches = [s.device_train_microbatch_size or cfg.trainer.device_train_microbatch_size
                    or (s.global_batch_size or cfg.data.global_batch_size) // dist.get_world_size() for s in stages]
    return loader, Stages(loader, stages, per_stage, microbatches), per_stage[0]


def check_data_text_embeddings(cfg: C.TrainConfig, loader) -> None:
    """Precomputed caption embeddings in the training data must come from the configured text encoder."""
    dataset = getattr(loader.inner() if isinstance(loader, StagedLoader) else loader, "dataset", None)
    info = getattr(dataset, "text_embeddings", None)
    if info:
        check_text_embeddings(info, cfg.model.text_encoder, cfg.model.dit.text_dim,
                              getattr(dataset, "root", None) or "data.train")


def drop_checkpoints_after_latest(folder: Path) -> list[Path]:
    """Autoresume after a kill: remove checkpoints newer than the one `latest-rank0.pt` points to.

    A process killed while saving (or between writing a checkpoint and moving the symlink) leaves a
    checkpoint that autoresume does not load and that Composer then refuses to overwrite.
    """
    import re
    import shutil

    if not folder.is_dir():
        return []
    latest = folder / "latest-rank0.pt"
    target = os.readlink(latest) if latest.is_symlink() else None
    match = re.search(r"ba(\d+)", os.path.basename(str(target).rstrip("/"))) if target else None
    last = int(match.group(1)) if match else -1
    removed = []
    for entry in folder.iterdir():
        found = re.fullmatch(r"ep\d+-ba(\d+)(-rank\d+\.pt)?", entry.name)
        if found and int(found.group(1)) > last:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    if removed:
        log.warning("autoresume: removed %s, written after the last complete checkpoint %s",
                    sorted(p.name for p in removed), target)
    return removed


def build_trainer(cfg: C.TrainConfig) -> Trainer:
    """Config -> data, model, optimizer, algorithms, callbacks, loggers -> composer.Trainer."""
    folder = cfg.run_folder
    dist.initialize_dist(get_device(cfg.trainer.device), timeout=cfg.trainer.dist_timeout)  # data prep may sync
    extra_callbacks, microbatch = [], cfg.trainer.device_train_microbatch_size
    if cfg.stages:
        train_loader, stages_callback, algorithms = build_stages(cfg)
        extra_callbacks.append(stages_callback)
        microbatch = stages_callback.microbatches[0]
    else:
        train_loader = build_dataloader(cfg, cfg.data.train, cfg.data.global_batch_size, "train")
        algorithms = [C.resolve("algorithms", n)(**kw) for n, kw in cfg.algorithms.items()]
    check_data_text_embeddings(cfg, train_loader)
    eval_loader = None
    if cfg.data.eval is not None:
        eval_loader = build_dataloader(cfg, cfg.data.eval, cfg.data.eval_batch_size or cfg.data.global_batch_size,
                                       "eval")
    model = build_model(cfg)
    every_stage = stages_callback.algorithms if cfg.stages else [algorithms]
    for algorithm in {id(a): a for stage in every_stage for a in stage}.values():
        if callable(getattr(algorithm, "prepare", None)):  # what an algorithm trains (REPA's projector) exists
            algorithm.prepare(model)                      # before the optimizer, whichever stage uses it
    opt_name, opt_kwargs = C._split_component(cfg.optimizer, "optimizer")
    optimizer = C.resolve("optimizer", opt_name)(model, **opt_kwargs)
    schedulers = None
    if cfg.scheduler is not None:
        name, kwargs = C._split_component(cfg.scheduler, "scheduler")
        schedulers = C.resolve("scheduler", name)(**kwargs)
    callbacks = [C.resolve("callbacks", n)(**kw) for n, kw in cfg.callbacks.items()] + [
        ExactResume(), GlooGradientMean(), *extra_callbacks]
    if "data_stats" not in cfg.callbacks:  # unreadable samples are always counted and logged per epoch
        callbacks.append(CorruptSampleCounter())
    loggers = [C.resolve("loggers", n)(**kw) for n, kw in cfg.loggers.items()]
    loggers.append(MetricsFileLogger(str(folder / LOG_NAME)))  # every run: what `composer_prx.report` reads
    t = cfg.trainer
    if t.autoresume and dist.get_local_rank() == 0:  # crash-safe: a half-written newer checkpoint goes
        drop_checkpoints_after_latest(folder / "checkpoints")
    dist.barrier()
    if dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(C.to_yaml(cfg))
    return Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=t.eval_interval if eval_loader is not None else 1,  # no eval loader: nothing to time
        eval_subset_num_batches=t.eval_subset_num_batches,
        max_duration=t.max_duration,
        optimizers=optimizer,
        schedulers=schedulers,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        device=t.device,
        precision=t.precision,
        device_train_microbatch_size=microbatch,
        parallelism_config={"fsdp": FSDP2Config(**t.fsdp)} if t.fsdp is not None else None,
        save_folder=str(folder / "checkpoints"),
        save_interval=t.save_interval,
        save_num_checkpoints_to_keep=t.save_num_checkpoints_to_keep,
        save_overwrite=t.save_overwrite,
        autoresume=t.autoresume,
        load_path=t.load_path,
        progress_bar=t.progress_bar,
        log_to_console=t.log_to_console,
        console_log_interval=t.console_log_interval,
        dist_timeout=t.dist_timeout,
        seed=cfg.seed,
    )


def main(argv: list[str] | None = None) -> Trainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m composer_prx.train CONFIG.yaml [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = C.load_config(argv[0], argv[1:])
    except C.ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    trainer = build_trainer(cfg)
    trainer.fit()
    for callback in [*trainer.state.callbacks, *trainer.state.algorithms]:
        summary = getattr(callback, "summary", None)
        if summary and dist.get_global_rank() == 0:
            print(summary())
    trainer.close()
    return trainer


if __name__ == "__main__":
    main()
