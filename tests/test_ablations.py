"""yamls/ablations/*.yaml: each is the 24 h recipe with one technique off, written as `base: ../prx_24h.yaml`."""

import dataclasses
from pathlib import Path

import pytest

from composer_prx import config as C

RECIPE = Path("yamls/prx_24h.yaml")
ABLATIONS = {  # file -> the config keys it may change (and must)
    "no_tread": "algorithms.tread",
    "no_repa": "algorithms.repa",
    "no_lpips": "algorithms.lpips",
    "no_dino": "algorithms.dino_perceptual",
    "no_ema": "algorithms.ema",
    "adamw_instead_of_muon": "optimizer",
}
_ABSENT = object()


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: value}


def test_every_ablation_file_is_listed():
    assert sorted(p.stem for p in Path("yamls/ablations").glob("*.yaml")) == sorted(ABLATIONS)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_differs_from_the_recipe_in_one_technique(name):
    ablation = C.load_config(f"yamls/ablations/{name}.yaml")
    assert ablation.run_name == f"prx_24h_{name}"
    recipe = C.load_config(RECIPE, [f"run_name={ablation.run_name}"])  # paths derived from run_name agree
    a, b = _flatten(dataclasses.asdict(ablation)), _flatten(dataclasses.asdict(recipe))
    changed = {k for k in a.keys() | b.keys() if a.get(k, _ABSENT) != b.get(k, _ABSENT)}
    prefix = ABLATIONS[name]
    assert changed and all(k == prefix or k.startswith(prefix + ".") for k in changed), changed


def test_no_repa_has_no_repa_in_any_stage():
    from composer_prx.algorithms.stages import stage_algorithm_settings

    cfg = C.load_config("yamls/ablations/no_repa.yaml")
    assert all("repa" not in stage_algorithm_settings(cfg.algorithms, s["algorithms"]) for s in cfg.stages)


def test_base_key_stays_strict(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {RECIPE.resolve()}\nalgorithms: {{tread: {{ratio: 0.25}}}}\n")
    cfg = C.load_config(tmp_path / "child.yaml")
    assert cfg.algorithms["tread"] == {"route_start": 1, "route_end": -2, "ratio": 0.25}  # merged, not replaced
    (tmp_path / "typo.yaml").write_text(f"base: {RECIPE.resolve()}\nalgorithm: {{tread: null}}\n")
    with pytest.raises(C.ConfigError, match="unknown key algorithm; valid keys here"):
        C.load_config(tmp_path / "typo.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(C.ConfigError, match="base 'nowhere.yaml' does not exist"):
        C.load_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(C.ConfigError, match="includes itself"):
        C.load_config(tmp_path / "loop.yaml")


def test_merge_over_replaces_a_component_of_another_name():
    base = {"optimizer": {"name": "muon", "lr": 1e-4, "momentum": 0.95}, "algorithms": {"ema": {"smoothing": 0.9}}}
    assert C.merge_over(base, {"optimizer": {"lr": 2e-4}})["optimizer"] == {"name": "muon", "lr": 2e-4,
                                                                           "momentum": 0.95}
    assert C.merge_over(base, {"optimizer": {"name": "adamw"}})["optimizer"] == {"name": "adamw"}
    assert C.merge_over(base, {"algorithms": {"ema": None}})["algorithms"] == {"ema": None}
