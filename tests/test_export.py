"""diffusers interop: PixelDiT <-> PRXTransformer2DModel weight for weight, our sampler vs PRXPixelPipeline,
the export CLI on a real Composer checkpoint (EMA and trained weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from composer_prx import export, train
from composer_prx.model.dit import DiTConfig, PixelDiT
from composer_prx.model.pipeline import PRXModel
from composer_prx.model.text import load_text_encoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def randomised(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (the zero-initialised adaLN and output layers too); norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            param.copy_(1 + noise if "norm" in name else noise)
    return model.eval()


def dit_inputs(text_dim: int):
    """Non-square 16x24 images, text with padding, one sample with every text token masked."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return (torch.randn(3, 3, 16, 24, generator=gen), torch.tensor([0.03, 0.5, 0.97]),
            torch.randn(3, 5, text_dim, generator=gen), mask)


GEOMETRIES = [
    dict(bottleneck_dim=16, resolution_embeds=True),  # the pixel PRX layout
    dict(bottleneck_dim=None, resolution_embeds=False, rope_theta=100.0),
]


def tiny_cfg(**overrides) -> DiTConfig:
    return DiTConfig(**(dict(patch_size=4, hidden_dim=32, depth=3, num_heads=2, mlp_ratio=2.5, text_dim=24)
                        | overrides))


