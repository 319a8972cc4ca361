"""FID / CMMD / DINO-MMD: the formulas against oracles and torchmetrics, the pixel convention, distortion
ladders on tiny random real-architecture nets loaded from disk, the per-rank split, and QualityEval end to end."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer_prx.callbacks import quality as Q
from composer_prx.data import shapes as S

LADDER = (0.0, 0.05, 0.1, 0.2, 0.4)  # Gaussian pixel noise std on [0, 1] images


class PooledPixels(nn.Module):
    """A feature net of our own for torchmetrics' `feature` option: uint8 [B, 3, H, W] -> 2x2 colour means [B, 12]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8  # the Inception convention (normalize=False)
        return F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)


def shape_images(n: int = 24, size: int = 32) -> torch.Tensor:
    """Rendered shapes scenes, uint8 [n, 3, size, size]: a structured stand-in for real images."""
    rng = np.random.default_rng(0)
    singles, pairs = S.train_scenes(1), S.train_scenes(2)
    scenes = [S.sample_training_scene(rng, singles, pairs) for _ in range(n)]
    return torch.from_numpy(np.stack([S.render(s, size, rng=rng) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def ladder(images: torch.Tensor) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=gen)
    unit = images.float() / 255.0
    return [(unit + std * noise).clamp(0, 1) for std in LADDER]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=4, image_size=32)).save_pretrained(path)
    return path


