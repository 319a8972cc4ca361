"""python -m composer_prx.plan CONFIG.yaml --gpus 32 --gpu h200 [--mfu 0.4] [key=value ...]: what a run costs.

    config (the strict loader train.py uses) -> per stage (`stages:`; none: one stage):
      FLOPs per optimizer step  = denoiser 3 x forward (TREAD-routed tokens, dit_matmul_flops)
                                + text encoder forward + REPA teacher forward + REPA projector 3 x forward
                                + LPIPS / DINO 3 x forward (x forward, x_hat forward, x_hat input gradient)
                                + Muon Newton-Schulz
      hours = FLOPs / (GPUs x peak x MFU),  dollars = hours x GPUs x $/GPU-hour
      memory per GPU under FSDP2 = sharded state (params, grads, optimizer, EMA) / GPUs + gathered units
                                 + frozen nets + activations x microbatch  ->  largest microbatch that fits

Every number is an estimate from the architectures' shapes (README, "Planning the 24-hour run").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from composer_prx import config as C
from composer_prx.model.dit import TRAIN_FLOP_FACTOR, DiTConfig, PixelDiT, dit_matmul_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPU:
    peak_tflops: float  # dense bf16
    memory_gb: float


GPUS = {"h100": GPU(989.0, 80.0), "h200": GPU(989.0, 141.0), "a100": GPU(312.0, 80.0), "b200": GPU(2250.0, 192.0)}
GB = 1e9
BF16 = 2  # bytes per activation element
USABLE_MEMORY = 0.9  # of the GPU's memory; the rest: CUDA context, NCCL buffers, allocator fragmentation
INPUT_GRAD_FACTOR = 3  # a frozen net on x_hat: x forward + x_hat forward + x_hat input gradient (no weight grads)


@dataclass(frozen=True)
class ViTArch:
    """A plain-MLP ViT teacher: depth, width D, MLP width M, patch p, prefix (CLS + register) tokens."""

    depth: int
    dim: int
    mlp_dim: int
    patch_size: int
    prefix_tokens: int
    source: str

    @property
    def linear_macs(self) -> int:
        """sum of in*out over the blocks' Linear layers: depth (4 D^2 + 2 D M)."""
        return self.depth * (4 * self.dim**2 + 2 * self.dim * self.mlp_dim)

    @property
    def params(self) -> int:
        return self.linear_macs + 3 * self.patch_size**2 * self.dim

    def forward_flops(self, h: int, w: int) -> int:
        from composer_prx.encoders import vit_matmul_flops

        return vit_matmul_flops(h, w, linear_macs=self.linear_macs, dim=self.dim, depth=self.depth,
                                patch_size=self.patch_size, prefix_tokens=self.prefix_tokens)

    def activation_elements(self, h: int, w: int) -> int:
        """Saved for the input gradient: (16 D + 2 M) per token per block (norms, q k v, attention, MLP)."""
        return (self.prefix_tokens + h * w) * self.depth * (16 * self.dim + 2 * self.mlp_dim)


VIT_B = dict(depth=12, dim=768, mlp_dim=3072)
VIT_TEACHERS = {  # hub ids -> architecture (from their published config.json); local folders are read directly
    "facebook/dinov3-vitb16-pretrain-lvd1689m": ViTArch(**VIT_B, patch_size=16, prefix_tokens=5,
                                                        source="DINOv3 ViT-B/16, CLS + 4 registers"),
    "facebook/dinov2-with-registers-base": ViTArch(**VIT_B, patch_size=14, prefix_tokens=5,
                                                   source="DINOv2 ViT-B/14, CLS + 4 registers"),
    "facebook/dinov2-base": ViTArch(**VIT_B, patch_size=14, prefix_tokens=1, source="DINOv2 ViT-B/14, CLS"),
    "timm:vit_base_patch16_dinov3": ViTArch(**VIT_B, patch_size=16, prefix_tokens=5,
                                            source="timm DINOv3 ViT-B/16, CLS + 4 registers"),
    "timm:vit_small_patch16_dinov3": ViTArch(depth=12, dim=384, mlp_dim=1536, patch_size=16, prefix_tokens=5,
                                             source="timm DINOv3 ViT-S/16, CLS + 4 registers"),
}


