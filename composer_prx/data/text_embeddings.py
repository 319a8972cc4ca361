"""Precomputed caption embeddings: written by ``convert --text-encoder``, read by the dataset, checked by the trainer.

    caption --TextEncoder.encode (the trainer's own encoder)--> emb [T, C] (+ mask) --keep the real tokens-->
    [L, C], L <= max_length --bf16 bits as uint16--> MDS column "<caption column>_emb" (ndarray:uint16, [L, C])
    dataset: uint16 -> bf16 [L, C]; collate: pad to the longest L of the batch -> text_emb [B, T, C] bf16
    + text_mask [B, T] (False on padding); PRXModel casts to fp32 on the device and skips the encoder.

The stored layout is *trimmed*: only the caption's real tokens (no padding, no mask column), so the
bytes streamed follow the caption lengths, not max_length. Caption dropout needs nothing stored: the
null prompt is the caption's own embedding with every token masked out, exactly as on the online path.
``buckets.json`` records the encoder under "text_embeddings" (name, hidden size, max_length, dtypes);
the trainer refuses a config whose text encoder differs (``check_text_embeddings``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

EMB_SUFFIX = "_emb"
EMB_ENCODING = "ndarray:uint16"  # bf16 bits: numpy has no bfloat16
MDS_OFFSET_BYTES = 4  # an MDS sample stores one uint32 size per variable-length column


def embedding_column(caption_column: str) -> str:
    return caption_column + EMB_SUFFIX


def to_bf16_bits(emb: Tensor) -> np.ndarray:
    """float [L, C] -> its bf16 rounding as uint16 bits [L, C] (what the MDS column holds)."""
    return emb.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> Tensor:
    """uint16 bits [L, C] -> bf16 tensor [L, C] (exact inverse of ``to_bf16_bits``)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16).copy()).view(torch.bfloat16)


def _same_encoder_name(a: str, b: str) -> bool:
    from composer_prx.model.text import _looks_like_path

    if a == b:
        return True
    if _looks_like_path(a) and _looks_like_path(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


class CaptionEmbedder:
    """Encodes captions with a frozen TextEncoder and keeps each caption's real tokens, as bf16 bits."""

    def __init__(self, encoder, device: str | torch.device | None = None, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"text batch size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.device = torch.device(device) if device is not None else encoder.device
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_path: str, max_length: int, dtype: str = "float32", device: str | None = None,
             batch_size: int = 64) -> CaptionEmbedder:
        """The trainer's loader (``load_text_encoder``) on ``device`` (default: the accelerator if any)."""
        from composer_prx.model.text import load_text_encoder

        if device is None:  # the accelerator when there is one
            device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
        return cls(load_text_encoder(name_or_path, max_length, getattr(torch, dtype)), device, batch_size)

    def manifest(self, caption_columns: list[str] | tuple[str, ...], encoder_dtype: str) -> dict[str, Any]:
        """The "text_embeddings" entry of buckets.json."""
        return {"encoder": self.encoder.name, "hidden_size": self.encoder.hidden_size,
                "max_length": self.encoder.max_length, "encoder_dtype": encoder_dtype, "dtype": "bfloat16",
                "layout": "trimmed", "columns": {c: embedding_column(c) for c in caption_columns}}

    def embed(self, captions: list[str]) -> list[np.ndarray]:
        """captions -> one uint16 (bf16 bits) array [L_i, C] per caption, L_i its real token count."""
        out: list[np.ndarray] = []
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start: start + self.batch_size]
            emb, mask = self.encoder.encode(chunk, device=self.device)  # [b, T, C], [b, T]
            # a caption with no token at all (empty text, tokenizer without special tokens) gets one zero
            # token: MDS cannot store an empty array, and the dataset never trains on an empty caption column
            out.extend(to_bf16_bits(e[m] if m.any() else e[:1] * 0) for e, m in zip(emb, mask))
        return out

    def add_to_rows(self, rows: list[dict[str, Any]], caption_columns: tuple[str, ...]) -> None:
        """Add "<column>_emb" to every row, for every caption column."""
        for column in caption_columns:
            for row, bits in zip(rows, self.embed([row[column] for row in rows])):
                row[embedding_column(column)] = bits


def check_text_embeddings(info: dict[str, Any], text_encoder: Any | None, text_dim: int, where: str) -> None:
    """Refuse a config whose text encoder (name, max_length) or ``model.dit.text_dim`` differs from the one
    that computed the embeddings at ``where``; ``text_encoder`` is the config's ``model.text_encoder`` section."""
    from composer_prx.config import ConfigError

    stored = f"{info['encoder']!r} (hidden size {info['hidden_size']}, max_length {info['max_length']})"
    redo = (f"or re-run python -m composer_prx.data.convert ... --text-encoder "
            f"{getattr(text_encoder, 'name_or_path', 'ID|PATH')}")
    if info["hidden_size"] != text_dim:
        raise ConfigError(f"the text embeddings in {where} were computed by {stored}, but model.dit.text_dim is "
                          f"{text_dim}; set model.dit.text_dim={info['hidden_size']} {redo}")
    if text_encoder is None:
        log.info("training on the text embeddings of %s in %s; no text encoder configured (sampling needs "
                 "precomputed prompts)", stored, where)
        return
    if not _same_encoder_name(info["encoder"], text_encoder.name_or_path):
        raise ConfigError(f"the text embeddings in {where} were computed by {stored}, but model.text_encoder."
                          f"name_or_path is {text_encoder.name_or_path!r}: the null prompt and the sampling prompts "
                          f"would come from another encoder; set model.text_encoder.name_or_path={info['encoder']} "
                          f"{redo}")
    if info["max_length"] != text_encoder.max_length:
        raise ConfigError(f"the text embeddings in {where} were computed by {stored}, but model.text_encoder."
                          f"max_length is {text_encoder.max_length}; set model.text_encoder.max_length="
                          f"{info['max_length']} {redo} --text-max-length {text_encoder.max_length}")


def text_embedding_bytes_per_step(global_batch_size: int, tokens: int, hidden_size: int, nodes: int = 1,
                                  bytes_per_value: int = 2) -> int:
    """Bytes of the embedding column one node streams per training step.

    = ceil(global_batch / nodes) x (tokens x hidden x bytes_per_value + the column's per-sample header),
    tokens = the mean stored caption length (trimmed layout; max_length bounds it), bf16: 2 bytes.
    """
    from streaming.base.format.mds.encodings import NDArray

    if min(global_batch_size, tokens, hidden_size, nodes, bytes_per_value) < 1:
        raise ValueError("global_batch_size, tokens, hidden_size, nodes and bytes_per_value must all be >= 1, got "
                         f"{(global_batch_size, tokens, hidden_size, nodes, bytes_per_value)}")
    header = len(NDArray("uint16").encode(np.zeros((tokens, hidden_size), np.uint16))) - tokens * hidden_size * 2
    per_sample = tokens * hidden_size * bytes_per_value + header + MDS_OFFSET_BYTES
    return -(-global_batch_size // nodes) * per_sample


def read_manifest_entry(root: str | os.PathLike) -> dict[str, Any] | None:
    """The "text_embeddings" entry of a local dataset root's buckets.json (None when absent)."""
    import json

    path = os.path.join(root, "buckets.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("text_embeddings")
