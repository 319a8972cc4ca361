"""TimeBudget stops training by the clock; bench ablate runs its arms, keeps finished ones, and tables them."""

import json

import pytest

from composer_prx import config as C
from composer_prx import train
from composer_prx.bench import ablate
from tests.test_train import SHAPES, tiny_overrides

TINY = ["variables.size=16", "model.dit.hidden_dim=32", "model.dit.depth=4", "model.dit.num_heads=2",
        "model.dit.bottleneck_dim=16", "data.train.n_train=96", "data.global_batch_size=8",
        "callbacks.shapes_eval.steps=2", "callbacks.shapes_eval.max_prompts=2",
        "callbacks.shapes_eval.samples_per_prompt=1", "scheduler.t_warmup=1ba"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def test_time_budget_stops_training_and_still_evaluates(tmp_path, data_root):
    trainer = train.main([SHAPES, *tiny_overrides(tmp_path, data_root, duration="100000ba"),
                          "callbacks.time_budget={seconds: 1.0}", "callbacks.samples=null"])
    budget = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "TimeBudget")
    done = int(trainer.state.timestamp.batch)
    assert budget.batches == done and 1 <= done < 100000
    shapes_eval = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "ShapesEval")
    assert set(shapes_eval.results) == {"1obj", "2obj"}  # FIT_END still ran
    with pytest.raises(ValueError, match="seconds must be > 0"):
        C.resolve("callbacks", "time_budget")(seconds=0)


@pytest.mark.parametrize("arm", [*ablate.ARMS, ablate.NO_LPIPS])
def test_each_arm_is_the_baseline_plus_its_techniques(arm):
    cfg = C.load_config(ablate.arm_config(arm), ablate.arm_overrides(arm, teacher="/t", lpips="/vgg.pth"))
    techniques = set(ablate.ALL_ARMS[arm])
    algorithm_of = {"ema": "ema", "tread": "tread", "repa": "repa", "lpips": "lpips", "dino": "dino_perceptual"}
    expected = {algorithm_of[t] for t in techniques if t in algorithm_of} | {"gradient_clipping"}
    assert {k for k, v in cfg.algorithms.items() if v is not None} == expected
    assert C._split_component(cfg.optimizer, "optimizer")[0] == ("muon" if "muon" in techniques else "adamw")
    if arm == ablate.MINIATURE:  # the quickstart as it is: two stages, REPA off in the second
        assert [s["resolution"] for s in cfg.stages] == [16, 32] and cfg.stages[1]["algorithms"] == {"repa": False}


def test_the_recipe_in_miniature_runs_to_the_clock_or_its_stages():
    overrides = ablate.run_overrides(ablate.MINIATURE, 3, 240.0, ablate.Path("/o"), "/d", "/d/teacher", None, [])
    assert "callbacks.time_budget={seconds: 240.0}" in overrides
    assert not any(o.startswith("trainer.max_duration") for o in overrides)  # the stages set it
    cfg = C.load_config(ablate.QUICKSTART, overrides)
    assert cfg.trainer.max_duration == C.load_config(ablate.QUICKSTART).trainer.max_duration and cfg.seed == 3
    arms, skipped = ablate.planned_arms(["baseline", ablate.MINIATURE], True, by_batches=True)
    assert arms == ["baseline"] and "stages fix its batches" in skipped[ablate.MINIATURE]
    assert ablate.planned_arms(["baseline", ablate.MINIATURE], False)[0] == ["baseline", ablate.MINIATURE]


