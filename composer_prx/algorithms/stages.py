"""Training stages in one run: each stage has its own duration (batches), resolution, global batch,
device microbatch and algorithm overrides; the boundary switches all of them.

    stage k covers batches [B_0 + ... + B_{k-1}, B_0 + ... + B_k)      (one time unit: batches)

`StagedLoader` is the single train loader Composer sees (one Composer epoch = the whole schedule): it
builds stage k's loader when stage k begins and keeps its own position (stage, batches done in the
stage, the stage loader's dataset state), which Composer checkpoints as the train dataset state and
restores into the loader built at Trainer init, so a resume continues in the right stage with the
right data. `Stages` (a callback installed with it) sets `device_train_microbatch_size` for every
batch (Composer reads it per batch but does not checkpoint it), swaps the stage's algorithms in at
the boundary and after a resume (an algorithm leaving runs its FIT_END, one entering its INIT and
FIT_START), and logs `stage`. The README section "Stages" shows the YAML.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from composer.core import Algorithm, Callback, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

_END = object()
OFF = (None, False, "off")  # `name: off` / `name: null` in a stage's algorithms switches it off


@dataclass
class StageSection:
    """One stage of `stages:`; unset fields keep the top-level value (data.resolution, ...)."""

    duration: str  # batches, e.g. "100000ba"
    name: str | None = None
    resolution: int | None = None
    global_batch_size: int | None = None
    device_train_microbatch_size: int | None = None
    algorithms: dict[str, Any] = field(default_factory=dict)  # name -> off | {changed settings}

    @property
    def batches(self) -> int:
        time = Time.from_timestring(str(self.duration))
        if time.unit != TimeUnit.BATCH or time.value < 1:
            raise ValueError(f"a stage's duration must be a positive number of batches like '100000ba', got "
                             f"{self.duration!r} (samples and batches drift apart when the batch size changes)")
        return int(time.value)


def stage_algorithm_settings(base: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The algorithms of one stage: top-level settings, minus those switched off, with changed settings merged."""
    settings = {k: dict(v) for k, v in base.items()}
    for name, change in overrides.items():
        if change in OFF:
            settings.pop(name, None)
        elif isinstance(change, dict):
            settings[name] = {**settings.get(name, {}), **change}
        else:
            raise ValueError(f"stages[].algorithms.{name} must be off/null or a mapping of changed settings, "
                             f"got {change!r}")
    return settings


def stage_of(boundaries: list[int], batch: int) -> int:
    """Index of the stage that batch number `batch` (0-based) belongs to; the last stage past the end."""
    for k, end in enumerate(boundaries):
        if batch < end:
            return k
    return len(boundaries) - 1


