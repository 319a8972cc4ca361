"""Open registries: a user's own algorithm, callback or model by name from the YAML, by register() or entry point."""

import logging
import textwrap
from pathlib import Path

import pytest
from composer.core import Algorithm, Callback, Event

from composer_prx import config as C
from composer_prx import train
from tests.test_train import SHAPES, tiny_overrides


@pytest.fixture(autouse=True)
def clean_registries():
    """Each test starts from the package's own registries and leaves them so."""
    saved = {name: dict(table) for name, table in C.REGISTRIES.items()}
    yield
    for name, table in C.REGISTRIES.items():
        table.clear()
        table.update(saved[name])
    C._entry_points_loaded = False


class CountBatches(Algorithm):
    """A user's algorithm: counts the batches it sees and adds `bonus` to the loss."""

    def __init__(self, bonus: float = 0.0):
        self.bonus = bonus
        self.batches = 0
        self.losses: list[float] = []

    def match(self, event, state):
        return event in (Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event, state, logger):
        if event == Event.AFTER_LOSS:
            state.loss = state.loss + self.bonus
            self.losses.append(float(state.loss))
        else:
            self.batches += 1


@pytest.mark.parametrize("entry", [CountBatches, "tests.test_registry:CountBatches"], ids=["object", "path"])
def test_user_registered_algorithm_runs_from_the_yaml(tmp_path, entry):
    C.register("algorithms", "count_batches", entry)
    overrides = [*tiny_overrides(tmp_path, tmp_path / "shapes", duration="3ba"), "callbacks.samples=null",
                 "callbacks.shapes_eval=null", "algorithms.count_batches={bonus: 100.0}"]
    cfg = C.load_config(SHAPES, overrides)
    trainer = train.build_trainer(cfg)
    trainer.fit()
    mine = [a for a in trainer.state.algorithms if isinstance(a, CountBatches)]
    assert len(mine) == 1 and mine[0].batches == 3 and all(loss > 100.0 for loss in mine[0].losses)
    with pytest.raises(C.ConfigError, match=r"unknown key algorithms.count_batches.bonsu; valid keys here: \['bonus'\]"):
        C.load_config(SHAPES, ["algorithms.count_batches={bonsu: 1.0}"])
    trainer.close()


class PluginCallback(Callback):
    def __init__(self, every: int = 1):
        self.every = every


def write_plugin(root: Path, group: str, lines: str) -> None:
    """A minimal installed distribution (a .dist-info with entry_points.txt) on a folder for sys.path."""
    (root / "my_prx_plugin.py").write_text("from tests.test_registry import PluginCallback\n")
    info = root / "my_prx_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-prx-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + textwrap.dedent(lines))


def test_entry_point_registers_a_callback(tmp_path, monkeypatch, caplog):
    write_plugin(tmp_path, "composer_prx.callbacks", """\
        plugin_cb = my_prx_plugin:PluginCallback
        samples = my_prx_plugin:PluginCallback
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="composer_prx.config"):
        C.load_entry_points()
    assert C.resolve("callbacks", "plugin_cb") is PluginCallback
    assert C.resolve("callbacks", "samples").__name__ == "SampleGrid"  # a built-in name is not taken over
    assert "entry point samples = my_prx_plugin:PluginCallback" in caplog.text
    cfg = C.load_config(SHAPES, ["callbacks.plugin_cb={every: 3}"])
    assert cfg.callbacks["plugin_cb"] == {"every": 3}
    with pytest.raises(C.ConfigError, match="callbacks.plugin_cb.every must be int"):
        C.load_config(SHAPES, ["callbacks.plugin_cb={every: often}"])


def test_registered_model_builder_gets_the_config_and_its_settings(tmp_path):
    built = {}

    def build_my_model(cfg, width: int = 8):
        built.update(cfg=cfg, width=width)
        return "my model"

    C.register("model", "mine", build_my_model)
    cfg = C.load_config(SHAPES, ["model.name=mine", "model.settings={width: 16}"])
    assert train.build_model(cfg) == "my model" and built == {"cfg": cfg, "width": 16}
    with pytest.raises(C.ConfigError, match=r"unknown key model.settings \(mine\).widht; valid keys here: \['width'\]"):
        C.load_config(SHAPES, ["model.name=mine", "model.settings={widht: 16}"])
    with pytest.raises(C.ConfigError, match=r"unknown model name 'theirs'; registered names: \['mine', 'prx'\]"):
        C.load_config(SHAPES, ["model.name=theirs"])


def test_register_errors_name_the_problem():
    with pytest.raises(C.ConfigError, match=r"unknown registry 'algorithm'; registries: \['algorithms'"):
        C.register("algorithm", "x", CountBatches)
    with pytest.raises(C.ConfigError, match="must read 'module:attribute'"):
        C.register("algorithms", "x", "tests.test_registry.CountBatches")
    with pytest.raises(C.ConfigError, match="'ema' is already registered to 'composer_prx.algorithms.ema:EMA'"):
        C.register("algorithms", "ema", CountBatches)
    C.register("algorithms", "count", CountBatches)
    C.register("algorithms", "count", CountBatches)  # the same object again is fine
    C.register("algorithms", "missing", "tests.test_registry:NoSuchThing")
    with pytest.raises(C.ConfigError, match="registered as 'tests.test_registry:NoSuchThing', which cannot be imported"):
        C.resolve("algorithms", "missing")