def test_without_lpips_the_full_recipe_runs_under_its_own_name():
    everything = list(ablate.ARMS)
    assert ablate.planned_arms(everything, True) == (everything, {})
    arms, skipped = ablate.planned_arms(everything, False, "/no/vgg.pth")
    assert arms == [a for a in ablate.ALL_ARMS if a not in ("+lpips", "full recipe")]
    assert skipped == {"+lpips": "no LPIPS backbone at --lpips-backbone /no/vgg.pth"}
    assert ablate.planned_arms(["baseline", "full recipe"], False) == (["baseline", ablate.NO_LPIPS], {})
    assert ablate.planned_arms(["+lpips"], False)[1] == {  # no path given: say which flag and file, not "None"
        "+lpips": "no LPIPS backbone (pass --lpips-backbone with torchvision's vgg16-397923af.pth)"}
    assert set(ablate.ALL_ARMS[ablate.NO_LPIPS]) == set(ablate.ARMS["full recipe"]) - {"lpips"}
    assert ablate.run_name(ablate.NO_LPIPS, 3) != ablate.run_name("full recipe", 3)  # never kept in place of it


def test_ablate_runs_keeps_finished_arms_and_tables_them(tmp_path, data_root, capsys):
    out = tmp_path / "ablate"
    argv = ["--seconds", "0.5", "--seeds", "1", "2", "--arms", "baseline", "+tread", "+lpips", "--out", str(out),
            "--data-root", str(data_root), "--set", *TINY]
    text = ablate.main(argv)
    out = out / "0.5s"  # each budget keeps its own results
    results = sorted(p.name for p in (out / "results").iterdir())
    assert results == ["baseline-s1.json", "baseline-s2.json", "tread-s1.json", "tread-s2.json"]
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {"baseline", "+tread", "+lpips"}
    assert "not run: no LPIPS backbone" in rows["+lpips"]
    assert rows["+tread"].split(" | ")[1] == "2"  # two seeds
    first = json.loads((out / "results" / "tread-s1.json").read_text())
    assert first["batches"] >= 1 and set(first["scores"]) == {"1obj", "2obj"}
    assert "algorithms.tread={route_start: 1, route_end: -2, ratio: 0.5}" in first["overrides"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert ablate.main(argv) == text  # a rerun keeps every finished (arm, seed): nothing trains again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamps
    # a kept result must have run with today's settings: another --set reruns that arm, not the others
    changed = [a if a != "callbacks.shapes_eval.max_prompts=2" else "callbacks.shapes_eval.max_prompts=1" for a in argv]
    ablate.main([*changed[:changed.index("--arms")], "--arms", "+tread", *changed[changed.index("--out"):]])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert after["tread-s1.json"] != stamps["tread-s1.json"] and after["baseline-s1.json"] == stamps["baseline-s1.json"]
    assert "callbacks.shapes_eval.max_prompts=1" in json.loads((out / "results" / "tread-s1.json").read_text())["overrides"]
    steps = ablate.main(["--batches", "2", "--seeds", "1", "--arms", "baseline", "--out", str(tmp_path / "ablate"),
                         "--data-root", str(data_root), "--set", *TINY])
    assert json.loads((tmp_path / "ablate" / "2ba" / "results" / "baseline-s1.json").read_text())["batches"] == 2
    assert "batches (2 per run)" in steps
    with pytest.raises(SystemExit, match="unknown arms"):
        ablate.main(["--arms", "nope"])


def test_the_recipe_in_miniature_arm_trains_the_quickstart(tmp_path):
    out = tmp_path / "ablate"
    text = ablate.main(["--seconds", "0.5", "--seeds", "1", "--arms", ablate.MINIATURE, "--out", str(out),
                        "--data-root", str(tmp_path / "shapes"), "--teacher-steps", "2",
                        "--set", *[o for o in TINY if not o.startswith(("data.global_batch_size", "scheduler"))]])
    result = json.loads((out / "0.5s" / "results" / "recipe_in_miniature-s1.json").read_text())
    stages_end = int(C.load_config(ablate.QUICKSTART).trainer.max_duration.removesuffix("ba"))
    assert 1 <= result["batches"] < stages_end and set(result["scores"]) == {"1obj", "2obj"}  # the clock stopped it
    assert text.splitlines()[2].startswith(f"| {ablate.MINIATURE} | 1 |")