@contextlib.contextmanager
def _rng_untouched():
    """Restore the host RNGs (torch CPU, numpy, random) after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


class _Position(IterableDataset):
    """The `.dataset` Composer checkpoints: the StagedLoader's position."""

    def __init__(self, loader: "StagedLoader"):
        self.loader = loader

    def __iter__(self):
        raise TypeError("iterate the StagedLoader, not its dataset")

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        return self.loader.position_state(num_samples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_position(state)


class StagedLoader(DataLoader):
    """One loader over all stages: stage k's loader (built by `builders[k]()`) for `batches[k]` batches."""

    def __init__(self, builders: list[Callable[[], DataLoader]], batches: list[int], world_size: int = 1):
        super().__init__(_Position(self), batch_size=None)
        self.builders, self.stage_batches = list(builders), list(batches)
        self.boundaries = [sum(batches[:k + 1]) for k in range(len(batches))]
        self.stage, self.done, self.inner_offset = 0, 0, 0  # stage, batches done in it, samples before its pass
        self.new_pass = False  # the last batch began a new pass of the stage loader (Stages sets inner_offset)
        self._inner: DataLoader | None = None
        self._inner_stage: int | None = None
        self._pending_inner: dict[str, Any] | None = None

    def __len__(self) -> int:
        return sum(self.stage_batches)

    def inner(self) -> DataLoader:
        """The current stage's loader, built on first use (the previous stage's is dropped first)."""
        if self._inner_stage != self.stage:
            self._inner = None
            gc.collect()  # the previous stage's dataset goes first (a resumed run never had it)
            self._inner = self.builders[self.stage]()
            self._inner_stage = self.stage
            if self._pending_inner is not None:
                self._inner.dataset.load_state_dict(self._pending_inner)
                self._pending_inner = None
        return self._inner

    def position_state(self, num_samples: int) -> dict[str, Any]:
        """The position; `num_samples` (Composer's samples this epoch) locates the stage loader's pass."""
        stage, done, offset = self.stage, self.done, self.inner_offset
        if done >= self.stage_batches[stage] and stage + 1 < len(self.stage_batches):
            return {"stage": stage + 1, "done": 0, "inner_offset": num_samples, "inner": None}
        inner = None
        dataset = getattr(self._inner, "dataset", None) if self._inner_stage == stage else None
        if dataset is not None and hasattr(dataset, "state_dict"):
            inner = dataset.state_dict(max(0, num_samples - offset), True)
        return {"stage": stage, "done": done, "inner_offset": offset, "inner": inner}

    def load_position(self, state: dict[str, Any]) -> None:
        if state is None:
            return
        self.stage, self.done, self.inner_offset = int(state["stage"]), int(state["done"]), int(state["inner_offset"])
        self._inner, self._inner_stage = None, None
        self._pending_inner = state["inner"]
        self._resuming = True  # the first pass continues the saved one (its inner_offset stays)
        if self._pending_inner is None and self.done:  # a stage loader without a state: skip what was seen
            self._skip = self.done
        log.info("resuming in stage %d after %d of its %d batches", self.stage, self.done,
                 self.stage_batches[self.stage])

    def __iter__(self) -> Iterator[Any]:
        skip = getattr(self, "_skip", 0)
        resuming = getattr(self, "_resuming", False)
        self._skip, self._resuming = 0, False
        while self.stage < len(self.stage_batches):
            while self.done < self.stage_batches[self.stage]:
                self.new_pass = not resuming
                resuming = False
                with _rng_untouched():  # a new pass may draw from the RNG (iterator seed, epoch set-up), which
                    batches = iter(self.inner())  # a resume restores only after its first batch: draw nothing
                    first = next(batches, _END)
                for batch in itertools.chain([] if first is _END else [first], batches):
                    if skip:
                        skip -= 1
                        continue
                    self.done += 1
                    yield batch
                    self.new_pass = False
                    if self.done >= self.stage_batches[self.stage]:
                        break
                else:
                    if self.new_pass:
                        raise RuntimeError(f"the loader of stage {self.stage} yielded no batches")
                    # the stage's loader ended a pass: its next pass continues the stage
            if self.stage + 1 >= len(self.stage_batches):
                break
            self.stage, self.done = self.stage + 1, 0


class Stages(Callback):
    """Per-stage device microbatch and algorithms, stage logging; installed with a StagedLoader."""

    def __init__(self, loader: StagedLoader, stages: list[StageSection], algorithms: list[list[Algorithm]],
                 microbatches: list[int | str | None]):
        self.loader, self.stages, self.algorithms, self.microbatches = loader, stages, algorithms, microbatches
        self.active: int | None = None
        self.seen: dict[int, dict[str, Any]] = {}  # per stage, what its first batch really had (summary)

    def _name(self, k: int) -> str:
        return self.stages[k].name or f"stage{k}"

    def _switch(self, state: State, logger: Logger, k: int) -> None:
        if self.active == k:
            return
        current = list(state.algorithms)
        wanted = self.algorithms[k]
        managed = [a for stage in self.algorithms for a in stage]
        leaving = [a for a in current if any(a is m for m in managed) and not any(a is w for w in wanted)]
        entering = [a for a in wanted if not any(a is c for c in current)]
        for algorithm in leaving:
            if algorithm.match(Event.FIT_END, state):
                algorithm.apply(Event.FIT_END, state, logger)
        kept = [a for a in current if not any(a is g for g in leaving)]
        state.algorithms = kept + entering
        for algorithm in entering:
            for event in (Event.INIT, Event.FIT_START):
                if algorithm.match(event, state):
                    algorithm.apply(event, state, logger)
        log.info("stage %d (%s) from batch %d: resolution/batch %s/%s, algorithms %s", k, self._name(k),
                 int(state.timestamp.batch), self.stages[k].resolution, self.stages[k].global_batch_size,
                 [type(a).__name__ for a in state.algorithms])
        self.active = k
        logger.log_metrics({"stage": k})

    def fit_start(self, state: State, logger: Logger) -> None:
        self._switch(state, logger, stage_of(self.loader.boundaries, int(state.timestamp.batch)))

    def after_dataloader(self, state: State, logger: Logger) -> None:
        k = stage_of(self.loader.boundaries, int(state.timestamp.batch))
        if self.loader.new_pass:  # samples before this pass of the stage loader, for its dataset state
            self.loader.inner_offset = int(state.timestamp.sample_in_epoch)
        if self.microbatches[k] is not None and self.microbatches[k] != "auto":
            state.device_train_microbatch_size = int(self.microbatches[k])
        if k not in self.seen:
            image = state.batch.get("image") if isinstance(state.batch, dict) else None
            self.seen[k] = {"first_batch": int(state.timestamp.batch),
                            "image": tuple(image.shape[-2:]) if image is not None else None,
                            "device_batch": int(image.shape[0]) if image is not None else None,
                            "microbatch": state.device_train_microbatch_size,
                            "algorithms": [type(a).__name__ for a in state.algorithms]}
            logger.log_metrics({"stage/index": k, "stage/device_batch": self.seen[k]["device_batch"] or 0})

    def batch_end(self, state: State, logger: Logger) -> None:
        seen = self.seen.get(self.active)
        if seen is not None and "tokens_per_block" not in seen:  # what each block processed (TREAD routes)
            model = getattr(state.model, "module", state.model)
            seen["tokens_per_block"] = list(getattr(model, "_train_tokens", None) or [])
        self._switch(state, logger, stage_of(self.loader.boundaries, int(state.timestamp.batch)))
        logger.log_metrics({"stage": self.active})

    def summary(self) -> str:
        """One line per stage this process ran: first batch, image size, device batch, microbatch, algorithms."""
        lines = []
        for k, seen in sorted(self.seen.items()):
            lines.append(f"stage {k} ({self._name(k)}) from batch {seen['first_batch']}: image {seen['image']}, "
                         f"device batch {seen['device_batch']}, microbatch {seen['microbatch']}, algorithms "
                         f"{seen['algorithms']}, tokens per block {seen.get('tokens_per_block')}")
        return "\n".join(lines)
