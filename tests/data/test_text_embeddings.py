"""convert --text-encoder: caption embeddings precomputed into MDS columns (bf16, real tokens only), read by
the dataset, used by PRXModel instead of the encoder (caption dropout included), checked against the config."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from composer_prx import config as C
from composer_prx import train
from composer_prx.data.convert import main as convert_main
from composer_prx.data.dataset import build_dataloader
from composer_prx.data.text_embeddings import (from_bf16_bits, text_embedding_bytes_per_step, to_bf16_bits)
from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel
from composer_prx.model.text import load_text_encoder, save_word_level_encoder
from tests.data.conftest import encode

ROOT = Path(__file__).resolve().parents[2]
SHAPES = str(ROOT / "yamls" / "shapes.yaml")
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "top", "small", "big", "on", "the"]


def caption(i: int) -> str:
    """Captions of 2 to 9 words, so a batch mixes lengths (trimmed storage, padded in the batch)."""
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=2 + i % 8))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """12 captioned 16 px images converted twice: with --text-encoder (a tiny random BERT on disk) and without."""
    tmp = tmp_path_factory.mktemp("textemb")
    folder = tmp / "images"
    folder.mkdir()
    for i in range(12):
        pixels = np.random.default_rng(100 + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        (folder / f"img{i:02d}.png").write_bytes(encode(pixels))
        (folder / f"img{i:02d}.txt").write_text(caption(i))
    encoder = save_word_level_encoder(tmp / "encoder", WORDS, hidden=32, layers=1, heads=2)
    other = save_word_level_encoder(tmp / "other_encoder", WORDS, hidden=32, layers=1, heads=2, seed=1)
    common = [str(folder), "--base-resolution", "16", "--patch-size", "4", "--format", "png", "--workers", "1"]
    convert_main([*common, "--out", str(tmp / "emb"), "--text-encoder", str(encoder), "--text-max-length", "16",
                  "--text-batch-size", "5"])
    convert_main([*common, "--out", str(tmp / "plain")])
    return tmp, encoder, other


def test_bf16_bits_round_trip():
    x = torch.randn(7, 5)
    bits = to_bf16_bits(x)
    assert bits.dtype == np.uint16 and bits.shape == (7, 5)
    assert torch.equal(from_bf16_bits(bits), x.to(torch.bfloat16))


def test_stored_embeddings_are_the_encoders_real_tokens_in_bf16(converted):
    tmp, encoder_dir, _ = converted
    manifest = json.loads((tmp / "emb" / "buckets.json").read_text())
    info = manifest["text_embeddings"]
    assert info == {"encoder": str(encoder_dir), "hidden_size": 32, "max_length": 16, "encoder_dtype": "float32",
                    "dtype": "bfloat16", "layout": "trimmed", "columns": {"caption": "caption_emb"}}
    encoder = load_text_encoder(str(encoder_dir), max_length=16)
    loader = build_dataloader(None, str(tmp / "emb"), batch_size=4, resolution=16, patch_size=4, shuffle=False)
    assert loader.dataset.text_embeddings == info
    batch = next(iter(loader))
    emb, mask = encoder.encode(batch["caption"])
    assert batch["text_emb"].dtype == torch.bfloat16 and batch["text_emb"].shape == emb.shape  # padded to the longest
    assert torch.equal(batch["text_mask"], mask) and not mask.all()  # lengths differ inside the batch
    assert torch.equal(batch["text_emb"][mask], emb[mask].to(torch.bfloat16))
    assert not batch["text_emb"][~mask].any()  # padding is zeros, masked out


def test_loss_and_null_prompt_match_the_online_encoder(converted, tmp_path):
    """Same batch, same seed: the loss from stored embeddings = the online encoder's within bf16 rounding, and
    the dropped (null) prompts give bit-identical predictions: the null prompt is the fully masked caption."""
    tmp, encoder_dir, _ = converted
    encoder = load_text_encoder(str(encoder_dir), max_length=16)
    torch.manual_seed(0)
    cfg = DiTConfig(patch_size=4, hidden_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, bottleneck_dim=16, text_dim=32)
    model = PRXModel(PixelDiT(cfg), encoder, caption_dropout=0.5)
    for block in model.denoiser.blocks:  # non-zero adaLN so that the text reaches the prediction
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    torch.nn.init.normal_(model.denoiser.final_proj.weight, std=0.1)
    loader = build_dataloader(None, str(tmp / "emb"), batch_size=12, resolution=16, patch_size=4, shuffle=False)
    batch = next(iter(loader))
    online_batch = {"image": batch["image"], "caption": batch["caption"]}
    outputs = {}
    for name, b in (("stored", batch), ("online", online_batch)):
        torch.manual_seed(5)
        out = model(b)
        outputs[name] = (out, model.loss(out, b))
    (stored, stored_loss), (online, online_loss) = outputs["stored"], outputs["online"]
    dropped = ~stored.text_mask.any(1)
    assert torch.equal(dropped, ~online.text_mask.any(1)) and 0 < dropped.sum() < 12
    assert torch.equal(stored.x_pred[dropped], online.x_pred[dropped])
    kept = ~dropped
    assert not torch.equal(stored.x_pred[kept], online.x_pred[kept])  # the bf16 rounding is visible ...
    torch.testing.assert_close(stored.x_pred, online.x_pred, rtol=0, atol=2e-2)  # ... and small
    torch.testing.assert_close(stored_loss, online_loss, rtol=1e-2, atol=0)


def mds_quickstart(tmp, data) -> str:
    """The quickstart YAML reading the MDS folder `data` (its data.train replaced, which overrides cannot do)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(SHAPES)
    conf.data.train = {"name": "mds", "remote": None, "local": str(data)}
    path = tmp / f"quickstart_{Path(data).name}.yaml"
    OmegaConf.save(conf, path)
    return str(path)


