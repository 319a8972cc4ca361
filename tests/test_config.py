"""The strict config: every shipped YAML loads; bad keys, types and time strings fail clearly."""

from pathlib import Path

import pytest

from composer_prx import config as C

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "yamls" / "shapes.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "yamls").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = C.load_config(path)
    assert cfg.run_name and cfg.data.global_batch_size > 0


def test_variables_and_overrides():
    cfg = C.load_config(SHAPES, ["variables.size=64", "trainer.max_duration=7ba", "seed=3"])
    assert cfg.data.resolution == 64 and cfg.callbacks["samples"]["size"] == 64
    assert cfg.trainer.max_duration == "7ba" and cfg.seed == 3
    assert "max_duration: 7ba" in C.to_yaml(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_durattion=10ba", r"unknown key trainer.max_durattion; valid keys here: \[.*'max_duration'"),
        ("model.dit.hiden_dim=64", r"unknown key model.dit.hiden_dim; valid keys here: \[.*'hidden_dim'"),
        ("model.dit.depth=four", r"model.dit.depth must be int, got 'four'"),
        ("trainer.max_duration=10 batches", r"not a time string.*'100ba'"),
        ("trainer.precision=bf16", r"trainer.precision must be one of"),
        ("optimizer.name=sgd2", r"unknown optimizer name 'sgd2'; registered names: \['adamw', 'muon'\]"),
        ("algorithms.ema.smoothingg=0.9", r"unknown key algorithms.ema.smoothingg; valid keys here: \[.*'smoothing'"),
        ("algorithms.emaa={}", r"unknown algorithms name 'emaa'"),
        ("algorithms.ema.update_interval=sometimes", r"algorithms.ema.update_interval.*not a time string"),
        ("callbacks.samples.steps=many", r"callbacks.samples.steps must be int"),
        ("data.train.batch_size=4", r"data.train \(shapes\).batch_size is set by the trainer"),
        ("trainerr.device=cpu", r"unknown key trainerr; valid keys here"),
        ("trainer.fsdp={state_dict_typ: full}", r"unknown key trainer.fsdp.state_dict_typ; valid FSDP2 keys: \[.*'state_dict_type'"),
        ("model.text_encoder.dtype=fp8", r"model.text_encoder.dtype must be one of \('float32', 'bfloat16', 'float16'\)"),
        ("model.dit.num_heads=5", r"model.dit: hidden_dim 192 must be divisible by num_heads 5"),
        ("model.time_sampling.std=0", r"model.time_sampling: TimeSampling.std must be > 0"),
        ("optimizer.lrr=0.1", r"unknown key optimizer \(adamw\).lrr; valid keys here: \[.*'lr'"),
        ("optimizer.betas=[0.9]", r"optimizer \(adamw\).betas must be tuple\[float, float\], got \[0.9\]"),
        ("optimizer.lr=fast", r"optimizer \(adamw\).lr must be float, got 'fast'"),
    ],
)
def test_bad_config_fails_with_actionable_message(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(SHAPES, [override])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "nope.yaml")
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load_config(SHAPES, ["trainer.max_duration"])


def test_missing_required_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: x\nmodel: {}\noptimizer: {name: adamw}\ntrainer: {max_duration: 1ba}\n")
    with pytest.raises(C.ConfigError, match="missing required key data"):
        C.load_config(path)


def test_composer_components_by_name():
    from composer.algorithms import EMA
    from composer.callbacks import SpeedMonitor

    from composer_prx.algorithms.ema import EMA as OurEMA

    assert C.resolve("algorithms", "composer_ema") is EMA
    assert C.resolve("algorithms", "ema") is OurEMA  # ours: sharded with FSDP2, several smoothings
    assert C.resolve("callbacks", "speed_monitor") is SpeedMonitor