@dataclass(frozen=True)
class TextArch:
    """A text encoder for FLOPs: matmul params per token, layers x attention width, total params."""

    linear_macs: int
    layers: int
    attention_dim: int
    params: int
    source: str

    def forward_flops(self, tokens: int) -> int:
        """2 T linear_macs + 4 T^2 attention_dim layers (one caption of T tokens)."""
        return 2 * tokens * self.linear_macs + 4 * tokens * tokens * self.attention_dim * self.layers


def _gemma2_2b_encoder() -> TextArch:
    # Gemma 2 2B shapes (google/gemma-2-2b config.json): hidden 2304, 26 layers, 8 query heads x 256,
    # 4 key/value heads, gated MLP 9216, vocabulary 256000. T5Gemma 2B-2B's encoder has these shapes.
    hidden, layers, q_dim, kv_dim, mlp, vocab = 2304, 26, 8 * 256, 4 * 256, 9216, 256000
    per_layer = hidden * (2 * q_dim + 2 * kv_dim) + 3 * hidden * mlp
    return TextArch(linear_macs=layers * per_layer, layers=layers, attention_dim=q_dim,
                    params=layers * per_layer + vocab * hidden,
                    source="estimate: T5Gemma 2B-2B encoder = Gemma 2 2B shapes, 2.02B matmul + 0.59B embedding params")


TEXT_ENCODERS = {"google/t5gemma-2b-2b-ul2": _gemma2_2b_encoder()}


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def vgg16_lpips_flops(h: int, w: int) -> int:
    """Forward FLOPs of LPIPS-VGG16 on an h x w image: 2 * 9 c_in c_out h_l w_l over the 13 convs up to relu5_3
    (h_l = h / 2^stage after each max-pool) + 2 c h_l w_l for the five 1x1 heads."""
    flops, c_in = 0, 3
    for stage, (c_out, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        pixels = (h >> stage) * (w >> stage)
        for _ in range(convs):
            flops += 2 * 9 * c_in * c_out * pixels
            c_in = c_out
        flops += 2 * c_out * pixels  # the head's 1x1 conv on this stage's feature
    return flops


def vgg16_lpips_activation_elements(h: int, w: int) -> int:
    """Saved for the input gradient: 3 c h_l w_l per conv (ReLU output, next input, the head's normalised feature)."""
    return sum(3 * c * convs * (h >> s) * (w >> s)
               for s, (c, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))))


VGG16_LPIPS_PARAMS = 14_714_688  # torchvision vgg16 `features` (13 convs), what LPIPS keeps


class PlanError(ValueError):
    """A planner input problem, with the fix in the message."""


