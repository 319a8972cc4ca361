"""Frozen text encoder: captions -> token embeddings [B, T, C] and a padding mask [B, T].

Loaded by hub id or local path through transformers (T5 / T5Gemma / Gemma / BERT-style). It is a
frozen helper (README, Contracts for your own model, 5): never in the optimizer, never in checkpoints, loaded once and
shared between everything that asks for the same weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_SHARED: dict[tuple, TextEncoder] = {}


def _weights_error(name_or_path: str, reason: str) -> OSError:
    fix = (
        "point model.text_encoder.name_or_path at a folder written by save_pretrained (config, weights, tokenizer)"
        if _looks_like_path(name_or_path)
        else f"fetch the weights on a machine with internet (`huggingface-cli download {name_or_path}`) "
        "or point model.text_encoder.name_or_path at a local folder"
    )
    return OSError(f"text encoder weights {name_or_path!r} could not be loaded ({reason}); {fix}")


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1] \
        or Path(name_or_path).expanduser().exists()


class TextEncoder(nn.Module):
    """A frozen transformers encoder with its tokenizer; `encode(captions)` -> (emb, mask)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, max_length: int = 256, dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        """Load tokenizer + encoder from a local folder or a hub id (the hub only if not offline)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        is_path = _looks_like_path(name_or_path)
        if is_path and not Path(name_or_path).expanduser().is_dir():
            raise _weights_error(name_or_path, "no such folder")
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        local_only = is_path or offline
        try:
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as err:
            if local_only:
                raise _weights_error(name_or_path, f"not found locally: {err}") from err
            try:
                config = AutoConfig.from_pretrained(name_or_path)
            except (OSError, ValueError) as download_err:
                raise _weights_error(name_or_path, f"not cached and download failed: {download_err}") from download_err
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
            if getattr(config, "is_encoder_decoder", False):
                model_type = config.model_type
                if model_type in ("t5", "mt5", "umt5"):
                    from transformers import T5EncoderModel

                    model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype, local_files_only=local_only)
                else:
                    model = AutoModel.from_pretrained(name_or_path, dtype=dtype, local_files_only=local_only)
                    model = model.get_encoder()
            else:
                model = AutoModel.from_pretrained(name_or_path, dtype=dtype, local_files_only=local_only)
        except OSError as err:
            raise _weights_error(name_or_path, str(err)) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        log.info("loaded text encoder %s (%s, hidden %d)", name_or_path, type(model).__name__, config.hidden_size
                 if hasattr(config, "hidden_size") else -1)
        return cls(model, tokenizer, max_length, name=name_or_path)

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """captions -> (emb [B, T, C] float, mask [B, T] bool), padded to the longest caption in the batch."""
        if isinstance(captions, str):
            raise TypeError("encode expects a list of captions, got a single string; wrap it in a list")
        device = device or self.device
        if self.device != device:
            self.model.to(device)
        tokens = self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()

    def forward_flops(self, batch: int, tokens: int) -> int:
        """FLOPs of one encoder forward on [batch, tokens] (what the online path adds to a training step).

        Measured with torch's FlopCounterMode, attention through the math kernel, which the counter sees on
        every device.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        ids = torch.zeros((batch, tokens), dtype=torch.long, device=self.device)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return int(counter.get_total_flops())


def load_text_encoder(name_or_path: str, max_length: int = 256, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load once per (weights, max_length, dtype) and share the instance."""
    key = (str(Path(name_or_path).expanduser().resolve()) if _looks_like_path(name_or_path) else name_or_path,
           max_length, dtype)
    if key not in _SHARED:
        _SHARED[key] = TextEncoder.from_pretrained(name_or_path, max_length=max_length, dtype=dtype)
    return _SHARED[key]


def save_word_level_encoder(path: str | Path, texts: list[str], hidden: int = 64, layers: int = 2,
                            heads: int = 4, seed: int = 0) -> Path:
    """Write a small randomly initialised BERT-style encoder with a word-level tokenizer over `texts`.

    Used by the CPU quickstart and the tests where no pretrained weights can be downloaded; it is
    loaded back through `TextEncoder.from_pretrained` exactly like a hub model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    words = sorted({w for text in texts for w in _split_words(text)})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    core.normalizer = normalizers.Lowercase()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = BertModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _split_words(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w.lower() for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]
