"""The training machinery the AR, AV and RL trainers share: which rows a step reads, the learning-rate
schedule, and one optimizer step.

    rows = row_stream(n_rows, seed, cursor, global_batch)     # the same window on every process
    mine = rank_share(rows, accelerator)                      # this process's part of it
    sched = schedule(opt, steps)                              # warm-up, then cosine to 0 (or flat)
    stepper = OptimizerStep("ar", opt, sched, clip)           # clip, skip non-finite, step, schedule
    grad_norm, skipped = stepper()

Rows: an endless stream of per-epoch permutations of range(n), each seeded by (seed, epoch). What
position g of the stream holds is a pure function of (n, seed, g), so a run resumed at cursor c
reads exactly what the uninterrupted run read there; the cursor counts rows taken by all processes.

One step policy: the gradient norm is clipped; a non-finite one (a bf16 overflow) skips the update
but not the schedule, which follows the step count; `MAX_CONSECUTIVE_SKIPS` skipped steps in a row
stop the run with a one-line error, since the weights are no longer moving.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from nla.core.config import ConfigError

ROW_SEED_STRIDE = 100_003  # epoch e of seed s is permutation number s * stride + e
WARMUP_FRACTION = 0.05  # of the steps, at least one
MAX_CONSECUTIVE_SKIPS = 20


class DivergedError(ConfigError):
    """Training stopped moving (every recent update was skipped); the message names the setting to change."""


def row_stream(n: int, seed: int, start: int, count: int) -> list[int]:
    """Rows start .. start+count-1 of the stream of seeded per-epoch permutations of range(n)."""
    if n < 1:
        raise ValueError("row_stream needs at least one row.")
    out, perms = [], {}
    for g in range(start, start + count):
        epoch = g // n
        if epoch not in perms:
            generator = torch.Generator().manual_seed(seed * ROW_SEED_STRIDE + epoch)
            perms[epoch] = torch.randperm(n, generator=generator).tolist()
        out.append(perms[epoch][g % n])
    return out


def warmup_steps(steps: int) -> int:
    return max(1, math.ceil(WARMUP_FRACTION * steps))


def lr_factor(step: int, steps: int, decay: str = "cosine") -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based) of `steps`: linear warm-up to 1
    over `warmup_steps`, then a cosine towards 0 that the last step does not reach ("cosine") or 1
    ("constant")."""
    warm = warmup_steps(steps)
    if step < warm:
        return (step + 1) / warm
    if decay == "constant":
        return 1.0
    if decay != "cosine":
        raise ValueError(f"unknown learning-rate decay {decay!r} (cosine or constant).")
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def schedule(optimizer: torch.optim.Optimizer, steps: int, decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """The one learning-rate schedule (`lr_factor`) as a scheduler; its state saves with the optimizer."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, decay))


class OptimizerStep:
    """One optimizer step under the shared policy (module docstring).

    `clip()` brings the gradients into shape and returns their total norm: `accelerator.clip_grad_norm_`
    for a prepared model, or an all-reduce plus `torch.nn.utils.clip_grad_norm_` for parameters the
    accelerator does not wrap (the RL adapters). `skipped` counts skipped steps over the run; a
    checkpoint saves it (`skip_counts`) and a resume restores it (`restore_skips`).
    """

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, scheduler, clip: Callable[[], Any]):
        self.name, self.optimizer, self.scheduler, self.clip = name, optimizer, scheduler, clip
        self.skipped, self.consecutive = 0, 0

    def __call__(self) -> tuple[float, bool]:
        """-> (gradient norm before clipping, whether the update was skipped)."""
        grad_norm = float(self.clip())
        skip = not math.isfinite(grad_norm)
        if skip:
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise DivergedError(
                    f"{MAX_CONSECUTIVE_SKIPS} {self.name.upper()} steps in a row had non-finite gradients; "
                    f"lower the {self.name.upper()} learning rate or use --dtype float32."
                )
        else:
            self.optimizer.step()
            self.consecutive = 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # after a skipped update torch warns "scheduler before optimizer"
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        return grad_norm, skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def saved(self) -> dict[str, Any]:
        """The optimizer and scheduler under this role's names in the checkpoint's training state."""
        out: dict[str, Any] = {f"{self.name}_optimizer": self.optimizer}
        if self.scheduler is not None:
            out[f"{self.name}_scheduler"] = self.scheduler
        return out


def skip_counts(*steppers: OptimizerStep) -> dict[str, int]:
    """The skipped-step counts a checkpoint saves, by optimizer name ({"av": 0, "ar": 1})."""
    return {s.name: s.skipped for s in steppers}


def restore_skips(saved: dict[str, int] | int | None, *steppers: OptimizerStep) -> None:
    """Each stepper's count from a checkpoint's `skipped` (by name; a bare number, as one-optimizer
    stages saved before, belongs to the single stepper)."""
    for s in steppers:
        if isinstance(saved, dict):
            s.skipped = int(saved.get(s.name, 0))
        else:
            s.skipped = int(saved or 0) if len(steppers) == 1 else 0
