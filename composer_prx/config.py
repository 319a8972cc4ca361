"""One YAML -> one strict, typed training config, plus the name registries of every component.

    yaml (+ `base: other.yaml` merged under it, key=value overrides, ${variables.x} interpolation)
      -> TrainConfig (dataclasses; unknown keys fail listing the valid ones, values type-checked,
         time strings parsed)  -> component kwargs checked against the registered builder's signature

Components are chosen by registry name (`ema`, `gradient_clipping`, `tread`, `muon`, `speed_monitor`,
`samples`, ...), never by import path.  Registry entries are "module:attribute" strings resolved on use,
so optional extras load only when a config names them.

The registries are open: `register("algorithms", "my_algo", MyAlgo)` (or "my_pkg.algos:MyAlgo"), or a
Python entry point in the group "composer_prx.<registry>" of an installed package, e.g. in pyproject.toml
    [project.entry-points."composer_prx.algorithms"]
    my_algo = "my_pkg.algos:MyAlgo"
makes `algorithms: {my_algo: {...}}` work from any YAML.  Registries, named like their YAML section:
algorithms, callbacks, loggers, optimizer, scheduler, data, model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_prx.flow import TimeSampling
from composer_prx.model.dit import DiTConfig


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config problem, with the offending key and the fix in the message."""


ALGORITHMS = {
    "ema": "composer_prx.algorithms.ema:EMA",
    "composer_ema": "composer.algorithms:EMA",  # Composer's own (no FSDP2 support; see README "EMA under FSDP2")
    "gradient_clipping": "composer.algorithms:GradientClipping",
    "tread": "composer_prx.algorithms.tread:Tread",
    "repa": "composer_prx.algorithms.repa:Repa",
    "lpips": "composer_prx.algorithms.perceptual:LpipsLoss",
    "dino_perceptual": "composer_prx.algorithms.perceptual:DinoPerceptualLoss",
}
CALLBACKS = {
    "speed_monitor": "composer.callbacks:SpeedMonitor",
    "lr_monitor": "composer.callbacks:LRMonitor",
    "memory_monitor": "composer.callbacks:MemoryMonitor",
    "runtime_estimator": "composer.callbacks:RuntimeEstimator",
    "samples": "composer_prx.callbacks.samples:SampleGrid",
    "shapes_eval": "composer_prx.callbacks.quality:ShapesEval",
    "quality_eval": "composer_prx.callbacks.quality:QualityEval",
    "update_rms": "composer_prx.optim.muon:UpdateRMSMonitor",
    "data_stats": "composer_prx.data.dataset:CorruptSampleCounter",
    "time_budget": "composer_prx.callbacks.budget:TimeBudget",
}
LOGGERS = {
    "file": "composer.loggers:FileLogger",
    "wandb": "composer.loggers:WandBLogger",
    "tensorboard": "composer.loggers:TensorboardLogger",
    "mlflow": "composer.loggers:MLFlowLogger",
}
OPTIMIZERS = {
    "adamw": "composer_prx.optim.muon:build_adamw",
    "muon": "composer_prx.optim.muon:build_muon",
}
# Builders taking **settings declare their keys in a dataclass, checked like any config section.
OPTIMIZER_SETTINGS = {
    "adamw": "composer_prx.optim.muon:AdamWSettings",
    "muon": "composer_prx.optim.muon:MuonSettings",
}
SCHEDULERS = {
    "constant": "composer.optim:ConstantScheduler",
    "constant_with_warmup": "composer.optim:ConstantWithWarmupScheduler",
    "cosine_with_warmup": "composer.optim:CosineAnnealingWithWarmupScheduler",
    "linear_with_warmup": "composer.optim:LinearWithWarmupScheduler",
}
DATASETS = {
    "shapes": "composer_prx.data.shapes:build_shapes_dataloader",
    "mds": "composer_prx.data.dataset:build_dataloader",
}
MODELS = {
    "prx": "composer_prx.train:build_prx_model",
}
REGISTRIES = {
    "algorithms": ALGORITHMS,
    "callbacks": CALLBACKS,
    "loggers": LOGGERS,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "data": DATASETS,
    "model": MODELS,
}
ENTRY_POINT_PREFIX = "composer_prx."  # entry-point group of a registry: composer_prx.<registry>
# Arguments the trainer fills in itself; a YAML must not set them.
INJECTED = {"data": {"batch_size", "seed", "patch_size", "resolution"}, "optimizer": {"model"}, "model": {"cfg"}}
_entry_points_loaded = False


