"""composer_prx.report on a real tiny training run: curves PNG, latest sample grid, markdown summary, resume."""

import math

import pytest
from PIL import Image

from composer_prx import report, train
from tests.test_train import SHAPES, tiny_overrides

# What the run below logs, as panels: the quickstart's loss, EMA, SpeedMonitor and ShapesEval, plus LR
# and Muon's update RMS switched on by the overrides.
EXPECTED_PANELS = ["loss terms (train)", "ShapesEval", "throughput (samples/s)", "throughput (batches/s)",
                   "throughput (FLOP/s)", "learning rate", "update RMS", "wall clock (h)", "ema", "trainer"]


def _row(name: str, batch: int, value: float) -> str:
    return f"| `{name}` | {batch} | {value:.6g} |"


def test_report_of_a_tiny_run_and_of_its_resume(tmp_path):
    data_root = tmp_path / "shapes"
    overrides = [*tiny_overrides(tmp_path, data_root, "rep", "4ba"), "optimizer.name=muon", "callbacks.lr_monitor={}",
                 "callbacks.update_rms={}", "callbacks.speed_monitor.window_size=1", "callbacks.samples.interval=null",
                 "callbacks.shapes_eval.max_prompts=2", "trainer.save_interval=3ba"]
    trainer = train.main([SHAPES, *overrides])
    run = tmp_path / "runs" / "rep"
    first = report.main([str(run)])

    assert first.panels == EXPECTED_PANELS
    png = Image.open(first.curves)
    columns, rows = 3, math.ceil(len(EXPECTED_PANELS) / 3)  # the grid plot_curves lays out, at 100 dpi
    assert png.size == (round(5.2 * columns * 100), round(3.4 * rows * 100))
    assert first.samples.read_bytes() == (run / "samples" / "final.png").read_bytes()

    summary = first.summary.read_text()
    shapes_eval = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "ShapesEval")
    for n_objects, scores in shapes_eval.results.items():
        for key, value in scores.items():
            assert _row(f"shapes_eval/{n_objects}/{key}", 4, value) in summary
    assert _row("loss/train/total", 3, trainer.state.loss.item()) in summary  # logged before the batch counts
    assert "- steps: 4 batches logged of 4ba" in summary
    assert "- wall time: " in summary and "not logged" not in summary
    assert "time/batch" not in summary  # Composer's timestamp counters are the x axis, not curves

    # resume from batch 3 in the same run folder: the log keeps batches 1-4 of the first fit and the
    # resumed fit's batch 4 replaces the first one's
    resumed = train.main([SHAPES, *overrides, f"trainer.load_path={run}/checkpoints/ep0-ba3-rank0.pt",
                          "trainer.save_overwrite=true"])
    log = run / report.LOG_NAME.format(rank=0)
    assert log.read_text().count("[metric][batch=3]: loss/train/total: ") == 2
    series = report.read_metrics(log)
    assert [batch for batch, _ in series["loss/train/total"]] == [0, 1, 2, 3]
    assert series["loss/train/total"][-1][1] == resumed.state.loss.item()


def test_run_dir_without_a_log_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "config.yaml").write_text("run_name: x\n")
    with pytest.raises(SystemExit, match=r"no metrics log at .*logs/metrics-rank0.txt.*MetricsFileLogger"):
        report.main([str(tmp_path)])
    log = tmp_path / "logs" / "metrics-rank0.txt"
    log.parent.mkdir()
    log.write_text("[stdout]: hello\n")
    with pytest.raises(SystemExit, match=r"holds no '\[metric\]\[batch=N\]: name: value' lines"):
        report.main([str(tmp_path)])
