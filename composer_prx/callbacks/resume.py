"""ExactResume: make a mid-epoch resume continue with the same random numbers as an uninterrupted run.

Composer checkpoints every rank's RNG state but restores it only at an epoch boundary or while it
spins a dataloader; a streaming dataset resumes mid-epoch by itself, so the noise, timesteps and
caption dropout after a resume would otherwise come from the seed again. This callback stores the
RNG states (all ranks) in its own checkpoint entry and loads them just before the first resumed batch
is used (after the dataloader, which may draw from the RNG when a new iterator starts).
"""

from __future__ import annotations

from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import reproducibility


class ExactResume(Callback):
    """Restore all ranks' RNG states at the first batch after loading a checkpoint."""

    def __init__(self) -> None:
        self._pending: list[dict] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": reproducibility.get_rng_state()}  # gathered from every rank

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state["rng"]

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self._pending is not None:
            reproducibility.load_rng_state(self._pending)
            self._pending = None