def register(registry: str, name: str, obj: Any) -> None:
    """Make `obj` (a class or builder, or its "module:attribute" path) usable by `name` in `registry`.

    Re-registering the same object is allowed; taking a name that is already used is an error.
    """
    if registry not in REGISTRIES:
        raise ConfigError(f"unknown registry {registry!r}; registries: {sorted(REGISTRIES)}")
    if not isinstance(name, str) or not name or "." in name or "=" in name:
        raise ConfigError(f"registry name must be a non-empty string without '.' or '=', got {name!r}")
    if isinstance(obj, str) and (obj.count(":") != 1 or not all(obj.split(":"))):
        raise ConfigError(f"register({registry!r}, {name!r}, {obj!r}): a path must read 'module:attribute'")
    if not isinstance(obj, str) and not callable(obj):
        raise ConfigError(f"register({registry!r}, {name!r}, ...): {obj!r} is neither callable nor 'module:attribute'")
    table = REGISTRIES[registry]
    if name in table and table[name] is not obj and table[name] != obj:
        raise ConfigError(f"{registry} name {name!r} is already registered to {table[name]!r}; choose another name")
    table[name] = obj


def load_entry_points() -> None:
    """Register every installed package's entry points in the groups composer_prx.<registry>."""
    global _entry_points_loaded
    _entry_points_loaded = True
    for registry, table in REGISTRIES.items():
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_PREFIX + registry):
            if entry.name in table and table[entry.name] != entry.value:
                log.warning("entry point %s = %s (group %s%s) ignored: the name is taken by %s", entry.name,
                            entry.value, ENTRY_POINT_PREFIX, registry, table[entry.name])
                continue
            table[entry.name] = entry.value


def resolve(registry: str, name: str) -> Any:
    """Registry name -> the class or builder it names."""
    if not _entry_points_loaded:
        load_entry_points()
    table = REGISTRIES[registry]
    if name not in table:
        raise ConfigError(f"unknown {registry} name {name!r}; registered names: {sorted(table)} (add your own "
                          f"with composer_prx.config.register or a {ENTRY_POINT_PREFIX}{registry} entry point)")
    entry = table[name]
    if not isinstance(entry, str):
        return entry
    module, attr = entry.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{registry} name {name!r} is registered as {entry!r}, which cannot be imported: {err}") from err


# ---- schema ---------------------------------------------------------------------------------------
@dataclass
class TextEncoderSection:
    name_or_path: str = "google/t5gemma-2b-2b-ul2"
    max_length: int = 256
    dtype: str = "float32"  # weights of the frozen encoder; "bfloat16" halves its memory on GPUs


@dataclass
class ModelSection:
    name: str = "prx"  # the model registry's builder(cfg, **settings) -> ComposerModel
    settings: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a registered builder
    dit: DiTConfig = field(default_factory=DiTConfig)
    text_encoder: TextEncoderSection | None = field(default_factory=TextEncoderSection)
    time_sampling: TimeSampling = field(default_factory=TimeSampling)
    caption_dropout: float = 0.1
    t_min: float = 0.05
    eval_t_values: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    init_seed: int | None = None
    init_from: str | None = None  # a diffusers PRXTransformer2DModel folder: start from its weights
    compile: bool = False  # torch.compile each transformer block (PixelDiT.compile_blocks), not the whole model


@dataclass
class DataSection:
    train: dict[str, Any]
    global_batch_size: int
    eval: dict[str, Any] | None = None
    eval_batch_size: int | None = None
    resolution: int = 512


@dataclass
class TrainerSection:
    max_duration: str | None = None  # required without stages; with stages the sum of their durations
    device: str | None = None
    precision: str = "fp32"
    device_train_microbatch_size: int | str | None = None
    eval_interval: str = "1ep"
    eval_subset_num_batches: int = -1
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "100ba"
    fsdp: dict[str, Any] | None = None  # FSDP2 settings ({} for defaults); always FSDP2, whatever FSDP_VERSION says
    dist_timeout: float = 300.0


@dataclass
class TrainConfig:
    run_name: str
    model: ModelSection
    data: DataSection
    optimizer: dict[str, Any]
    trainer: TrainerSection
    run_dir: str = "./runs"
    seed: int = 17
    scheduler: dict[str, Any] | None = None
    # name -> kwargs ({} for defaults); `name: null` (e.g. the override algorithms.ema=null) switches it off
    algorithms: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    loggers: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    # ordered training stages (composer_prx.algorithms.stages.StageSection); empty: one stage
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_folder(self) -> Path:
        return Path(self.run_dir) / self.run_name


