"""EMA: exponential moving averages of the weights, sharded with the model, several smoothings at once.

    every `update_interval` (from batch 0):  avg_s <- s * avg_s + (1 - s) * theta      for each smoothing s

Each average is an fp32 copy of every trainable parameter, made after the Trainer has wrapped the
model: under FSDP2 the parameters are DTensors and each average is a DTensor with the same sharding,
so an update is a local `lerp_` on each rank's shard (no communication). Single-process and DDP hold
plain tensors. The averages live in this algorithm's checkpoint entry (sharded checkpoints save them
sharded; a full-state checkpoint gathers them), and `swapped_in(state, name)` puts one of them into
the model for sampling and evaluation. Unlike Composer's EMA the model always holds the trained
weights, so a checkpoint's model state is the trained model and the averages are read by name
(`generate --ema NAME`, `export --ema NAME`, `SampleGrid(ema=NAME)`).

smoothings: a float (named "ema"), a list of floats (named "ema_0.999", ...) or {name: smoothing}.
The README section "EMA under FSDP2" has the details.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from composer.core import Algorithm, Callback, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import Tensor, nn

log = logging.getLogger(__name__)

FORMAT = "composer_prx.ema/1"


def smoothing_names(smoothing: float | list[float] | dict[str, float]) -> dict[str, float]:
    """The `smoothing` setting -> {name: smoothing}; each smoothing in [0, 1)."""
    if isinstance(smoothing, dict):
        named = {str(k): float(v) for k, v in smoothing.items()}
    elif isinstance(smoothing, (list, tuple)):
        named = {f"ema_{float(s):g}": float(s) for s in smoothing}
    else:
        named = {"ema": float(smoothing)}
    if not named:
        raise ValueError("EMA.smoothing is empty; give a float (e.g. 0.999), a list or {name: smoothing}")
    bad = {k: v for k, v in named.items() if not 0.0 <= v < 1.0}
    if bad:
        raise ValueError(f"EMA smoothings must be in [0, 1), got {bad}")
    return named


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (what this rank stores), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA(Algorithm):
    """Several EMAs of the trainable weights (fp32, sharded like the parameters), updated every `update_interval`.

    smoothing: float, list or {name: float} (see module docstring). update_interval: a batch time
    string ("10ba"). half_life must be None (kept for the quickstart's Composer-style settings).
    """

    def __init__(self, smoothing: float | list[float] | dict[str, float] = 0.999, update_interval: str = "1ba",
                 half_life: str | None = None):
        if half_life is not None:
            raise ValueError("EMA.half_life is not supported; give smoothing directly (PRX: 0.999 every 10ba), "
                             "e.g. algorithms.ema={smoothing: 0.999, update_interval: 10ba}")
        interval = Time.from_timestring(str(update_interval))
        if interval.unit != TimeUnit.BATCH or interval.value < 1:
            raise ValueError(f"EMA.update_interval must be a positive number of batches like '10ba', got "
                             f"{update_interval!r} (batches stay the unit when the batch size changes between stages)")
        self.smoothings = smoothing_names(smoothing)
        self.update_interval = int(interval.value)
        self.averages: dict[str, dict[str, Tensor]] | None = None
        self.updates = 0
        self._model: State | None = None
        self._full_state = False
        self._pending: dict[str, Any] | None = None

    # ---- storage ------------------------------------------------------------------------------
    def _bind(self, state: State) -> None:
        self._model = state  # read lazily: the Trainer wraps (DDP) or shards (FSDP2) the model after INIT
        fsdp = getattr(state, "fsdp_config", None)
        self._full_state = fsdp is not None and getattr(fsdp, "state_dict_type", "sharded") == "full"

    def _ensure_storage(self) -> None:
        """fp32 copies of the parameters as they are now (sharded DTensors under FSDP2)."""
        if self.averages is not None:
            return
        with torch.no_grad():
            self.averages = {name: {n: p.detach().float().clone() for n, p in self._params.items()}
                             for name in self.smoothings}
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    @property
    def _params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters as they are now (FSDP2 replaces them by DTensors when it wraps)."""
        if self._model is None:
            raise RuntimeError("EMA is used before Event.INIT; add it to the Trainer's algorithms")
        model = self._model.model
        if isinstance(model, nn.parallel.DistributedDataParallel):  # names as in the checkpoint's model state
            model = model.module
        for module in model.modules():  # a forward outside training (sampling) can leave FSDP2's root unsharded:
            if hasattr(module, "reshard") and hasattr(module, "unshard"):  # averages pair with the shards
                module.reshard()
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._bind(state)
            if not any(isinstance(c, EMAAverages) and c.ema is self for c in state.callbacks):
                state.callbacks.append(EMAAverages(self))  # holds the averages in the checkpoint (see below)
        elif event == Event.FIT_START:
            self._ensure_storage()
        elif event == Event.BATCH_END and int(state.timestamp.batch) % self.update_interval == 0:
            self.update()
            logger.log_metrics({"ema/updates": self.updates})

    @torch.no_grad()
    def update(self) -> None:
        """avg <- s avg + (1 - s) theta for every smoothing, on the local shards."""
        self._ensure_storage()
        params = self._params
        for name, s in self.smoothings.items():
            average = self.averages[name]
            for n, p in params.items():
                _local(average[n]).lerp_(_local(p.detach()).float(), 1.0 - s)
        self.updates += 1

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "smoothings": dict(self.smoothings), "update_interval": self.update_interval,
                "updates": self.updates}

    def averages_state(self) -> dict[str, Any]:
        """{"format", "averages": {name: {param: tensor}}}: DTensor shards (sharded checkpoints) or whole tensors."""
        self._ensure_storage()
        averages = self.averages
        if self._full_state:  # a full-state checkpoint holds whole tensors (every rank takes part)
            averages = {k: {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in v.items()}
                        for k, v in averages.items()}
        return {"format": FORMAT, "averages": averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError("this checkpoint's EMA state is not composer_prx's EMA (an old Composer-EMA "
                             "checkpoint?); resume it with algorithms.ema=null, or export/generate from it")
        self.updates = int(state.get("updates", 0))

    def load_averages(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError("this checkpoint's EMA state is not composer_prx's EMA (an old Composer-EMA "
                             "checkpoint?); resume it with algorithms.ema=null, or export/generate from it")
        if self.averages is None:
            self._pending = state
            if self._model is not None:
                self._ensure_storage()
            return
        self._load(state)

    @torch.no_grad()
    def _load(self, state: dict[str, Any]) -> None:
        saved = state["averages"]
        params = self._params
        for name in self.smoothings:
            if name not in saved:
                log.warning("EMA %r is not in the checkpoint (it has %s); it starts from the loaded weights",
                            name, sorted(saved))
                for n, p in params.items():
                    _local(self.averages[name][n]).copy_(_local(p.detach()).float())
                continue
            for n, target in self.averages[name].items():
                source = saved[name][n]
                if source is target:
                    continue  # a sharded load wrote into our storage in place
                if hasattr(target, "to_local") and not hasattr(source, "to_local"):  # full tensor -> our shard
                    from torch.distributed.tensor import distribute_tensor

                    source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
                _local(target).copy_(_local(source))

    # ---- using an average -------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self, name: str | None = None) -> Iterator[None]:
        """Put average `name` (default: the first) into the model's parameters for the duration."""
        self._ensure_storage()
        name = self.default_name if name is None else name
        if name not in self.averages:
            raise ValueError(f"no EMA named {name!r}; this run has {sorted(self.averages)}")
        average = self.averages[name]
        params = self._params
        with torch.no_grad():
            saved = {n: _local(p.detach()).clone() for n, p in params.items()}
            for n, p in params.items():
                _local(p.detach()).copy_(_local(average[n]))
        try:
            yield
        finally:
            params = self._params  # resharded again after the sampling inside
            with torch.no_grad():
                for n, p in params.items():
                    _local(p.detach()).copy_(saved[n])

    def summary(self) -> str:
        return (f"EMA {', '.join(f'{k}={v}' for k, v in self.smoothings.items())}: {self.updates} updates "
                f"(every {self.update_interval} batches)")

    @property
    def default_name(self) -> str:
        return next(iter(self.smoothings))


class EMAAverages(Callback):
    """Carries an EMA's averages in the checkpoint's callback entry (a mapping, which sharded checkpoints
    walk into, so each DTensor shard is saved by its rank; the algorithm list is saved as one object)."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        return self.ema.averages_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_averages(state)


def find_ema(state: State) -> EMA | None:
    return next((a for a in state.algorithms if isinstance(a, EMA)), None)


def checkpoint_averages(checkpoint_state: dict[str, Any]) -> dict[str, dict[str, Tensor]] | None:
    """{name: {param name: tensor}} of a loaded (single-file) checkpoint of our EMA, or None without it."""
    entry = (checkpoint_state.get("state", {}).get("callbacks") or {}).get("EMAAverages")
    if isinstance(entry, dict) and entry.get("format") == FORMAT:
        return entry["averages"]
    return None
