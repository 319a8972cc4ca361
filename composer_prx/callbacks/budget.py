"""TimeBudget: end training once a wall-clock budget is spent (every rank stops at the same batch).

    elapsed = now - time at FIT_START;  stop after the first batch with max over ranks(elapsed) >= seconds

Composer's `max_duration` counts batches, samples or epochs, not seconds; a fixed-time comparison
(`python -m composer_prx.bench ablate`) or a job with a hard time limit needs the clock. FIT_END still
runs (evaluation callbacks score the model as trained so far), and the batches done are logged.
"""

from __future__ import annotations

import logging
import time

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


class TimeBudget(Callback):
    """Stop training after `seconds` of wall clock from FIT_START (checked at every BATCH_END)."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"time_budget seconds must be > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self._start: float | None = None
        self.batches: int | None = None  # batches trained when the budget ended it (None: it did not)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        elapsed = torch.tensor([time.perf_counter() - self._start], dtype=torch.float64)
        dist.all_reduce(elapsed, reduce_operation="MAX")  # the ranks' clocks differ: stop all at one batch
        if elapsed.item() >= self.seconds:
            self.batches = int(state.timestamp.batch)
            logger.log_metrics({"time_budget/batches": self.batches})
            log.info("time budget of %.0f s spent after %d batches: stopping", self.seconds, self.batches)
            state.stop_training()