TIME_FIELDS = {"max_duration", "eval_interval", "save_interval", "console_log_interval"}
CHOICES = {"precision": ("fp32", "amp_bf16", "amp_fp16"), "device": ("cpu", "gpu", "mps", None),
           "dtype": ("float32", "bfloat16", "float16")}


# ---- checking -------------------------------------------------------------------------------------
def _type_ok(value: Any, annotation: Any) -> bool:
    """A small structural type check for YAML values (int accepted where float is expected)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (dict, typing.Mapping) or annotation is dict:
        return isinstance(value, dict)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args:  # a fixed-length tuple such as betas
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return not args or all(_type_ok(v, args[0]) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__


def _check_time(value: Any, where: str) -> None:
    from composer.core import Time

    try:
        Time.from_timestring(str(value))
    except ValueError as err:
        raise ConfigError(
            f"{where}: {value!r} is not a time string; use an integer with a unit, e.g. '100ba', '2ep', "
            f"'0.5dur', '1000sp' ({err})"
        ) from err


def build_section(cls: type, data: Any, where: str) -> Any:
    """dict -> dataclass cls, strictly: unknown keys, missing keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{unknown[0]}; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key}")
            continue
        value, annotation = data[name], hints[name]
        section_types = [a for a in (typing.get_args(annotation) or (annotation,)) if dataclasses.is_dataclass(a)]
        if section_types and value is not None:
            kwargs[name] = build_section(section_types[0], value, key)
            continue
        if not _type_ok(value, annotation):
            raise ConfigError(f"{key} must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})")
        if name in TIME_FIELDS and value is not None:
            _check_time(value, key)
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{key} must be one of {CHOICES[name]}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as err:  # the section's own checks (e.g. DiTConfig.__post_init__)
        raise ConfigError(f"{where or 'config'}: {err}") from err


