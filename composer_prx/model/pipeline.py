"""PRXModel: the ComposerModel that trains a pixel-space x-prediction denoiser with flow matching.

    batch {"image" [B,3,H,W] in [-1,1], "caption" list[str] | "text_emb" [B,T,C] + "text_mask" [B,T]}
      -> text (frozen encoder, caption dropout to "no text")  -> t ~ logit-normal, eps ~ N(0, I)
      -> x_t = (1-t) x + t eps -> x_pred = denoiser(x_t, t, text) -> v_pred = (x_t - x_pred)/max(t, 0.05)
      -> FlowOutput (read by algorithms from state.outputs) -> loss = mean ||v_pred - (x_t - x)/max(t, 0.05)||^2

The dropped ("null") prompt is the empty text: every text token masked out, so unconditional
predictions see the image tokens alone.  The same null prompt serves classifier-free guidance.
The denoiser gets text_mask=None when the mask is known on the host to be all True (a batch without
"text_mask", or a mask in host memory), so the attention can skip it without a device sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from composer.models import ComposerModel
from torch import Tensor, nn
from torchmetrics import Metric

from composer_prx import flow
from composer_prx.data.imaging import normalise_image
from composer_prx.model.dit import TRAIN_FLOP_FACTOR
from composer_prx.model.text import TextEncoder

GUIDANCE_MODES = ("none", "cfg", "tread")
DEFAULT_GUIDANCE_SCALE = {"none": 1.0, "cfg": 4.0, "tread": 1.5}  # tread: CompVis TREAD's self-guidance scale


@dataclass
class FlowOutput:
    """What one training forward computed; algorithms read it instead of recomputing.

    (README, Contracts for your own model, 1.)
    """

    x: Tensor  # [B, 3, H, W] clean target in [-1, 1]
    x_t: Tensor  # [B, 3, H, W] noised input
    t: Tensor  # [B]
    x_pred: Tensor  # [B, 3, H, W]
    v_pred: Tensor  # [B, 3, H, W]
    v_target: Tensor  # [B, 3, H, W] (x_t - x) / max(t, t_min), = eps - x for t >= t_min
    text: Tensor  # [B, T, C] text embeddings given to the denoiser
    text_mask: Tensor  # [B, T] bool, False where padded or dropped


class BinnedFlowLoss(Metric):
    """Mean validation v-loss at one fixed timestep (or over all bins when t_value is None)."""

    full_state_update = False

    def __init__(self, t_value: float | None = None):
        super().__init__()
        self.t_value = t_value
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, per_sample: Tensor) -> None:
        self.total += per_sample.detach().double().sum()
        self.count += per_sample.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class PRXModel(ComposerModel):
    """Flow-matching text-to-image model around any denoiser(x_t, t, text, text_mask) -> x_pred.

    The text encoder is a frozen helper held outside the module tree (not in state_dict, not in the
    optimizer, not sharded); batches with precomputed "text_emb" need none.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        text_encoder: TextEncoder | None = None,
        *,
        time_sampling: flow.TimeSampling = flow.TimeSampling(),
        caption_dropout: float = 0.1,
        t_min: float = flow.T_MIN,
        eval_t_values: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
        eval_seed: int = 1234,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got {t_min}")
        if any(not 0.0 < t <= 1.0 for t in eval_t_values):
            raise ValueError(f"eval_t_values must lie in (0, 1], got {eval_t_values}")
        patch = getattr(getattr(denoiser, "cfg", None), "patch_size", None)
        self.patch_size: int = patch or 1
        self.denoiser = denoiser
        self._frozen = {"text_encoder": text_encoder}  # a plain dict: not a submodule (README, Contracts, 5)
        self.time_sampling = time_sampling
        self.caption_dropout = caption_dropout
        self.t_min = t_min
        self.eval_t_values = tuple(eval_t_values)
        self.eval_seed = eval_seed
        self._train_tokens: list[int] = []
        self._train_text_len = 0
        self._encoder_flops: dict[tuple[int, int], int] = {}  # [B, T] -> text encoder forward FLOPs
        self.val_metrics = {"val_loss": BinnedFlowLoss()} | {
            f"val_loss_t{t:.2f}": BinnedFlowLoss(t) for t in self.eval_t_values
        }

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self._frozen["text_encoder"]

    # ---- conditioning ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Prompts -> (text [B, T, C], mask [B, T]) with the frozen encoder."""
        if self.text_encoder is None:
            raise ValueError(
                "this PRXModel has no text encoder, so it cannot encode captions; configure "
                "model.text_encoder or give batches with precomputed 'text_emb' and 'text_mask'"
            )
        return self.text_encoder.encode(list(prompts), device=device)

    def text_conditioning(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        if "text_emb" in batch:  # precomputed (bf16 from convert --text-encoder): fp32 like the encoder's output
            text = batch["text_emb"].to(device).float()
            mask = batch.get("text_mask")
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
            return text, mask
        if "caption" not in batch:
            raise KeyError(f"batch needs 'caption' or 'text_emb'; it has keys {sorted(batch)}")
        return self.encode_prompts(batch["caption"], device)

    @staticmethod
    def _all_real(batch: dict, mask: Tensor) -> bool:
        """True when every text token is known, without a device sync, to be real (nothing to mask)."""
        if "text_emb" in batch and batch.get("text_mask") is None:
            return True  # the loader says there is no padding
        return mask.device.type == "cpu" and bool(mask.all())  # a host tensor: all() costs no device sync

    # ---- training -------------------------------------------------------------------------------
    @staticmethod
    def images(batch: dict) -> Tensor:
        """batch["image"] as float in [-1, 1]; uint8 pixels (a loader with image_dtype="uint8") are normalised here, on the device."""
        x = batch["image"]
        return normalise_image(x) if x.dtype == torch.uint8 else x

    def forward(self, batch: dict) -> FlowOutput:
        x = self.images(batch)
        if x.dim() != 4:
            raise ValueError(f"batch['image'] must be [B, C, H, W], got shape {tuple(x.shape)}")
        b, device = x.shape[0], x.device
        text, mask = self.text_conditioning(batch, device)
        all_real = self._all_real(batch, mask)
        if self.training and self.caption_dropout > 0:
            keep = torch.rand(b, device=device) >= self.caption_dropout
            mask = mask & keep[:, None]
            all_real = all_real and keep.device.type == "cpu" and bool(keep.all())
        t = flow.sample_t(b, self.time_sampling, device=device)
        eps = torch.randn_like(x)
        out = self._denoise(x, eps, t, text, mask, all_real)
        if self.training:  # what each block really processed in this training forward (TREAD-aware FLOPs)
            self._train_tokens = [getattr(block, "tokens_seen", 0) for block in getattr(self.denoiser, "blocks", ())]
            self._train_text_len = text.shape[1]
        return out

    def call_denoiser(self, x_t: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None) -> Tensor:
        """denoiser(x_t, t, text, mask); t travels as its fp32 bits (int32) to a denoiser with
        `time_as_bits`, so FSDP2's mixed-precision input cast (floating tensors only) cannot round it."""
        if getattr(self.denoiser, "time_as_bits", False):
            t = t.float().view(torch.int32)
        return self.denoiser(x_t, t, text, text_mask)

    def _denoise(self, x: Tensor, eps: Tensor, t: Tensor, text: Tensor, mask: Tensor, all_real: bool) -> FlowOutput:
        x_t = flow.add_noise(x, eps, t)
        x_pred = self.call_denoiser(x_t, t, text, None if all_real else mask)
        v_pred = flow.x_to_v(x_t, x_pred, t, self.t_min)
        return FlowOutput(x=x, x_t=x_t, t=t, x_pred=x_pred, v_pred=v_pred,
                          v_target=flow.v_target(x_t, x, t, self.t_min),
                          text=text, text_mask=mask)

    def loss(self, outputs: FlowOutput, batch: dict) -> Tensor:
        return flow.v_loss(outputs.v_pred, outputs.v_target)

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_forward(self, batch: dict, outputs=None) -> dict[str, Tensor]:
        """Per-sample v-loss at each fixed t in eval_t_values, with seeded noise (same every eval)."""
        x = self.images(batch)
        b, device = x.shape[0], x.device
        text, mask = self.text_conditioning(batch, device)
        all_real = self._all_real(batch, mask)
        gen = torch.Generator(device=device).manual_seed(self.eval_seed)
        losses = {}
        for t_value in self.eval_t_values:
            eps = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
            t = torch.full((b,), t_value, device=device)
            out = self._denoise(x, eps, t, text, mask, all_real)
            losses[f"val_loss_t{t_value:.2f}"] = flow.v_loss(out.v_pred, out.v_target, reduction="none")
        return losses

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch: dict, outputs: dict[str, Tensor], metric: Metric) -> None:
        if metric.t_value is None:
            metric.update(torch.cat(list(outputs.values())))
        else:
            metric.update(outputs[f"val_loss_t{metric.t_value:.2f}"])

    # ---- throughput -----------------------------------------------------------------------------
    def flops_per_batch(self, batch: dict) -> int:
        """FLOPs of one training batch: TRAIN_FLOP_FACTOR (3) x the denoiser's forward matmul FLOPs (forward + backward,
        counting the tokens each block really saw) + text_encoder_flops(batch) (forward only, frozen)."""
        x = batch["image"]
        b, _, h, w = x.shape
        n_img = (h // self.patch_size) * (w // self.patch_size)
        n_txt = batch["text_emb"].shape[1] if "text_emb" in batch else self._train_text_len
        if not hasattr(self.denoiser, "matmul_flops"):
            raise NotImplementedError("the denoiser has no matmul_flops(batch, n_img, n_txt, tokens_per_block)")
        seen = [n or n_img for n in self._train_tokens] or None
        return TRAIN_FLOP_FACTOR * self.denoiser.matmul_flops(b, n_img, n_txt, seen) + self.text_encoder_flops(batch)

    def text_encoder_flops(self, batch: dict) -> int:
        """Forward FLOPs of the online text encoder on the batch's captions (0 with precomputed "text_emb").

        ``TextEncoder.forward_flops`` on [B, T] (T = tokens of the last training batch), once per shape.
        """
        if "text_emb" in batch or self.text_encoder is None or not self._train_text_len:
            return 0
        shape = (len(batch["caption"]), self._train_text_len)
        if shape not in self._encoder_flops:
            self._encoder_flops[shape] = self.text_encoder.forward_flops(*shape)
        return self._encoder_flops[shape]

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        size: int | tuple[int, int] = 256,
        steps: int = 25,
        guidance: str = "cfg",
        guidance_scale: float | None = None,
        seed: int | list[int] = 0,
        method: str = "euler",
        shift: float | None = None,
        text: tuple[Tensor, Tensor] | None = None,
        tread_route: Any = None,
    ) -> Tensor:
        """Sample images [B, 3, H, W] in [0, 1] from prompts (or precomputed (text, mask)).

        guidance: "none"; "cfg"  out = uncond + w (cond - uncond);
        "tread" (self-guidance)  out = routed + w (dense - routed), both with the prompt, routed over
        tread_route (a (start, end, ratio) triple or a list of routes; default the trained route).
        guidance_scale w defaults to DEFAULT_GUIDANCE_SCALE[guidance] (cfg 4.0, tread 1.5).
        seed: one seed for the batch's noise, or one per sample (sample i's noise then depends on seed[i]
        only, not on its batch). The sampler state stays fp32 under any autocast.
        """
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        scale = DEFAULT_GUIDANCE_SCALE[guidance] if guidance_scale is None else guidance_scale
        height, width = (size, size) if isinstance(size, int) else size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"size {height}x{width} must be a multiple of the patch size {self.patch_size}")
        routes = self.guidance_routes(tread_route) if guidance == "tread" else None
        device = next(self.denoiser.parameters()).device
        if text is None:
            if prompts is None:
                raise ValueError("generate needs prompts or precomputed text=(emb, mask)")
            text = self.encode_prompts(prompts, device)
        all_real = text[1].device.type == "cpu" and bool(text[1].all())  # host tensor: no device sync
        cond, cond_mask = text[0].to(device), text[1].to(device).bool()
        prompt_mask = None if all_real else cond_mask  # guidance none / tread: nothing to mask
        b = cond.shape[0]
        noise, gen = self._noise(seed, (b, 3, height, width), device)

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:  # fp32 out whatever the autocast: guidance in fp32
            if guidance == "none":
                return self.call_denoiser(x_t, t, cond, prompt_mask).float()
            if guidance == "cfg":
                both = self.call_denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]),
                                          torch.cat([cond_mask, torch.zeros_like(cond_mask)]))
                x_cond, x_uncond = both.float().chunk(2)
                return flow.guide(x_cond, x_uncond, scale)
            with routing.suspended():
                dense = self.call_denoiser(x_t, t, cond, prompt_mask).float()
            routed = self.call_denoiser(x_t, t, cond, prompt_mask).float()
            return flow.guide(dense, routed, scale)

        was_training = self.training
        self.eval()
        try:
            with contextlib.ExitStack() as stack:
                if routes is not None:  # hooks planned once for the whole loop; a fresh selection per call
                    from composer_prx.algorithms.tread import tread_routing

                    routing = stack.enter_context(tread_routing(self.denoiser, routes=routes, generator=gen))
                shift = self.time_sampling.shift if shift is None else shift
                images = flow.sample(denoise, noise, steps, shift=shift, method=method)
        finally:
            self.train(was_training)
        return ((images.clamp(-1, 1) + 1) / 2).float()

    @staticmethod
    def _noise(seed: int | list[int], shape: tuple[int, ...], device: torch.device
               ) -> tuple[Tensor, torch.Generator]:
        """fp32 noise [B, 3, H, W] from one seed, or row i from its own seed[i]; and the generator for routing."""
        if isinstance(seed, int):
            gen = torch.Generator(device=device).manual_seed(seed)
            return torch.randn(shape, generator=gen, device=device), gen
        seeds = [int(s) for s in seed]
        if len(seeds) != shape[0]:
            raise ValueError(f"generate got {len(seeds)} seeds for {shape[0]} prompts; give one seed or one per prompt")
        rows = []
        for s in seeds:
            gen = torch.Generator(device=device).manual_seed(s)
            rows.append(torch.randn(shape[1:], generator=gen, device=device))
        return torch.stack(rows), torch.Generator(device=device).manual_seed(seeds[0])

    def guidance_routes(self, tread_route: Any = None) -> list:
        """The routes TREAD self-guidance uses: `tread_route` if given, else the ones training recorded."""
        from composer_prx.algorithms.tread import parse_routes, plan_routes, trained_routes

        if tread_route is not None:
            return plan_routes(self, parse_routes(tread_route))
        routes = trained_routes(self)
        if routes is None:
            raise ValueError(
                "guidance='tread' routes the denoiser like its training did, but this model has no recorded TREAD "
                "route (it was not trained with algorithms.tread, or was built outside that run); pass "
                "tread_route=(route_start, route_end, ratio)"
            )
        return routes