@pytest.fixture
def live_model(tiny_model):
    """The tiny PRXModel with its zero-initialised layers filled, so that samples depend on their noise."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return tiny_model


# ---- formulas -----------------------------------------------------------------------------------------
def oracle_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """The biased estimator written from the definition: a double loop over all pairs, x1000."""
    def k(a, b):
        return math.exp(-sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)) / (2 * sigma * sigma))

    def mean_k(a, b):
        return sum(k(p, q) for p in a for q in b) / (len(a) * len(b))

    return 1000.0 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


@pytest.mark.parametrize("sigma, spread", [(10.0, 6.0), (1.0, 0.5)])
def test_mmd_rbf_is_the_biased_estimator_of_its_definition(sigma, spread):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen) * spread
    y = torch.randn(9, 5, generator=gen) * spread + 0.5 * spread
    assert float(Q.mmd_rbf(x, y, sigma=sigma)) == pytest.approx(oracle_mmd(x, y, sigma), rel=1e-9, abs=1e-9)
    assert float(Q.mmd_rbf(x, x, sigma=sigma)) == pytest.approx(0.0, abs=1e-9)
    chunked = Q._mean_rbf(x.double(), y.double(), 0.5 / sigma**2, chunk=2)  # the row chunks add up
    assert float(chunked) == pytest.approx(float(Q._mean_rbf(x.double(), y.double(), 0.5 / sigma**2)), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        Q.mmd_rbf(x, y[:, :3])


def test_fid_matches_torchmetrics_on_its_uint8_convention_and_the_float_path_agrees():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = shape_images(32)
    fake = (ladder(real)[2] * 255).round().to(torch.uint8)
    reference = FrechetInceptionDistance(feature=PooledPixels(), normalize=False)  # the known-good call
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    net = Q.fid_feature_net(PooledPixels())
    via_uint8 = float(Q.fid_from_features(net.embed(real), net.embed(fake)))
    via_float = float(Q.fid_from_features(net.embed(real.float() / 255), net.embed(fake.float() / 255)))
    assert expected > 1e-3
    assert via_uint8 == pytest.approx(expected, rel=1e-4) and via_float == via_uint8
    # PRX's mistake: uint8 into normalize=True's (x * 255).byte() wraps to 256 - x, an inverted image
    assert torch.equal((real[:1] * 255).byte(), ((256 - real[:1].int()) % 256).byte())


def test_pixel_convention_rejects_model_space_and_unscaled_floats():
    images = shape_images(2)
    assert torch.equal(Q.to_uint8(images), images) and torch.equal(Q.to_uint8(images.float() / 255), images)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        Q.to_uint8(images.float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        Q.to_uint8(images.float())  # 0-255 values as float
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        Q.to_uint8(images[0])


def test_inception_path_names_feature_extractor_weights_path(tmp_path, monkeypatch):
    missing = str(tmp_path / "pt_inception.pth")
    with pytest.raises(FileNotFoundError, match=r"feature_extractor_weights_path .*pt_inception.pth.* is not a file"):
        Q.fid_feature_net(2048, missing)
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        Q.QualityEval(str(tmp_path), metrics=["fid"], feature_extractor_weights_path=missing)
    (tmp_path / "weights.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # torchmetrics' Inception is built from it
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        Q.fid_feature_net(2048, str(tmp_path / "weights.pth"))


# ---- ladders on tiny random nets ------------------------------------------------------------------
def test_each_metric_is_zero_on_identical_sets_and_grows_along_a_noise_ladder(clip_dir, dino_dir):
    real = shape_images(24)
    nets = {"fid": Q.fid_feature_net(PooledPixels()), "cmmd": Q.clip_feature_net(str(clip_dir)),
            "dino_mmd": Q.dino_feature_net(str(dino_dir), size=32)}
    for name, net in nets.items():
        base = net.embed(real)
        if name != "fid":
            assert torch.allclose(base.norm(dim=-1), torch.ones(len(base)), atol=1e-5)  # L2-normalised
        scores = [float(Q.DISTANCES[name](base, net.embed(rung))) for rung in ladder(real)]
        assert abs(scores[0]) < 1e-6, (name, scores)
        assert all(b > a for a, b in zip(scores, scores[1:])), (name, scores)


def test_clip_and_dino_load_by_path_with_a_clear_error_when_absent(tmp_path, tiny_model):
    from types import SimpleNamespace

    from composer_prx.encoders import TeacherNotFoundError

    with pytest.raises(TeacherNotFoundError, match="CLIP vision .*pass the local folder"):
        Q.clip_feature_net(str(tmp_path / "no_clip"))
    with pytest.raises(TeacherNotFoundError):
        Q.dino_feature_net(str(tmp_path / "no_dino"))
    write_heldout(tmp_path, n=2)
    callback = Q.QualityEval(str(tmp_path / "folder"), metrics=["cmmd"], clip=str(tmp_path / "no_clip"), size=16)
    with pytest.raises(TeacherNotFoundError, match="no_clip"):  # at fit start, not at the first evaluation
        callback.fit_start(SimpleNamespace(model=tiny_model), logger=None)


# ---- split over ranks, seeds, sampler precision -------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shards_cover_every_sample_once_and_gather_back_in_order(n, world):
    shards = [Q.shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of generate calls on every rank
    real = sorted(p for s in shards for p in s if p < n)
    assert real == list(range(n))  # each sample once: its seed (seed + position) differs across samples and ranks
    rows = [torch.tensor(s, dtype=torch.float64)[:, None] for s in shards]  # what each rank computed
    assert Q.interleave(rows, n).flatten().tolist() == list(range(n))


def test_per_sample_seeds_make_a_sample_independent_of_its_batch(live_model):
    tiny_model = live_model
    captions = ["a red circle in the top left corner", "a blue square at the bottom", "a red circle"]
    batch = tiny_model.generate(captions, size=8, steps=2, seed=[10, 11, 12])
    alone = tiny_model.generate(captions[1:2], size=8, steps=2, seed=[11])
    reordered = tiny_model.generate(captions[::-1], size=8, steps=2, seed=[12, 11, 10])
    assert torch.allclose(batch[1], alone[0], atol=1e-5) and torch.allclose(batch, reordered.flip(0), atol=1e-5)
    same_prompt = tiny_model.generate([captions[0]] * 2, size=8, steps=2, seed=[0, 1])
    assert not torch.allclose(same_prompt[0], same_prompt[1])
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        tiny_model.generate(captions, size=8, steps=1, seed=[0, 1])


def test_sampler_state_stays_fp32_under_bf16_autocast(tiny_model):
    seen = []
    hook = tiny_model.denoiser.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = tiny_model.generate(["a red circle"], size=8, steps=3, guidance="cfg", seed=[0])
    hook.remove()
    assert images.dtype == torch.float32 and len(seen) == 3
    assert all(x_t == torch.float32 for x_t, _ in seen)  # x_t fed back each step is fp32
    assert any(out == torch.bfloat16 for _, out in seen)  # while the denoiser itself ran in bf16


# ---- the held-out set and the callback -------------------------------------------------------------------
def write_heldout(root, n: int = 6, size: int = 16):
    """An image folder (NAME.png + NAME.txt) and the same samples as one MDS folder."""
    from streaming import MDSWriter

    scenes = S.heldout_scenes(1)[:n]
    (root / "folder").mkdir(parents=True)
    with MDSWriter(out=str(root / "mds"), columns={"image": "bytes", "caption": "str", "width": "int",
                                                     "height": "int"}) as writer:
        for i, scene in enumerate(scenes):
            pixels = S.render(scene, size)
            (root / "folder" / f"{i:03d}.png").write_bytes(S.encode_png(pixels))
            (root / "folder" / f"{i:03d}.txt").write_text(scene.caption(0))
            writer.write({"image": S.encode_png(pixels), "caption": scene.caption(0), "width": size, "height": size})
    return scenes


def test_heldout_set_reads_mds_and_image_folders_alike(tmp_path):
    scenes = write_heldout(tmp_path)
    folder, mds = Q.HeldOutSet(str(tmp_path / "folder")), Q.HeldOutSet(str(tmp_path / "mds"))
    assert folder.captions == mds.captions == [s.caption(0) for s in scenes]
    assert torch.equal(folder.image(2, 16), mds.image(2, 16))
    assert torch.equal(mds.image(2, 16), torch.from_numpy(S.render(scenes[2], 16)).permute(2, 0, 1))
    assert mds.image(0, 8).shape == (3, 8, 8)
    assert Q.HeldOutSet(str(tmp_path)).captions == mds.captions  # a dataset root: its MDS subfolders
    (tmp_path / "folder" / "999.png").write_bytes(S.encode_png(S.render(scenes[0], 16)))
    with pytest.raises(FileNotFoundError, match=r"without a caption file: \['999.png'\]"):
        Q.HeldOutSet(str(tmp_path / "folder"))


def test_quality_eval_end_to_end_with_ema_sweep(tmp_path, live_model, clip_dir, dino_dir):
    tiny_model = live_model
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from composer_prx.algorithms.ema import EMA
    from tests.conftest import image_batch

    write_heldout(tmp_path, n=5)
    batch = image_batch(4, size=16)
    samples = [{"image": batch["image"][i], "caption": batch["caption"][i]} for i in range(4)]
    callback = Q.QualityEval(str(tmp_path / "folder"), num_samples=5, size=16, steps=2, batch_size=8,
                             fid_feature=PooledPixels(), clip=str(clip_dir), dino=str(dino_dir), dino_size=16,
                             sweep={"guidance_scale": [1.0, 3.0], "ema": "all"}, interval="2ba")
    memory = InMemoryLogger()
    trainer = Trainer(model=tiny_model, train_dataloader=DataLoader(samples, batch_size=2), max_duration="2ba",
                      optimizers=torch.optim.AdamW(tiny_model.parameters(), lr=1e-3), device="cpu",
                      algorithms=[EMA({"fast": 0.5, "slow": 0.9})], callbacks=[callback], loggers=[memory],
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    logged = memory.most_recent_values
    for metric in Q.QUALITY_METRICS:
        assert math.isfinite(logged[f"quality/{metric}"]) and logged[f"quality/{metric}"] > 0  # the 2ba eval
        for ema in ("fast", "slow"):
            for w in ("1", "3"):
                assert math.isfinite(logged[f"quality/sweep/{ema}/w{w}/{metric}"])
    assert set(callback.results) == {(None, 4.0), ("fast", 1.0), ("fast", 3.0), ("slow", 1.0), ("slow", 3.0)}
    best = callback.best
    assert logged["quality/best/fid"] == min(r["fid"] for k, r in callback.results.items() if k[0])
    assert callback.results[best]["fid"] == logged["quality/best/fid"]
    assert callback.results[("fast", 1.0)] != callback.results[("slow", 1.0)]  # the averages really differ
    assert f"best by fid: ema={best[0]} guidance_scale={best[1]}" in callback.summary()
    trainer.close()