def check_kwargs(target: Any, kwargs: dict[str, Any], where: str, injected: set[str] = frozenset()) -> None:
    """Check YAML kwargs against a component's signature: unknown names, missing ones, wrong types."""
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (NameError, TypeError):
        hints = {}
    params = {n: p for n, p in signature.parameters.items() if n != "self"}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = sorted(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in injected)
    for name, value in kwargs.items():
        if name in injected:
            raise ConfigError(f"{where}.{name} is set by the trainer; remove it from the config")
        if name not in params:
            if accepts_any:
                continue
            raise ConfigError(f"unknown key {where}.{name}; valid keys here: {valid}")
        annotation = hints.get(name, params[name].annotation)
        if not _type_ok(value, annotation):
            raise ConfigError(f"{where}.{name} must be {_type_name(annotation)}, got {value!r}")
        if isinstance(value, str) and name in ("half_life", "update_interval", "ema_start", "t_warmup", "t_max",
                                               "interval", "every"):
            _check_time(value, f"{where}.{name}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in kwargs and n not in injected]
    if missing:
        raise ConfigError(f"{where} is missing required key(s) {missing}")


def _split_component(spec: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    if "name" not in spec:
        raise ConfigError(f"{where} needs a 'name' key choosing the component")
    rest = {k: v for k, v in spec.items() if k != "name"}
    return spec["name"], rest


def check_components(cfg: TrainConfig) -> None:
    """Every named component exists and its kwargs fit its signature (before anything is built)."""
    for registry, spec, where in (("optimizer", cfg.optimizer, "optimizer"),
                                  ("scheduler", cfg.scheduler, "scheduler"),
                                  ("data", cfg.data.train, "data.train"),
                                  ("data", cfg.data.eval, "data.eval")):
        if spec is None:
            continue
        name, kwargs = _split_component(spec, where)
        if registry == "optimizer" and name in OPTIMIZER_SETTINGS:
            module, attr = OPTIMIZER_SETTINGS[name].split(":")
            build_section(getattr(importlib.import_module(module), attr), kwargs, f"{where} ({name})")
            continue
        check_kwargs(resolve(registry, name), kwargs, f"{where} ({name})", INJECTED.get(registry, set()))
    for registry in ("algorithms", "callbacks", "loggers"):
        for name, kwargs in getattr(cfg, registry).items():
            check_kwargs(resolve(registry, name), kwargs, f"{registry}.{name}")
    check_kwargs(resolve("model", cfg.model.name), cfg.model.settings, f"model.settings ({cfg.model.name})",
                 INJECTED["model"])


def check_consistency(cfg: TrainConfig) -> None:
    """Cross-key rules that no single key can check."""
    patch, resolution = cfg.model.dit.patch_size, cfg.data.resolution
    if resolution % patch:
        raise ConfigError(f"data.resolution {resolution} is not a multiple of the patch size {patch} "
                          f"(model.dit.patch_size); use e.g. data.resolution={max(patch, resolution // patch * patch)}")
    if cfg.trainer.fsdp is not None:
        from composer.utils.parallelism import FSDP2Config

        valid = sorted(FSDP2Config.settable_attrs() - {"device_mesh"})
        unknown = sorted(set(cfg.trainer.fsdp) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key trainer.fsdp.{unknown[0]}; valid FSDP2 keys: {valid}")
    if cfg.data.global_batch_size < 1:
        raise ConfigError(f"data.global_batch_size must be >= 1, got {cfg.data.global_batch_size}")


def check_stages(cfg: TrainConfig) -> None:
    """Build each stage section strictly and make trainer.max_duration the schedule's total batches."""
    from composer_prx.algorithms.stages import StageSection

    if not cfg.stages:
        if cfg.trainer.max_duration is None:
            raise ConfigError("missing required key trainer.max_duration (or declare `stages:` with durations)")
        return
    built = []
    for i, stage in enumerate(cfg.stages):
        section = build_section(StageSection, stage, f"stages[{i}]")
        try:
            section.batches
        except ValueError as err:
            raise ConfigError(f"stages[{i}].duration: {err}") from err
        resolution = section.resolution or cfg.data.resolution
        if resolution % cfg.model.dit.patch_size:
            raise ConfigError(f"stages[{i}].resolution {resolution} is not a multiple of the patch size "
                              f"{cfg.model.dit.patch_size} (model.dit.patch_size)")
        from composer_prx.algorithms.stages import stage_algorithm_settings

        try:
            settings = stage_algorithm_settings({k: v for k, v in cfg.algorithms.items() if v is not None},
                                                section.algorithms)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        for name in section.algorithms:
            resolve("algorithms", name)
            if name in settings:
                check_kwargs(resolve("algorithms", name), settings[name], f"stages[{i}].algorithms.{name}")
        built.append(section)
    total = f"{sum(s.batches for s in built)}ba"
    if cfg.trainer.max_duration is not None and cfg.trainer.max_duration != total:
        raise ConfigError(f"trainer.max_duration {cfg.trainer.max_duration} differs from the stages' total {total}; "
                          "remove trainer.max_duration (the stages define it) or make them agree")
    for key in ("t_warmup", "t_max", "t_start"):  # one time unit for the LR schedule and the stages
        value = (cfg.scheduler or {}).get(key)
        if isinstance(value, str) and not value.endswith(("ba", "dur")):
            raise ConfigError(f"scheduler.{key} is {value!r}; with stages use batches ('1000ba') or 'dur', since "
                              "samples and epochs drift apart from batches when the batch size changes")
    cfg.trainer.max_duration = total
    cfg.stages = [dataclasses.asdict(s) for s in built]


def merge_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` deep-merged over `base`; a component mapping whose `name` differs from the base's replaces it whole
    (a different optimizer starts from its own defaults), lists and values replace, null switches off."""
    merged = dict(base)
    for key, value in top.items():
        below = base.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and value.get("name", below.get("name")) == below.get("name"):
            merged[key] = merge_over(below, value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping (interpolations unresolved); a top-level `base: other.yaml` (relative to this
    file) is read first and this file merged over it (merge_over)."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another YAML (relative to this file), got {base!r}")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} does not exist (looked for {base_path}); give a path relative "
                          f"to {path.parent}")
    chain = _chain + (path.resolve(),)
    if base_path in chain:
        raise ConfigError(f"{path}: base {base!r} includes itself ({' -> '.join(str(p) for p in chain + (base_path,))})")
    return merge_over(read_yaml(base_path, chain), data)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML, apply key=value overrides, resolve ${...}, and check everything strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; the shipped configs are in yamls/")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. trainer.max_duration=10ba)")
    try:
        conf = OmegaConf.merge(OmegaConf.create(read_yaml(path)), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from err
    cfg = build_section(TrainConfig, data, "")
    check_stages(cfg)
    for registry in ("algorithms", "callbacks", "loggers"):  # `name: null` switches a component off
        setattr(cfg, registry, {k: v for k, v in getattr(cfg, registry).items() if v is not None})
    check_consistency(cfg)
    check_components(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written next to the checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
