"""python -m composer_prx.report RUN_DIR [--log FILE] -- curves, latest sample grid and summary of one run.

    RUN_DIR/logs/metrics-rank0.txt   Composer FileLogger lines "[metric][batch=N]: name: value"
      -> read_metrics: {name: [(batch, value)]}, the last write of a (name, batch) wins (resumes)
      -> families (loss terms, ShapesEval, throughput, MFU, LR, update RMS, ...)
      -> RUN_DIR/report/curves.png   one panel per family, one line per series, x = batch
    RUN_DIR/config.yaml + the last value of every series -> RUN_DIR/report/summary.md
    the newest SampleGrid PNG                             -> RUN_DIR/report/samples.png

`composer_prx.train` writes the log for every run with `MetricsFileLogger`: Composer's FileLogger, in
append mode (a resumed run keeps its history) and with floats at full precision (the stock logger
writes 4 decimals, which rounds a 1e-4 learning rate or a Muon update RMS to 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import numbers
import re
import shutil
from pathlib import Path

from composer.loggers import FileLogger
from composer.loggers.logger import format_log_data_value

log = logging.getLogger(__name__)

LOG_NAME = "logs/metrics-rank{rank}.txt"  # under the run folder
_METRIC_LINE = re.compile(r"^\[metric\]\[batch=(\d+)\]: (.+): (\S+)\s*$")
# (panel title, pattern on the metric name); first match wins, the rest group by their first path part
FAMILIES = (
    ("loss terms (train)", r"^loss/train/"),
    ("eval", r"^(metrics/eval|loss/eval)/"),
    ("ShapesEval", r"^shapes_eval/"),
    ("throughput (samples/s)", r"samples_per_sec$"),
    ("throughput (batches/s)", r"batches_per_sec$"),
    ("throughput (tokens/s)", r"tokens_per_sec$"),
    ("throughput (FLOP/s)", r"flops_per_sec$"),
    ("MFU", r"mfu$"),
    ("learning rate", r"^lr-"),
    ("update RMS", r"^optimizer/update_rms/"),
    ("wall clock (h)", r"^time/(train|val|total)$"),
)
COUNTERS = r"^time/(epoch|batch|sample|token)(_in_epoch)?$"  # Composer's timestamp: the x axis itself


class MetricsFileLogger(FileLogger):
    """Composer's FileLogger that appends (a resume continues the file) and writes floats with repr()."""

    def __init__(self, filename: str = "{run_name}/" + LOG_NAME, **kwargs):
        kwargs.setdefault("capture_stdout", False)
        kwargs.setdefault("capture_stderr", False)
        super().__init__(filename, **kwargs)

    def init(self, state, logger) -> None:
        del logger
        self._is_newline = True
        self._run_name = state.run_name
        if self.file is not None:
            raise RuntimeError(f"MetricsFileLogger {self.filename} is already open")
        path = Path(self.filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=self.buffer_size)
        self._flush_queue()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for name, value in metrics.items():
            if hasattr(value, "numel") and value.numel() == 1:
                value = value.item()
            exact = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
            text = repr(float(value)) if exact else format_log_data_value(value)
            self.write(f"[metric][batch={step}]: ", f"{name}: {text} \n")


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A FileLogger file -> {metric name: [(batch, value)] sorted by batch}; non-numeric values are skipped."""
    latest: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        batch, name, text = int(match.group(1)), match.group(2), match.group(3)
        try:
            value = float(text)
        except ValueError:  # "None", a quoted string, "Tensor of shape ..."
            continue
        latest.setdefault(name, {})[batch] = value
    return {name: sorted(points.items()) for name, points in sorted(latest.items())}


def family(name: str) -> str:
    """The panel a metric name belongs to (FAMILIES, else its first path component)."""
    for title, pattern in FAMILIES:
        if re.search(pattern, name):
            return title
    return name.split("/")[0]


def group_families(series: dict[str, list]) -> dict[str, list[str]]:
    """{panel title: [metric names]} in FAMILIES order, then the others alphabetically."""
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(family(name), []).append(name)
    order = [title for title, _ in FAMILIES]
    return dict(sorted(groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> list[str]:
    """One panel per family (a line per series against the batch) -> PNG at `path`; returns the panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_families(series)
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, groups.items()):
        for name in names:
            batches, values = zip(*series[name])
            ax.plot(batches, values, marker="." if len(batches) < 30 else None, label=name)
        ax.set_title(panel)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return list(groups)


def latest_sample_grid(run_dir: Path, config: dict) -> Path | None:
    """The newest SampleGrid PNG (final.png, baNNNNNNN.png, epNNNN.png) of the run, or None."""
    folders = [run_dir / "samples"]
    samples = (config.get("callbacks") or {}).get("samples") or {}
    if samples.get("folder"):
        folders.insert(0, Path(str(samples["folder"]).format(run_name=config.get("run_name", run_dir.name))))
    grids = [p for folder in folders if folder.is_dir() for p in folder.iterdir()
             if re.fullmatch(r"(final|ba\d+|ep\d+)\.png", p.name)]
    return max(grids, key=lambda p: p.stat().st_mtime) if grids else None