def overrides(tmp, data, run, encoder, *extra):
    return [mds_quickstart(tmp, data),
            "model.dit={patch_size: 4, hidden_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, bottleneck_dim: 16, "
            "text_dim: 32}", f"model.text_encoder.name_or_path={encoder}", "model.text_encoder.max_length=16",
            "data.global_batch_size=4", "variables.size=16",
            f"run_dir={tmp}/runs", f"run_name={run}", "trainer.max_duration=3ba", "trainer.save_interval=1000ba",
            "trainer.progress_bar=false", "callbacks.samples=null", "callbacks.shapes_eval=null",
            "callbacks.speed_monitor=null", "scheduler.t_warmup=1ba", *extra]


def test_training_reads_the_embeddings_and_follows_the_online_run(converted):
    """6 steps (the adaLN-zero blocks let the text reach the loss from step 3): the run on stored embeddings ends
    where the online run ends, up to the bf16 rounding of the embeddings, far closer than either is to the start."""
    tmp, encoder_dir, _ = converted
    more = ("trainer.max_duration=6ba", "optimizer.lr=0.01")
    stored = train.main(overrides(tmp, tmp / "emb", "stored", encoder_dir, *more))
    online = train.main(overrides(tmp, tmp / "plain", "online", encoder_dir, *more))
    assert stored.state.batch["text_emb"].dtype == torch.bfloat16 and "text_emb" not in online.state.batch
    assert stored.state.model.text_encoder_flops(stored.state.batch) == 0  # the encoder did not run
    assert stored.state.model.text_encoder_flops(online.state.batch) > 0
    torch.testing.assert_close(stored.state.loss, online.state.loss, rtol=1e-2, atol=0)  # the last step's loss
    args = overrides(tmp, tmp / "plain", "init", encoder_dir)
    start = dict(train.build_prx_model(C.load_config(args[0], args[1:])).named_parameters())
    a, b = dict(stored.state.model.named_parameters()), dict(online.state.model.named_parameters())
    for name in ("denoiser.text_proj.weight", "denoiser.blocks.1.text_kv.weight", "denoiser.blocks.1.qkv.weight"):
        moved, apart = (a[name] - start[name]).norm(), (a[name] - b[name]).norm()
        assert moved > 0.1 and apart < 0.05 * moved, (name, float(moved), float(apart))  # measured: 0.25-0.44, ~1%


def test_a_different_encoder_or_width_is_a_clear_error(converted):
    tmp, encoder_dir, other = converted
    with pytest.raises(C.ConfigError, match=r"computed by '.*encoder' \(hidden size 32, max_length 16\), but "
                                            r"model.text_encoder.name_or_path is '.*other_encoder'.*set "
                                            r"model.text_encoder.name_or_path=.*encoder or re-run"):
        train.main(overrides(tmp, tmp / "emb", "bad", other))
    with pytest.raises(C.ConfigError, match="model.text_encoder.max_length is 8; set model.text_encoder.max_length=16"):
        train.main(overrides(tmp, tmp / "emb", "bad", encoder_dir, "model.text_encoder.max_length=8"))
    with pytest.raises(C.ConfigError, match="model.dit.text_dim is 64; set model.dit.text_dim=32"):
        train.main(overrides(tmp, tmp / "emb", "bad", encoder_dir, "model.dit.text_dim=64"))


def test_bytes_streamed_per_step_per_node():
    # PRX's stage 1: global batch 1024 on 4 nodes, T5Gemma-2B (2304 wide), a 120-token mean caption, bf16
    per_node = text_embedding_bytes_per_step(1024, 120, 2304, nodes=4)
    assert per_node == 256 * (120 * 2304 * 2 + 1 + 2 * 2 + 4)  # payload + ndim byte, 2 uint16 dims, MDS offset
    assert text_embedding_bytes_per_step(1024, 120, 2304, nodes=3) == 342 * (per_node // 256)
    with pytest.raises(ValueError, match="must all be >= 1"):
        text_embedding_bytes_per_step(1024, 0, 2304)
