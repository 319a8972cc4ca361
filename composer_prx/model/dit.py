"""PixelDiT: PRX's pixel-space denoiser, predicting the clean image (JiT, Li & He 2025).

    image [B,3,H,W] --patchify p--> [B,N,3p^2] --Linear--> [B,N,256] --Linear--> [B,N,C]
          --blocks: x = block(x, ctx) for each block--> adaLN final layer --> [B,N,3p^2] --> x_pred [B,3,H,W]

Each block (weight for weight PRX's `PRXBlock`, see composer_prx/export.py for the diffusers names):
adaLN-zero modulation from the timestep (+ resolution) embedding; attention in which image tokens
(queries) attend to [text tokens; image tokens] (keys/values), bias-free projections, RMSNorm on image
queries, image keys and text keys, 2D RoPE (positions from 0) on image queries and keys; then a
bias-free gated MLP  down(gelu_tanh(gate h) * up h)  of width int(C * mlp_ratio).

Denoiser protocol (what TREAD, REPA and other algorithms rely on; README "Contracts for your own
model"): `denoiser.blocks` is an nn.ModuleList, each block is called as `block(x, ctx)` with x [B, N, C]
image tokens and `ctx` a `BlockContext` whose `select(idx [B, K])` restricts the per-token fields (RoPE)
to those tokens; per-image fields (timestep embedding, text tokens) pass through unchanged.
`denoiser.routing` is None unless an algorithm routes tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIME_FREQ_DIM = 256  # sinusoidal features of the timestep (and 128 + 128 of the resolution), as in PRX


@dataclass
class DiTConfig:
    """Shape of the denoiser (diffusers `PRXTransformer2DModel` names in brackets where they differ).

    bottleneck_dim [bottleneck_size]: patch_dim -> bottleneck -> hidden patch embedding (None: one Linear).
    rope_theta [theta]: RoPE base; each of the two axes gets head_dim / 2 dims [axes_dim].
    resolution_embeds: add an embedding of the image (H, W) in pixels to the timestep embedding (PRX pixel).
    text_norm: a learned RMSNorm on the text embeddings before the text projection (not in PRX).
    rope_grid: None (PRX): RoPE positions are patch indices from 0, so a position learned at one
        resolution means another place at the next.  An int G: positions are the same fraction of the
        image at every resolution, patch i of g at (i + 1/2) G/g - 1/2 (= i when g = G), for stages
        that change resolution on a small model (the quickstart).  Not in PRX; such models do not export.
    """

    patch_size: int = 32
    hidden_dim: int = 1152  # [hidden_size]
    depth: int = 16
    num_heads: int = 16
    mlp_ratio: float = 3.5
    bottleneck_dim: int | None = 256
    text_dim: int = 2304  # [context_in_dim]
    in_channels: int = 3
    rope_theta: float = 10000.0
    resolution_embeds: bool = True
    text_norm: bool = False
    rope_grid: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}")
        if (self.hidden_dim // self.num_heads) % 4:
            raise ValueError(
                f"head dim {self.hidden_dim // self.num_heads} must be a multiple of 4 for 2D RoPE; "
                "change hidden_dim or num_heads"
            )
        for name in ("patch_size", "depth", "text_dim", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.bottleneck_dim is not None and self.bottleneck_dim < 1:
            raise ValueError(f"DiTConfig.bottleneck_dim must be >= 1 or None (no bottleneck), got {self.bottleneck_dim}")
        if self.rope_grid is not None and self.rope_grid < 1:
            raise ValueError(f"DiTConfig.rope_grid must be >= 1 or None (patch-index positions), got {self.rope_grid}")
        if self.mlp_dim < 1:
            raise ValueError(f"DiTConfig.mlp_ratio {self.mlp_ratio} gives an MLP width of {self.mlp_dim}; use a larger ratio")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        """int(C * mlp_ratio), truncated as PRX does."""
        return int(self.hidden_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2


@dataclass
class BlockContext:
    """What every block receives besides the image tokens.

    temb [B, C] and text [B, T, C] (+ text_mask [B, T], True = real token) are per image;
    rope [B or 1, N, head_dim/2] (complex rotations) is per token and follows `select`.
    """

    temb: Tensor
    text: Tensor
    text_mask: Tensor | None
    rope: Tensor

    def select(self, idx: Tensor) -> BlockContext:
        """Restrict per-token fields to idx [B, K] (token indices into the current N)."""
        rope = self.rope.expand(idx.shape[0], -1, -1)
        return replace(self, rope=rope.gather(1, idx.unsqueeze(-1).expand(-1, -1, rope.shape[-1])))


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of the patch size {patch}; resize or crop to a multiple of {patch}"
        )
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, patch: int, height: int, width: int) -> Tensor:
    """[B, (H/p)(W/p), C p p] -> [B, C, H, W]."""
    b, _, dim = tokens.shape
    c = dim // (patch * patch)
    gh, gw = height // patch, width // patch
    x = tokens.reshape(b, gh, gw, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def rope_positions(n: int, ref: int | None, device: torch.device) -> Tensor:
    """Positions of n patches along an axis: i (PRX), or (i + 1/2) ref/n - 1/2 (the same image fraction at any n)."""
    idx = torch.arange(n, device=device, dtype=torch.float32)
    return idx if ref is None else (idx + 0.5) * (ref / n) - 0.5


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device: torch.device,
            ref_grid: int | None = None) -> Tensor:
    """2D RoPE as complex rotations [1, N, head_dim/2]: the first half of the pairs turn with the row, the rest with the column.

    Pair k of an axis (head_dim/4 pairs each) turns by angle pos * theta^(-k / (head_dim/4)), pos = the
    token's row (or column) patch index counted from 0, as in PRX (axes_dim = [head_dim/2, head_dim/2]);
    with ref_grid, pos is rescaled to a ref_grid-patch image (`rope_positions`).
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # [hd/4]
    rows = rope_positions(grid_h, ref_grid, device)
    cols = rope_positions(grid_w, ref_grid, device)
    pos_r, pos_c = torch.meshgrid(rows, cols, indexing="ij")  # [gh, gw]
    angles = torch.cat([pos_r.reshape(-1, 1) * freqs, pos_c.reshape(-1, 1) * freqs], dim=-1)  # [N, hd/2]
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(0)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, H, N, D] with pairs (2k, 2k+1) rotated by rope [B or 1, N, D/2] (one complex multiply)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rope.unsqueeze(1)).flatten(-2).type_as(x)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos, sin] of scale * t: [B] -> [B, dim], frequencies max_period^(-j / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0) * scale
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _mlp_embedder(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class DiTBlock(nn.Module):
    """adaLN-zero transformer block; image queries attend to [text; image] keys and values."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.text_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.text_k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.gate_proj = nn.Linear(dim, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(dim, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, dim, bias=False)
        self.modulation = nn.Linear(dim, 6 * dim)
        self.tokens_seen = 0  # image tokens per sample in the last call (for honest FLOP counts)
        self.compiled: str | None = None  # torch.compile backend of forward (PixelDiT.compile_blocks); hooks stay eager

    def _heads(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, H, N, D]."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        self.tokens_seen = x.shape[1]
        return (_compiled_block_compute(self.compiled) if self.compiled else DiTBlock.compute)(self, x, ctx)

    def compute(self, x: Tensor, ctx: BlockContext) -> Tensor:
        """The block's computation, x [B, N, C] -> [B, N, C] (``forward`` without its bookkeeping)."""
        b, n, c = x.shape
        mod = self.modulation(F.silu(ctx.temb)).unsqueeze(1)  # [B, 1, 6C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)

        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = apply_rope(self.q_norm(self._heads(q)), ctx.rope)
        k = apply_rope(self.k_norm(self._heads(k)), ctx.rope)
        text_k, text_v = self.text_kv(ctx.text).chunk(2, dim=-1)
        k = torch.cat([self.text_k_norm(self._heads(text_k)), k], dim=2)  # [B, H, T + N, D]
        v = torch.cat([self._heads(text_v), self._heads(v)], dim=2)
        mask = None
        if ctx.text_mask is not None:
            image_mask = ctx.text_mask.new_ones(b, n)
            mask = torch.cat([ctx.text_mask, image_mask], dim=1)[:, None, None, :]  # [B, 1, 1, T + N]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = torch.addcmul(x, gate1, self.proj(attn.transpose(1, 2).reshape(b, n, c)))

        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        mlp = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return torch.addcmul(x, gate2, mlp)

    def matmul_flops(self, batch: int, n_img: int, n_txt: int) -> int:
        """Forward matmul FLOPs of one call (block_matmul_flops with this block's widths)."""
        return block_matmul_flops(self.proj.in_features, self.down_proj.in_features, batch, n_img, n_txt)


@functools.cache
def _compiled_block_compute(backend: str):
    """torch.compile(DiTBlock.compute), made once per backend and shared by every block (the block is an
    argument, so one compiled graph serves all blocks of a shape, and copies of a model compile their own)."""
    return torch.compile(DiTBlock.compute, backend=backend)


class PixelDiT(nn.Module):
    """x-prediction denoiser on pixels: forward(x_t [B,3,H,W], t [B], text [B,T,Ct], text_mask) -> x_pred."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_dim
        if cfg.bottleneck_dim is None:
            self.patch_in = nn.Identity()
            self.patch_proj = nn.Linear(cfg.patch_dim, dim)
        else:
            self.patch_in = nn.Linear(cfg.patch_dim, cfg.bottleneck_dim)
            self.patch_proj = nn.Linear(cfg.bottleneck_dim, dim)
        self.time_mlp = _mlp_embedder(TIME_FREQ_DIM, dim)
        self.resolution_mlp = _mlp_embedder(TIME_FREQ_DIM, dim) if cfg.resolution_embeds else None
        self.text_norm = nn.RMSNorm(cfg.text_dim, eps=1e-6) if cfg.text_norm else nn.Identity()
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, cfg.patch_dim)
        self.routing = None  # published by token-routing algorithms (README "Contracts for your own model")
        self.reset_parameters()

    @classmethod
    def from_diffusers(cls, path_or_model) -> PixelDiT:
        """A PixelDiT with the weights of a diffusers `PRXTransformer2DModel` (a folder or the model itself)."""
        from composer_prx.export import pixeldit_from_diffusers

        return pixeldit_from_diffusers(path_or_model if isinstance(path_or_model, nn.Module) else Path(path_or_model))

    def reset_parameters(self) -> None:
        """Xavier linears; zero adaLN modulations and output layer (adaLN-zero: blocks start as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_mlp, self.resolution_mlp):
            if embedder is not None:
                nn.init.normal_(embedder[0].weight, std=0.02)
                nn.init.normal_(embedder[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for layer in (self.final_modulation, self.final_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def context(self, t: Tensor, text: Tensor, text_mask: Tensor | None, grid_h: int, grid_w: int) -> BlockContext:
        """Build the block context: timestep (+ resolution) embedding, projected text, RoPE tables."""
        if text.shape[-1] != self.cfg.text_dim:
            raise ValueError(
                f"text embeddings have width {text.shape[-1]} but the denoiser expects text_dim="
                f"{self.cfg.text_dim}; set model.dit.text_dim to the text encoder's hidden size"
            )
        dtype = self.patch_proj.weight.dtype
        temb = self.time_mlp(timestep_embedding(t, TIME_FREQ_DIM).to(dtype))
        if self.resolution_mlp is not None:  # temb += MLP([sin features of H; of W]) with H, W in pixels
            p = self.cfg.patch_size
            size = torch.tensor([grid_h * p, grid_w * p], device=t.device, dtype=torch.float32)
            features = timestep_embedding(size, TIME_FREQ_DIM // 2, scale=1.0).reshape(1, TIME_FREQ_DIM)
            temb = temb + self.resolution_mlp(features.to(dtype))
        text_tokens = self.text_proj(self.text_norm(text))
        if text_mask is not None:
            text_mask = text_mask.bool()
            if text_mask.device.type == "cpu" and bool(text_mask.all()):  # skip an all-real mask; no device sync
                text_mask = None
        rope = rope_2d(grid_h, grid_w, self.cfg.head_dim, self.cfg.rope_theta, t.device, self.cfg.rope_grid)
        return BlockContext(temb=temb, text=text_tokens, text_mask=text_mask, rope=rope)

    # PRXModel passes t as its fp32 bits (int32): FSDP2's mixed-precision policy casts floating inputs
    # to bf16, which would round t by up to ~2e-3 before the 1000 t embedding.
    time_as_bits = True

    def forward(self, x_t: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """x_t [B, 3, H, W], t [B] in [0, 1] (fp32, or its bits as int32), text [B, T, text_dim] -> x [B, 3, H, W]."""
        if t.dtype == torch.int32:
            t = t.view(torch.float32)
        _, _, height, width = x_t.shape
        p = self.cfg.patch_size
        x = self.patch_proj(self.patch_in(patchify(x_t, p)))  # [B, N, C]
        ctx = self.context(t, text, text_mask, height // p, width // p)
        for block in self.blocks:
            x = block(x, ctx)
        shift, scale = self.final_modulation(F.silu(ctx.temb)).unsqueeze(1).chunk(2, dim=-1)
        x = self.final_proj(torch.addcmul(shift, self.final_norm(x), 1 + scale))
        return unpatchify(x, p, height, width)

    def compile_blocks(self, backend: str | None = "inductor") -> None:
        """Run each transformer block's computation through torch.compile(backend=...) (model.compile: true);
        None: eager again.

        Only the blocks: the modules, their parameter names and their hooks (FSDP2's all-gathers, TREAD's
        gather / scatter) stay as they are and run eagerly around the compiled code.
        """
        for block in self.blocks:
            block.compiled = backend

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP2 (Composer asks the ComposerModel's children): each transformer block is its own unit."""
        return any(module is block for block in self.blocks)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """With activation checkpointing on, each transformer block recomputes its activations."""
        return self.fsdp_wrap_fn(module)

    def matmul_flops(self, batch: int, n_img: int, n_txt: int, tokens_per_block: list[int] | None = None) -> int:
        """Forward matmul FLOPs (dit_matmul_flops of this denoiser's config)."""
        return dit_matmul_flops(self.cfg, batch, n_img, n_txt, tokens_per_block)


# ---- FLOPs: the one formula the trainer's throughput (PRXModel.flops_per_batch) and the planner use ----
TRAIN_FLOP_FACTOR = 3  # forward + backward = 3 x forward matmul FLOPs (the backward has input and weight gradients)


def block_matmul_flops(hidden: int, mlp_dim: int, batch: int, n_img: int, n_txt: int) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of one DiTBlock call with n_img image and n_txt text tokens.

    modulation 6C^2 per image; qkv 3C^2, out C^2, MLP 3Cm per image token; text kv 2C^2 per text token;
    attention (q k^T and p v) 2 (n_txt + n_img) C per image token.
    """
    c, m = hidden, mlp_dim
    per_image = c * 6 * c
    per_image_token = c * 3 * c + c * c + 3 * c * m + 2 * (n_txt + n_img) * c
    per_text_token = c * 2 * c
    return 2 * batch * (per_image + n_img * per_image_token + n_txt * per_text_token)


def dit_matmul_flops(cfg: DiTConfig, batch: int, n_img: int, n_txt: int,
                     tokens_per_block: list[int] | None = None) -> int:
    """Forward matmul FLOPs of PixelDiT (every Linear and attention product); tokens_per_block gives the
    image tokens each block processed (token routing), default n_img everywhere.

    Outside the blocks: patch embedding P*B' + B'*C (or P*C) and output C*P per image token, text
    projection Ct*C per text token, timestep MLP 256C + C^2 and final modulation 2C^2 per image,
    resolution MLP 256C + C^2 once (one size per batch).
    """
    c = cfg.hidden_dim
    tokens_per_block = tokens_per_block or [n_img] * cfg.depth
    if len(tokens_per_block) != cfg.depth:
        raise ValueError(f"tokens_per_block has {len(tokens_per_block)} entries for a denoiser of depth {cfg.depth}")
    if cfg.bottleneck_dim is None:
        patch = cfg.patch_dim * c
    else:
        patch = cfg.patch_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * c
    per_image = TIME_FREQ_DIM * c + c * c + c * 2 * c
    flops = 2 * batch * (per_image + n_img * (patch + c * cfg.patch_dim) + n_txt * cfg.text_dim * c)
    if cfg.resolution_embeds:
        flops += 2 * (TIME_FREQ_DIM * c + c * c)
    for n in tokens_per_block:
        flops += block_matmul_flops(c, cfg.mlp_dim, batch, n, n_txt)
    return flops