def config_digest(config_path: Path) -> tuple[str, list[str]]:
    """(sha256 of config.yaml [:12], one line per key setting) of a run's resolved config."""
    from omegaconf import OmegaConf

    text = config_path.read_text()
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    dit = cfg.get("model", {}).get("dit", {})
    data, trainer = cfg.get("data", {}), cfg.get("trainer", {})
    optimizer = dict(cfg.get("optimizer") or {})
    lines = [
        f"model: PixelDiT patch {dit.get('patch_size')}, hidden {dit.get('hidden_dim')}, depth {dit.get('depth')}, "
        f"heads {dit.get('num_heads')}",
        f"data: {(data.get('train') or {}).get('name')}, {data.get('resolution')} px, global batch "
        f"{data.get('global_batch_size')}",
        f"optimizer: {optimizer.pop('name', None)} (lr {optimizer.get('lr')}); scheduler: "
        f"{(cfg.get('scheduler') or {}).get('name')}",
        f"algorithms: {', '.join(cfg.get('algorithms') or {}) or 'none'}; callbacks: "
        f"{', '.join(cfg.get('callbacks') or {}) or 'none'}",
        f"trainer: {trainer.get('max_duration')}, {trainer.get('device')}, {trainer.get('precision')}"
        + (f", {len(cfg['stages'])} stages" if cfg.get("stages") else ""),
    ]
    return hashlib.sha256(text.encode()).hexdigest()[:12], lines


@dataclasses.dataclass
class Report:
    """What write_report wrote: the files, the panels of the PNG and the final value of every series."""

    folder: Path
    curves: Path
    summary: Path
    samples: Path | None
    panels: list[str]
    final: dict[str, tuple[int, float]]


def _format(value: float) -> str:
    return f"{value:.6g}"


def write_report(run_dir: str | Path, log_file: str | Path | None = None) -> Report:
    """Run folder (its metrics log, config.yaml, sample grids) -> run_dir/report/{curves.png, summary.md, samples.png}."""
    run_dir = Path(run_dir)
    log_path = Path(log_file) if log_file else run_dir / LOG_NAME.format(rank=0)
    if not log_path.is_file():
        raise FileNotFoundError(
            f"no metrics log at {log_path}: composer_prx.train writes it for every run (MetricsFileLogger, "
            f"<run_dir>/<run_name>/{LOG_NAME.format(rank=0)}); for a run of your own Trainer add "
            f"composer_prx.report.MetricsFileLogger(filename='{run_dir}/{LOG_NAME}') to its loggers, or pass the "
            "file of Composer's FileLogger with --log FILE")
    series = {name: points for name, points in read_metrics(log_path).items() if not re.match(COUNTERS, name)}
    if not series:
        raise ValueError(f"{log_path} holds no '[metric][batch=N]: name: value' lines of a Composer FileLogger; "
                         "pass --log with the file a FileLogger wrote during training")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    config_path = run_dir / "config.yaml"
    config: dict = {}
    if config_path.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(config_path))
    panels = plot_curves(series, out / "curves.png")
    grid = latest_sample_grid(run_dir, config)
    samples = None
    if grid is not None:
        samples = out / "samples.png"
        shutil.copyfile(grid, samples)

    final = {name: points[-1] for name, points in series.items()}
    last_batch = max(batch for batch, _ in final.values())
    lines = [f"# Run report: {config.get('run_name', run_dir.name)}", ""]
    if config:
        digest, settings = config_digest(config_path)
        lines += [f"- config: `config.yaml` sha256 {digest}"] + [f"  - {s}" for s in settings]
    else:
        lines.append(f"- config: no config.yaml in {run_dir}")
    planned = (config.get("trainer") or {}).get("max_duration")
    lines.append(f"- steps: {last_batch} batches logged" + (f" of {planned}" if planned else ""))
    if "time/total" in final:
        hours = final["time/total"][1]
        lines.append(f"- wall time: {hours * 3600:.1f} s ({hours:.3f} h) training + evaluation, from "
                     "SpeedMonitor's time/total (hours)")
    else:
        lines.append("- wall time: not logged (add `callbacks.speed_monitor: {}` to log time/total)")
    lines.append(f"- curves: `curves.png` ({len(panels)} panels: {', '.join(panels)}), from `{log_path}`")
    lines.append(f"- samples: `samples.png`, a copy of `{grid}`" if grid else
                 "- samples: no sample grid (add `callbacks.samples` to write one)")
    lines += ["", "## Final metrics", "", "| metric | batch | value |", "| --- | ---: | ---: |"]
    lines += [f"| `{name}` | {batch} | {_format(value)} |" for name, (batch, value) in final.items()]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return Report(out, out / "curves.png", summary, samples, panels, final)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.report",
                                     description="curves, the latest sample grid and a summary of one training run")
    parser.add_argument("run_dir", help="the run folder, run_dir/run_name of the training config")
    parser.add_argument("--log", default=None, help=f"a Composer FileLogger file (default RUN_DIR/{LOG_NAME})")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir, args.log)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"report error: {err}") from None
    print(f"wrote {report.curves}, {report.summary}" + (f", {report.samples}" if report.samples else ""))
    return report


if __name__ == "__main__":
    main()
