"""`python -m composer_prx.bench all`: every bench returns rows (name, value, goal, pass), gathered in one table."""

import importlib
import inspect
import math

import pytest
import torch

from composer_prx.bench import common
from composer_prx.bench.__main__ import BENCHES, main
from composer_prx.bench.common import Row, rows_table

TINY = dict(patch_size=32, hidden_dim=32, num_heads=2, mlp_ratio=2.0)  # narrow, 64 tokens; depth 12 for TREAD 1 -> 10


@pytest.fixture
def tiny_reference(monkeypatch):
    for key, value in TINY.items():  # in place: every bench module sees the same dict
        monkeypatch.setitem(common.REFERENCE, key, value)


def test_every_bench_has_quick_arguments_and_returns_rows():
    for name in BENCHES:
        module = importlib.import_module(f"composer_prx.bench.{name}")
        assert inspect.signature(module.main).return_annotation == "list[Row]", name
        parser = module.arguments()
        quick, default = vars(parser.parse_args(module.QUICK_ARGS)), vars(parser.parse_args([]))
        changed = {k for k in quick if quick[k] != default[k]}
        assert changed and all(quick[k] < default[k] or isinstance(default[k], list) for k in changed), name


def test_all_quick_runs_the_benches_and_prints_one_table_row_per_goal(tiny_reference, capsys):
    rows = main(["all", "--quick", "--benches", "tread"])
    assert [(r.bench, r.op, r.bound) for r in rows] == [("tread", ">=", 1.0), ("tread", "<=", 2.39)]
    assert all(math.isfinite(r.value) and r.value > 0 for r in rows)
    table = capsys.readouterr().out.split("\n| bench |")[-1].strip().splitlines()
    assert len(table) == 2 + len(rows)  # header, rule, one line per goal
    for line, row in zip(table[2:], rows):
        assert f"| `{row.bench}` | {row.name} | {row.value:.3f} | {row.goal} | " in line
        assert line.endswith("| yes |" if row.passed else "| **no** |")


def test_row_goal_and_verdict():
    assert Row("x", "ratio", 1.2, "<=", 1.05).passed is False
    assert Row("x", "ratio", 0.9, "<=", 1.05).passed is True
    missing = Row("x", "ours / theirs", None, "<=", 1.0, note="theirs not installed")
    assert missing.passed is None
    assert "| ours / theirs (theirs not installed) | n/a | <= 1 | not measured |" in rows_table([missing])
    with pytest.raises(ValueError, match="op must be one of"):
        Row("x", "ratio", 1.0, "=<", 1.0)


def test_step_times_prx_s_own_denoiser_with_the_same_weights(tiny_reference):
    from composer_prx.bench import step

    prx = step._prx_model()
    ours = common.reference_model(seed=0)
    batch = common.reference_batch(2, resolution=64, text_tokens=8)
    torch.manual_seed(0)
    theirs_loss = prx.loss(prx(batch), batch)
    torch.manual_seed(0)
    torch.testing.assert_close(theirs_loss, ours.loss(ours(batch), batch))  # the same computation
    rows = step.main(["--rounds", "1", "--steps", "1", "--batch", "2"])
    ratio = next(r for r in rows if r.name == "PRX's denoiser (diffusers) bare step / ours")
    assert (ratio.op, ratio.bound) == (">=", 1.3) and math.isfinite(ratio.value) and ratio.value > 0