def vit_arch(name_or_path: str) -> ViTArch:
    """A ViT teacher's shapes: a local transformers folder's config.json, else the table VIT_TEACHERS."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        dim = cfg["hidden_size"]
        mlp = cfg.get("intermediate_size") or int(dim * cfg.get("mlp_ratio", 4))
        prefix = 1 + int(cfg.get("num_register_tokens", 0))
        return ViTArch(depth=cfg["num_hidden_layers"], dim=dim, mlp_dim=mlp, patch_size=cfg["patch_size"],
                       prefix_tokens=prefix, source=f"{path}/config.json")
    if name_or_path in VIT_TEACHERS:
        return VIT_TEACHERS[name_or_path]
    raise PlanError(f"the planner does not know the shapes of the vision teacher {name_or_path!r}; give a local "
                    f"folder with its config.json or one of {sorted(VIT_TEACHERS)}")


def text_arch(name_or_path: str, text_params: float | None = None) -> TextArch:
    """Text encoder shapes: --text-params, a locally readable transformers config (built on the meta device),
    else the table TEXT_ENCODERS."""
    if text_params is not None:
        return TextArch(linear_macs=int(text_params), layers=0, attention_dim=0, params=int(text_params),
                        source=f"--text-params {text_params:.3g} (2 T params; attention not counted)")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        config = None
    if config is not None:
        return _text_arch_from_config(config, name_or_path)
    if name_or_path in TEXT_ENCODERS:
        return TEXT_ENCODERS[name_or_path]
    raise PlanError(f"the planner cannot read the text encoder {name_or_path!r} here (no local config) and does not "
                    f"know it ({sorted(TEXT_ENCODERS)}); pass --text-params N (its matmul parameter count)")


def _text_arch_from_config(config, name: str) -> TextArch:
    from transformers import AutoModel

    with torch.device("meta"):
        if getattr(config, "is_encoder_decoder", False):
            if config.model_type in ("t5", "mt5", "umt5"):
                from transformers import T5EncoderModel

                model = T5EncoderModel(config)
            else:
                model = AutoModel.from_config(config).get_encoder()
        else:
            model = AutoModel.from_config(config)
    inner = getattr(config, "encoder", None) or config
    inner = inner if not isinstance(inner, dict) else argparse.Namespace(**inner)
    layers = getattr(inner, "num_hidden_layers", None) or getattr(inner, "num_layers")
    heads = getattr(inner, "num_attention_heads", None) or getattr(inner, "num_heads")
    hidden = getattr(inner, "hidden_size", None) or getattr(inner, "d_model")
    head_dim = getattr(inner, "head_dim", None) or getattr(inner, "d_kv", None) or hidden // heads
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return TextArch(linear_macs=linear, layers=layers, attention_dim=heads * head_dim,
                    params=sum(p.numel() for p in model.parameters()), source=f"{name} config (read locally)")


# ---- the model's parameter groups -------------------------------------------------------------------------
@dataclass
class ParamCounts:
    total: int  # trainable: denoiser (+ REPA projector)
    adam: int  # params with 2 fp32 moments
    muon: int  # params with 1 fp32 momentum buffer
    largest_unit: int  # the largest FSDP2 unit (a transformer block)
    muon_shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (rows / chunks, cols, chunks)


def param_counts(cfg: C.TrainConfig, repa_dims: tuple[int, int] | None) -> ParamCounts:
    """Build the denoiser (+ REPA projector) on the meta device and split it as the configured optimizer does."""
    from composer_prx.optim.groups import muon_param_groups

    holder = nn.Module()  # parameter names as in PRXModel: denoiser.*, repa_projector.*
    with torch.device("meta"):
        holder.denoiser = PixelDiT(cfg.model.dit)
        if repa_dims is not None:
            from composer_prx.algorithms.repa import attach_repa_projector

            attach_repa_projector(holder, repa_dims[1], width=cfg.model.dit.hidden_dim, hidden=repa_dims[0])
    total = sum(p.numel() for p in holder.parameters())
    unit = max(sum(p.numel() for p in block.parameters()) for block in holder.denoiser.blocks)
    name, settings = C._split_component(cfg.optimizer, "optimizer")
    if name != "muon":
        return ParamCounts(total, total, 0, unit)
    from composer_prx.optim.muon import MuonSettings

    s = MuonSettings(**settings)
    groups = muon_param_groups(holder, muon_params=list(s.muon_params), adam_params=list(s.adam_params),
                               blocks_name=s.blocks_name, grouping=s.grouping, ns_chunks=dict(s.ns_chunks))
    muon = [g for g in groups if g["use_muon"]]
    shapes = [(p.shape[0] // g.get("ns_chunks", 1), p.shape[1], g.get("ns_chunks", 1))
              for g in muon for p in g["params"]]
    n_muon = sum(p.numel() for g in muon for p in g["params"])
    return ParamCounts(total, total - n_muon, n_muon, unit, shapes)


# ---- one stage ------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    name: str
    batches: int
    resolution: int
    global_batch: int
    microbatch: int
    flops: dict[str, float]  # per optimizer step, by part
    memory_gb: dict[str, float]  # per GPU, by part
    activation_gb: float  # per sample without activation checkpointing
    activation_ckpt_gb: float  # per sample with it (+ one block recomputed)
    max_microbatch: int
    max_microbatch_ckpt: int
    notes: list[str]

    @property
    def step_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_flops(self) -> float:
        return self.step_flops * self.batches


def _fraction_in(t_range: tuple[float, float], cfg: C.TrainConfig) -> float:
    """Share of training timesteps in t_range, drawn with the trainer's own sampler (2^16 seeded draws)."""
    lo, hi = (float(v) for v in t_range)
    if (lo, hi) == (0.0, 1.0):
        return 1.0
    from composer_prx import flow

    t = flow.sample_t(1 << 16, cfg.model.time_sampling, generator=torch.Generator().manual_seed(0))
    return float(((t >= lo) & (t <= hi)).float().mean())


