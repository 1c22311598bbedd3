"""One loop contract for the three trainers (the AR's and the AV's warm starts, joint RL).

Each trainer is built from ready objects (models, rows, optimizers, accelerator) and says only what
its own step, held-out check and checkpoint state are; `Trainer.fit` drives all three the same way:

    result = trainer.fit(start, Cadence(steps, log_every, val_every, save_every), tracker, save)

- the steps run from `start` (0, or a resumed checkpoint's step) to `cadence.steps`;
- metrics are logged on the first step of the call, every `log_every` steps and on the last;
- the held-out check (`validate`) runs every `val_every` steps before the last, after the last
  step (always), and before the first when asked (`validate_first`, fresh runs only);
- `save(step, loop_state)` is called every `save_every` steps and on the last; a run of 0 steps
  saves its untrained models once, so later stages always find a checkpoint.

Changing when anything is logged, checked or saved is a change to `Cadence` or `fit`, here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nla.core.tracking import Tracker, progress

MAX_GRAD_NORM = 1.0  # every trainer clips its gradients to this norm before a step
SaveFn = Callable[[int, dict[str, Any]], None]  # save(step, loop_state): writes one checkpoint


@dataclass(frozen=True)
class Cadence:
    """When a loop of `steps` steps logs, runs its held-out check and saves (counted in finished steps)."""

    steps: int
    log_every: int = 1
    val_every: int = 0  # 0: the held-out check runs only after the last step
    save_every: int = 0  # 0: only after the last step

    def log(self, done: int, first: bool) -> bool:
        return first or done % self.log_every == 0 or done == self.steps

    def validate(self, done: int) -> bool:
        """Before the last step only: the check after the last step always runs (`Trainer.fit`)."""
        return bool(self.val_every) and done % self.val_every == 0 and done < self.steps

    def save(self, done: int) -> bool:
        return done == self.steps or bool(self.save_every) and done % self.save_every == 0


@dataclass
class FitResult:
    """What `fit` returns for every trainer."""

    step: int  # the step reached
    history: list[dict[str, float]] = field(default_factory=list)  # each step's metrics, this call
    val: dict[str, Any] = field(default_factory=dict)  # the held-out check after the last step
    first_val: dict[str, Any] | None = None  # the check before the first step (validate_first)


class Trainer(ABC):
    """The base of the AR, AV and joint trainers: subclasses define a step, a held-out check and the
    state a checkpoint needs; `fit` owns the order and timing of everything else."""

    name: str = "train"  # the progress bar's label

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (the `step`-th of the run) -> its metrics, the same on every process."""

    @abstractmethod
    def validate(self, step: int) -> dict[str, Any]:
        """The held-out check -> its metrics (collective: every process calls it)."""

    @abstractmethod
    def loop_state(self, done: int) -> dict[str, Any]:
        """What a checkpoint after `done` steps needs to resume exactly (cursor, skipped steps)."""

    def log_view(self, window: list[dict[str, float]]) -> dict[str, float]:
        """The metrics logged for the steps since the last log (default: the latest step's)."""
        return window[-1]

    def postfix(self, metrics: dict[str, float]) -> str:
        """The progress bar's summary of a step's metrics."""
        return ""

    def after_step(self, done: int, tracker: Tracker) -> None:  # noqa: B027 (optional, empty by default)
        """Anything else a step logs (RL: its samples table)."""

    def fit(
        self,
        start: int,
        cadence: Cadence,
        tracker: Tracker,
        save: SaveFn,
        show_progress: bool = True,
        is_main: bool = True,
        validate_first: bool = False,
    ) -> FitResult:
        result = FitResult(step=start)
        if validate_first and start == 0:
            result.first_val = self.validate(0)
            _log(tracker, result.first_val, 0)
        bar = progress(
            range(start, cadence.steps),
            enabled=show_progress and is_main,
            desc=self.name,
            initial=start,
            total=cadence.steps,
        )
        window: list[dict[str, float]] = []
        for step in bar:
            metrics = self.train_step(step)
            result.history.append(metrics)
            window.append(metrics)
            done = result.step = step + 1
            if cadence.log(done, first=step == start):
                tracker.log(self.log_view(window), done)
                bar.set_postfix_str(self.postfix(metrics))
                window = []
            self.after_step(done, tracker)
            if cadence.validate(done):
                _log(tracker, self.validate(done), done)
            if cadence.save(done):
                save(done, self.loop_state(done))
        bar.close()
        if cadence.steps == 0 and start == 0:  # nothing to train: the untrained models, once
            save(0, self.loop_state(0))
        result.val = self.validate(result.step)
        _log(tracker, result.val, result.step)
        return result


def _log(tracker: Tracker, metrics: dict[str, Any], step: int) -> None:
    if metrics:  # a process that does not check (the AR checks on the main one only) has nothing
        tracker.log(metrics, step)