def load_strict(diffusers, path):
    transformer, info = diffusers.PRXTransformer2DModel.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return transformer.eval()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_export_same_outputs_in_diffusers(diffusers, tmp_path, geometry):
    dit = randomised(PixelDiT(tiny_cfg(**geometry)))
    export.to_diffusers(dit).save_pretrained(str(tmp_path))
    transformer = load_strict(diffusers, tmp_path)
    assert transformer.config.bottleneck_size == geometry["bottleneck_dim"]
    assert transformer.config.resolution_embeds == geometry["resolution_embeds"]
    assert sum(p.numel() for p in transformer.parameters()) == sum(p.numel() for p in dit.parameters())
    x, t, text, mask = dit_inputs(24)
    with torch.no_grad():
        ours = dit(x, t, text, mask)
        theirs = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
    assert ours.abs().max() > 0.5  # a real signal, not the zero-initialised output
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # the padded and the fully masked rows really ignore their masked tokens on both sides
    moved = text.clone()
    moved[~mask] = torch.randn(int((~mask).sum()), 24)
    with torch.no_grad():
        torch.testing.assert_close(transformer(x, t, moved, mask).sample, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_import_from_diffusers_same_outputs(diffusers, tmp_path, geometry):
    cfg = tiny_cfg(**geometry)
    transformer = randomised(diffusers.PRXTransformer2DModel(**export.diffusers_config(cfg)), seed=3)
    transformer.save_pretrained(str(tmp_path))
    dit = PixelDiT.from_diffusers(tmp_path)
    assert dit.cfg == cfg
    x, t, text, mask = dit_inputs(24)
    with torch.no_grad():
        theirs = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
        torch.testing.assert_close(dit(x, t, text, mask), theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(PixelDiT.from_diffusers(transformer)(x, t, text, mask), theirs,
                                   rtol=1e-5, atol=1e-5)
    assert theirs.abs().max() > 0.5
    # round trip: exactly the same tensors
    back = export.to_diffusers_state_dict(dit)
    assert back.keys() == transformer.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in transformer.state_dict().items())


def test_import_refuses_what_pixeldit_cannot_express(diffusers, tmp_path):
    config = export.diffusers_config(tiny_cfg()) | {"axes_dim": [4, 12]}
    with pytest.raises(ValueError, match="axes_dim"):
        export.dit_config(config)
    with pytest.raises(ValueError, match="time_factor"):
        export.dit_config(export.diffusers_config(tiny_cfg()) | {"time_factor": 1.0})
    with pytest.raises(ValueError, match="text_norm"):
        export.to_diffusers(PixelDiT(tiny_cfg(text_norm=True)))
    with pytest.raises(ValueError, match="rope_grid"):
        export.to_diffusers(PixelDiT(tiny_cfg(rope_grid=4)))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PixelDiT.from_diffusers(tmp_path)


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r"pip install composer_prx\[diffusers\]"):
        PixelDiT.from_diffusers("anything")
    with pytest.raises(ImportError, match=r"pip install composer_prx\[diffusers\]"):
        export.main(["ckpt.pt", "--diffusers", "out"])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_generate_matches_prx_pixel_pipeline(diffusers, tmp_path, text_encoder_dir, shift):
    """Our generate (CFG) and the exported PRXPixelPipeline, same initial noise and timesteps.

    Every timestep both evaluate is >= 0.05 (10 steps: the smallest nonzero t is 0.1 at shift 1), where the
    pipeline's clamped velocity (x_t - x)/max(t, 0.05) equals our sampler's (x_t - x)/t; below it they
    would differ by design. The remaining difference is float32 rounding (different op order, the
    pipeline pads text to prompt_max_tokens, we pad to the longest prompt): 1e-5.
    """
    pytest.importorskip("ftfy")  # PRXPixelPipeline cleans prompts with ftfy (in the diffusers extra)
    from composer_prx import flow

    encoder = load_text_encoder(str(text_encoder_dir), max_length=16)
    dit = randomised(PixelDiT(tiny_cfg(text_dim=32)), seed=5, std=0.05)
    model = PRXModel(dit, encoder, time_sampling=flow.TimeSampling(shift=shift))
    export.build_pipeline(dit, encoder, shift=shift, resolution=16).save_pretrained(str(tmp_path))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "PRXPixelPipeline" and pipe.scheduler.config.shift == shift
    assert pipe.config.noise_scale == 1.0 and pipe.config.prompt_max_tokens == 16
    load_strict(diffusers, tmp_path / "transformer")
    # the pipeline re-shifts given timesteps with its own shift: hand it the grid through an unshifted scheduler
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)

    prompts = ["a red circle in the top left corner", "a blue square"]
    steps, scale, seed, size = 10, 3.0, 0, (16, 24)
    ours = model.generate(prompts, size=size, steps=steps, guidance="cfg", guidance_scale=scale, seed=seed)
    noise = torch.randn((2, 3, *size), generator=torch.Generator().manual_seed(seed))  # what generate draws
    grid = flow.timesteps(steps, shift)
    assert grid[-2] >= 0.05
    # one prompt per call: with CFG, diffusers 0.39.0's PRXPixelPipeline gives the transformer 2 timesteps
    # for 2 x batch images (`t.view(1).repeat(2)`), which only broadcasts for a batch of one
    theirs = torch.cat([
        pipe(prompt, height=size[0], width=size[1], latents=noise[i:i + 1], timesteps=(grid[:-1] * 1000).tolist(),
             guidance_scale=scale, output_type="pt", use_resolution_binning=False).images
        for i, prompt in enumerate(prompts)])
    theirs = (theirs.clamp(-1, 1) + 1) / 2
    assert ours.std() > 0.05 and ((ours > 0) & (ours < 1)).float().mean() > 0.5  # varied, mostly unclamped
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    uncond = model.generate(prompts, size=size, steps=steps, guidance="none", seed=seed)
    assert (uncond - ours).abs().max() > 1e-3  # guidance mattered, so the unconditional branches agreed too


# ---- the CLI on a real checkpoint --------------------------------------------------------------------
def tiny_run(tmp_path, data_root, name, ema=True):
    overrides = [
        f"variables.data_root={data_root}", "variables.size=16", f"run_dir={tmp_path}/runs", f"run_name={name}",
        "model.dit.hidden_dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
        "data.train.n_train=32", "data.global_batch_size=8", "trainer.max_duration=2ba", "trainer.save_interval=2ba",
        "trainer.progress_bar=false", "callbacks.samples=null", "callbacks.shapes_eval=null", "scheduler.t_warmup=1ba",
        "optimizer.lr=0.01",
    ] + (["algorithms.ema=null"] + (["algorithms.composer_ema={half_life: null, smoothing: 0.995, "
                                     "update_interval: 1ba}"] if ema else []))  # old Composer-EMA checkpoints
    train.main([str(ROOT / "yamls" / "shapes.yaml"), *overrides])
    return tmp_path / "runs" / name / "checkpoints" / "latest-rank0.pt"