def plan_stage(cfg: C.TrainConfig, stage: dict, algorithms: dict[str, dict], counts: ParamCounts, gpus: int,
               gpu: GPU, text: TextArch | None, n_txt: int) -> StagePlan:
    """FLOPs per optimizer step and memory per GPU of one stage (square images at the stage's resolution)."""
    from composer_prx.algorithms.perceptual import target_size
    from composer_prx.algorithms.repa import projector_flops
    from composer_prx.algorithms.tread import tokens_per_block
    from composer_prx.optim.newton_schulz import newton_schulz_flops

    dit: DiTConfig = cfg.model.dit
    res = stage.get("resolution") or cfg.data.resolution
    batch = stage.get("global_batch_size") or cfg.data.global_batch_size
    micro = stage.get("device_train_microbatch_size") or cfg.trainer.device_train_microbatch_size or batch // gpus
    grid = res // dit.patch_size
    n_img = grid * grid
    notes = []
    seen = [n_img] * dit.depth
    if "tread" in algorithms:
        from composer_prx.algorithms.tread import Tread

        seen = tokens_per_block(dit.depth, n_img, Tread(**algorithms["tread"]).routes)
        notes.append(f"TREAD: blocks see {sorted(set(seen))} of {n_img} image tokens")
    flops = {"denoiser fwd+bwd": float(TRAIN_FLOP_FACTOR * dit_matmul_flops(dit, batch, n_img, n_txt, seen))}
    frozen_bytes = 0.0
    act = {}  # per-sample activation elements by part (no checkpointing)
    if text is not None:
        flops["text encoder fwd"] = float(batch * text.forward_flops(n_txt))
        frozen_bytes += text.params * _dtype_bytes(cfg.model.text_encoder.dtype)
    if "repa" in algorithms:
        settings = algorithms["repa"]
        arch = vit_arch(settings["teacher"])
        flops["REPA teacher fwd"] = float(batch * arch.forward_flops(grid, grid))
        block = settings.get("block", 7) % dit.depth
        hidden = settings.get("hidden", 2048)
        flops["REPA projector fwd+bwd"] = TRAIN_FLOP_FACTOR * projector_flops(batch * seen[block], dit.hidden_dim,
                                                                              hidden, arch.dim)
        act["REPA projector"] = seen[block] * (dit.hidden_dim + 4 * hidden)
        frozen_bytes += arch.params * _dtype_bytes(settings.get("teacher_dtype", "float32"))
    if "lpips" in algorithms:
        settings = algorithms["lpips"]
        if settings.get("net", "vgg") != "vgg":
            raise PlanError(f"the planner models LPIPS with net 'vgg' only, got {settings['net']!r}")
        h, w = target_size(res, res, settings.get("resolution"))
        share = _fraction_in(settings.get("t_range", (0.0, 1.0)), cfg)
        flops["LPIPS fwd+bwd"] = INPUT_GRAD_FACTOR * share * batch * vgg16_lpips_flops(h, w)
        act["LPIPS"] = share * vgg16_lpips_activation_elements(h, w)
        frozen_bytes += VGG16_LPIPS_PARAMS * 4
    if "dino_perceptual" in algorithms:
        settings = algorithms["dino_perceptual"]
        arch = vit_arch(settings.get("teacher", "facebook/dinov2-with-registers-base"))
        h, w = target_size(res, res, settings.get("resolution", 224))
        gh, gw = max(1, h // arch.patch_size), max(1, w // arch.patch_size)
        share = _fraction_in(settings.get("t_range", (0.0, 1.0)), cfg)
        flops["DINO fwd+bwd"] = INPUT_GRAD_FACTOR * share * batch * arch.forward_flops(gh, gw)
        act["DINO"] = share * arch.activation_elements(gh, gw)
        frozen_bytes += arch.params * _dtype_bytes(settings.get("teacher_dtype", "float32"))
    if counts.muon_shapes:
        steps = C._split_component(cfg.optimizer, "optimizer")[1].get("ns_steps", 5)
        flops["Muon Newton-Schulz"] = float(sum(k * newton_schulz_flops(m, n, steps, "iterate")
                                                for m, n, k in counts.muon_shapes))

    # memory: FSDP2 shards the fp32 state over the GPUs; units are gathered one at a time (+ one prefetched)
    ema = algorithms.get("ema")
    n_ema = 0
    if ema is not None:
        from composer_prx.algorithms.ema import smoothing_names

        n_ema = len(smoothing_names(ema.get("smoothing", 0.999)))
    c, m = dit.hidden_dim, dit.mlp_dim
    block_elems = [n * (16 * c + 4 * m) + n_txt * 4 * c for n in seen]
    act["denoiser blocks"] = sum(block_elems)
    act["pixels + embeddings"] = 6 * 3 * res * res + n_img * (dit.patch_dim * 2 + (dit.bottleneck_dim or 0) + 3 * c) \
        + n_txt * (dit.text_dim + c)
    per_sample = sum(act.values()) * BF16
    per_sample_ckpt = (per_sample - act["denoiser blocks"] * BF16) + sum(n * c for n in seen) * BF16
    memory = {
        "params fp32 (sharded)": 4 * counts.total / gpus,
        "grads fp32 (sharded)": 4 * counts.total / gpus,
        "optimizer (sharded)": (8 * counts.adam + 4 * counts.muon) / gpus,
        f"EMA x{n_ema} (sharded)": 4 * counts.total * n_ema / gpus,
        "gathered units (2 params + 1 grads, fp32)": 3 * 4 * counts.largest_unit,
        "frozen nets (replicated)": frozen_bytes,
    }
    static = sum(memory.values())
    usable = USABLE_MEMORY * gpu.memory_gb * GB
    recompute = max(block_elems) * BF16  # one block's activations rebuilt at a time during the backward
    fit = max(0, math.floor((usable - static) / per_sample))
    fit_ckpt = max(0, math.floor((usable - static - recompute) / per_sample_ckpt))
    memory["activations at the config's microbatch"] = micro * per_sample
    if batch % gpus:
        notes.append(f"global batch {batch} is not divisible by {gpus} GPUs")
    return StagePlan(name=stage.get("name") or "train", batches=stage["batches"], resolution=res, global_batch=batch,
                     microbatch=micro, flops=flops, memory_gb={k: v / GB for k, v in memory.items()},
                     activation_gb=per_sample / GB, activation_ckpt_gb=per_sample_ckpt / GB, max_microbatch=fit,
                     max_microbatch_ckpt=fit_ckpt, notes=notes)


@dataclass
class Plan:
    stages: list[StagePlan]
    gpus: int
    gpu_name: str
    gpu: GPU
    mfu: float
    usd_per_gpu_hour: float
    hours_budget: float
    text_source: str | None
    # per stage: (encoder forward FLOPs per step if encoded online, embedding bytes per node per step if stored)
    text_tradeoff: list[tuple[float | None, int]] = dataclasses.field(default_factory=list)
    nodes: int = 1

    def hours(self, stage: StagePlan) -> float:
        return stage.total_flops / (self.gpus * self.gpu.peak_tflops * 1e12 * self.mfu) / 3600

    @property
    def total_hours(self) -> float:
        return sum(self.hours(s) for s in self.stages)

    @property
    def mfu_for_budget(self) -> float:
        """MFU at which the whole run takes hours_budget."""
        return sum(s.total_flops for s in self.stages) / (self.gpus * self.gpu.peak_tflops * 1e12
                                                          * self.hours_budget * 3600)


def make_plan(cfg: C.TrainConfig, *, gpus: int, gpu: str, mfu: float = 0.4, usd_per_gpu_hour: float = 2.0,
              hours: float = 24.0, peak_tflops: float | None = None, gpu_mem_gb: float | None = None,
              text_params: float | None = None, text_tokens: int | None = None,
              precomputed_text: bool = False, gpus_per_node: int = 8) -> Plan:
    """The plan of a loaded config on `gpus` GPUs of kind `gpu` (GPUS; peak_tflops / gpu_mem_gb override it)."""
    from composer_prx.algorithms.stages import StageSection, stage_algorithm_settings

    if gpu not in GPUS:
        raise PlanError(f"unknown GPU {gpu!r}; known GPUs: {sorted(GPUS)}; for another GPU pick one of them and "
                        "set its numbers with --peak-tflops and --gpu-mem-gb")
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if not 0.0 < mfu <= 1.0:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    spec = dataclasses.replace(GPUS[gpu], **{k: v for k, v in (("peak_tflops", peak_tflops),
                                                                ("memory_gb", gpu_mem_gb)) if v is not None})
    if cfg.stages:
        stages = [dict(s, batches=StageSection(**s).batches) for s in cfg.stages]
    else:
        from composer.core import Time, TimeUnit

        duration = Time.from_timestring(str(cfg.trainer.max_duration))
        if duration.unit != TimeUnit.BATCH:
            raise PlanError(f"trainer.max_duration {cfg.trainer.max_duration!r}: the planner needs batches (e.g. "
                            "'100000ba')")
        stages = [{"name": cfg.run_name, "batches": int(duration.value), "algorithms": {}}]
    per_stage = [stage_algorithm_settings(cfg.algorithms, s.get("algorithms") or {}) for s in stages]
    repa = next((a["repa"] for a in per_stage if "repa" in a), None)
    repa_dims = None if repa is None else (repa.get("hidden", 2048), vit_arch(repa["teacher"]).dim)
    counts = param_counts(cfg, repa_dims)
    text = None
    if cfg.model.text_encoder is not None and not precomputed_text:
        text = text_arch(cfg.model.text_encoder.name_or_path, text_params)
    n_txt = text_tokens or (cfg.model.text_encoder.max_length if cfg.model.text_encoder is not None else 256)
    plans = [plan_stage(cfg, s, a, counts, gpus, spec, text, n_txt) for s, a in zip(stages, per_stage)]
    nodes = -(-gpus // gpus_per_node)
    tradeoff = []
    if cfg.model.text_encoder is not None:  # online encoder FLOPs vs streaming precomputed embeddings
        from composer_prx.data.text_embeddings import text_embedding_bytes_per_step

        try:
            online = text or text_arch(cfg.model.text_encoder.name_or_path, text_params)
        except PlanError:
            online = None
        for stage in plans:
            tradeoff.append((None if online is None else float(stage.global_batch * online.forward_flops(n_txt)),
                             text_embedding_bytes_per_step(stage.global_batch, n_txt, cfg.model.dit.text_dim, nodes)))
    return Plan(plans, gpus, gpu, spec, mfu, usd_per_gpu_hour, hours, text.source if text else None, tradeoff, nodes)


# ---- output ---------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float, digits: int = 2) -> str:
    """Fixed decimals, or two significant digits for values too small to show that way."""
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10**-digits else f"{value:.2g}"


def render(plan: Plan) -> str:
    """The plan as markdown tables: FLOPs per step, time and cost, memory per GPU."""
    names = [f"{s.name} ({s.resolution} px, batch {s.global_batch}, {s.batches} steps)" for s in plan.stages]
    parts = sorted({k for s in plan.stages for k in s.flops},
                   key=lambda k: -max(s.flops.get(k, 0) for s in plan.stages))
    rows = [[k] + [_num(s.flops[k] / 1e15) if k in s.flops else "-" for s in plan.stages] for k in parts]
    rows.append(["**total per step**"] + [f"**{_num(s.step_flops / 1e15)}**" for s in plan.stages])
    out = [f"Plan: {plan.gpus} x {plan.gpu_name} (bf16 peak {plan.gpu.peak_tflops:g} TFLOP/s, "
           f"{plan.gpu.memory_gb:g} GB), MFU {plan.mfu:g}, ${plan.usd_per_gpu_hour:g}/GPU-hour", "",
           "FLOPs per optimizer step (PFLOP, global batch)", _table(["part"] + names, rows), ""]
    rows = []
    for s in plan.stages:
        hours = plan.hours(s)
        rows.append([s.name, _num(s.total_flops / 1e18, 1), _num(hours), f"{hours * plan.gpus:.0f}",
                     f"{hours * plan.gpus * plan.usd_per_gpu_hour:,.0f}"])
    total = sum(s.total_flops for s in plan.stages)
    rows.append(["**total**", f"**{_num(total / 1e18, 1)}**", f"**{_num(plan.total_hours)}**",
                 f"**{plan.total_hours * plan.gpus:.0f}**",
                 f"**{plan.total_hours * plan.gpus * plan.usd_per_gpu_hour:,.0f}**"])
    out += ["Time and cost", _table(["stage", "EFLOP", "hours", "GPU-hours", "USD"], rows), "",
            f"MFU needed to fit the whole run in {plan.hours_budget:g} h: {_num(plan.mfu_for_budget, 3)}", ""]
    keys = list(dict.fromkeys(k for s in plan.stages for k in s.memory_gb))
    rows = [[k] + [_num(s.memory_gb[k], 1) if k in s.memory_gb else "-" for s in plan.stages] for k in keys]
    rows.insert(-1, ["config's device microbatch"] + [str(s.microbatch) for s in plan.stages])
    rows.append(["**total at the config's microbatch**"]
                + [f"**{sum(s.memory_gb.values()):.1f}**" for s in plan.stages])
    rows.append(["activations per sample (no / with activation checkpointing)"]
                + [f"{_num(s.activation_gb)} / {_num(s.activation_ckpt_gb)}" for s in plan.stages])
    rows.append([f"largest microbatch in {USABLE_MEMORY:.0%} of {plan.gpu.memory_gb:g} GB (no / with checkpointing)"]
                + [f"{s.max_microbatch} / {s.max_microbatch_ckpt}" for s in plan.stages])
    out += ["Memory per GPU (GB) under FSDP2", _table(["part"] + [s.name for s in plan.stages], rows), ""]
    if plan.text_tradeoff:
        rows = [[s.name, "-" if f is None else _num(f / 1e15), f"{b / 1e6:,.0f}",
                 f"{b * s.batches / 1e12:,.1f}"] for s, (f, b) in zip(plan.stages, plan.text_tradeoff)]
        out += [f"Captions: encode online, or stream embeddings precomputed by `convert --text-encoder` "
                f"({plan.nodes} nodes, bf16, max_length tokens: an upper bound)",
                _table(["stage", "encoder PFLOP per step (online)", "MB per node per step (stored)",
                        "TB per node over the stage"], rows), ""]
    notes = [f"- {s.name}: {n}" for s in plan.stages for n in s.notes]
    if plan.text_source:
        notes.append(f"- text encoder: {plan.text_source}")
    out += ["Notes"] + notes + [
        "- denoiser: 3 x forward matmul FLOPs (every Linear and attention product; norms, activations, RoPE and "
        "elementwise ops not counted), routed blocks with the kept tokens only",
        "- frozen nets on x_hat (LPIPS, DINO): x forward + x_hat forward + x_hat input gradient (no weight gradients)",
        "- teachers: ViT 2 N (4D^2 + 2DM) L + 4 N^2 D L + patch embedding; LPIPS: VGG16's 13 convs up to relu5_3",
        "- activations (bf16): per block and image token 16C + 4M, per text token 4C; ViT 16D + 2M per token and "
        "block; checkpointing keeps each block's input (C per token) and recomputes one block at a time",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for composer_prx.train")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", required=True, help=f"one of {sorted(GPUS)}")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.0)
    parser.add_argument("--hours", type=float, default=24.0, help="time budget for the needed-MFU line")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--gpu-mem-gb", type=float, default=None, help="override the GPU's memory")
    parser.add_argument("--text-params", type=float, default=None, help="text encoder matmul parameters")
    parser.add_argument("--text-tokens", type=int, default=None, help="caption tokens (default max_length)")
    parser.add_argument("--precomputed-text", action="store_true", help="batches carry text_emb: no encoder FLOPs")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for the bytes each node streams")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = C.load_config(args.config, args.overrides)
        plan = make_plan(cfg, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu, usd_per_gpu_hour=args.usd_per_gpu_hour,
                         hours=args.hours, peak_tflops=args.peak_tflops, gpu_mem_gb=args.gpu_mem_gb,
                         text_params=args.text_params, text_tokens=args.text_tokens,
                         precomputed_text=args.precomputed_text, gpus_per_node=args.gpus_per_node)
    except (C.ConfigError, PlanError) as err:
        parser.exit(2, f"error: {err}\n")
    print(render(plan))
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
