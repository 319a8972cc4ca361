"""SampleGrid's sampling settings: per-guidance default scale, TREAD route checked before training."""

from types import SimpleNamespace

import pytest
import torch

from composer_prx.algorithms.tread import apply_tread
from composer_prx.callbacks.samples import SampleGrid
from composer_prx.model.pipeline import PRXModel


class RecordingModel(PRXModel):
    """PRXModel that records the arguments of each generate call."""

    def generate(self, *args, **kwargs):
        self.calls = getattr(self, "calls", []) + [kwargs]
        return super().generate(*args, **kwargs)


@pytest.fixture
def model(tiny_dit_cfg, text_encoder_dir):
    from composer_prx.model.dit import PixelDiT
    from composer_prx.model.text import load_text_encoder

    torch.manual_seed(0)
    return RecordingModel(PixelDiT(tiny_dit_cfg), load_text_encoder(str(text_encoder_dir), max_length=16))


def fake_state(model, run_name="r"):
    return SimpleNamespace(model=model, algorithms=[], precision="fp32", run_name=run_name)


def test_tread_guidance_needs_a_trained_or_given_route(model, tmp_path):
    grid = SampleGrid(["a red circle"], folder=str(tmp_path), size=8, steps=1, guidance="tread")
    with pytest.raises(ValueError, match=r"SampleGrid: .*no recorded TREAD route.*\(SampleGrid.tread_route\)"):
        grid.fit_start(fake_state(model), logger=None)
    apply_tread(model, 1, 2, 0.5).remove()  # what Tread records at INIT
    grid.fit_start(fake_state(model), logger=None)
    grid.write(fake_state(model), logger=None, tag="x")
    assert model.calls[-1]["tread_route"] is None and model.calls[-1]["guidance_scale"] is None  # model defaults
    with pytest.raises(ValueError, match="out of range"):
        SampleGrid(["a"], size=8, guidance="tread", tread_route=[0, 9, 0.5]).fit_start(fake_state(model), None)


def test_tread_route_setting_is_checked_at_construction():
    with pytest.raises(ValueError, match="only used with guidance='tread'"):
        SampleGrid(["a"], guidance="cfg", tread_route=[1, 2, 0.5])
    with pytest.raises(ValueError, match="ratio"):
        SampleGrid(["a"], guidance="tread", tread_route=[1, 2, 1.5])


def test_given_route_and_scale_reach_generate(model, tmp_path):
    grid = SampleGrid(["a red circle"], folder=str(tmp_path), size=8, steps=1, guidance="tread",
                      guidance_scale=2.0, tread_route=[0, 1, 0.5])
    grid.fit_start(fake_state(model), logger=None)
    path = grid.write(fake_state(model), logger=None, tag="x")
    assert path.is_file()
    assert model.calls[-1]["tread_route"] == [0, 1, 0.5] and model.calls[-1]["guidance_scale"] == 2.0