def test_export_cli_ema_and_trained_weights(diffusers, tmp_path):
    data_root = tmp_path / "shapes"
    ckpt = tiny_run(tmp_path, data_root, "ema")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]
    ema_state = dict(saved["algorithms"])["EMA"]
    assert ema_state["ema_weights_active"]  # Composer swaps the averages into the model at checkpoints
    model_state = {k.removeprefix("denoiser."): v for k, v in saved["model"].items()}
    trained = {k.removeprefix("denoiser."): v for k, v in ema_state["ema_model"]["named_parameters_dict"].items()}

    def exported(*flags):
        out = tmp_path / ("out" + "".join(flags))
        export.main([str(ckpt), "--diffusers", str(out), *flags])
        dit = PixelDiT.from_diffusers(out)
        return {k: v for k, v in dit.state_dict().items()}

    ema_weights, trained_weights = exported(), exported("--no-ema")
    assert all(torch.equal(ema_weights[k], model_state[k]) for k in model_state)
    assert all(torch.equal(trained_weights[k], trained[k]) for k in trained)
    assert any(not torch.equal(ema_weights[k], trained_weights[k]) for k in trained)
    assert all(torch.equal(a, b) for a, b in zip(exported("--ema").values(), ema_weights.values()))

    out = export.main([str(ckpt), "--diffusers", str(tmp_path / "pipe"), "--text-encoder",
                       str(data_root / "text_encoder")])
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "PRXPixelPipeline" and pipe.config.default_sample_size == 16
    assert pipe.config.prompt_max_tokens == 64  # the run's text_encoder.max_length
    assert pipe.transformer.config.hidden_size == 32


def test_export_without_ema(diffusers, tmp_path):
    ckpt = tiny_run(tmp_path, tmp_path / "shapes", "plain", ema=False)
    with pytest.raises(ValueError, match="no EMA weights.*--no-ema"):
        export.main([str(ckpt), "--diffusers", str(tmp_path / "out"), "--ema"])
    out = export.main([str(ckpt), "--diffusers", str(tmp_path / "out")])  # default: the trained weights
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    dit = PixelDiT.from_diffusers(out)
    assert all(torch.equal(v, saved[f"denoiser.{k}"]) for k, v in dit.state_dict().items())


def test_train_starts_from_a_diffusers_transformer(diffusers, tmp_path):
    """model.init_from: the run's denoiser starts with the folder's weights; a model.dit that does not
    describe them is a config error naming the settings to change."""
    cfg = tiny_cfg(bottleneck_dim=16, text_dim=64, depth=2, num_heads=2)
    source = randomised(diffusers.PRXTransformer2DModel(**export.diffusers_config(cfg)), seed=5)
    source.save_pretrained(str(tmp_path / "prx"))
    overrides = ["variables.size=16", f"run_dir={tmp_path}/runs",
                 "model.dit.hidden_dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.bottleneck_dim=16",
                 "model.dit.mlp_ratio=2.5", "model.dit.patch_size=4", "data.train.n_train=16",
                 "model.text_encoder=null", f"model.init_from={tmp_path / 'prx'}"]
    config = train.C.load_config(str(ROOT / "yamls" / "shapes.yaml"), overrides)
    model = train.build_prx_model(config)
    expected = export.from_diffusers_state_dict(source.state_dict(), cfg)
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in expected.items())
    wrong = train.C.load_config(str(ROOT / "yamls" / "shapes.yaml"), overrides + ["model.dit.mlp_ratio=4.0"])
    with pytest.raises(train.C.ConfigError, match=r"different architecture than model.dit; set model.dit.mlp_ratio=2.5"):
        train.build_prx_model(wrong)
