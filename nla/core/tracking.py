"""Metrics go to <output_dir>/metrics.jsonl always, and to W&B unless report_to is 'none'.

W&B mode: the user's `wandb_mode`, else their WANDB_MODE, else offline (`wandb sync
<output_dir>/wandb/offline-run-*` uploads later). Nothing goes online unless asked: stored
credentials alone do not send a run (its sample tables hold corpus text), and online mode without
a network hangs for ~40 s. `wandb_tables false` keeps the sample tables out of W&B (they still go
to the local tables.jsonl). Only the main process logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from nla.core.config import NLAConfig
from nla.core.io import atomic_write_text


def resolve_wandb_mode(cfg_mode: str | None) -> str:
    return cfg_mode or os.environ.get("WANDB_MODE") or "offline"


class Tracker:
    """A thin, switchable logger: `log`, `log_table`, `summary`, `finish`. A no-op off the main process."""

    def __init__(self, cfg: NLAConfig, stage: str, is_main: bool = True, output_dir: str | Path | None = None):
        self.enabled = is_main
        self.stage = stage
        self.dir = Path(output_dir or cfg.output_dir)
        self.jsonl = self.dir / "metrics.jsonl"
        self.run = None
        self.wandb_mode = "disabled"
        self.upload_tables = cfg.logging.wandb_tables
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.report_to == "wandb":
            self.wandb_mode = resolve_wandb_mode(cfg.logging.wandb_mode)
            if self.wandb_mode != "disabled":
                import wandb

                self.run = wandb.init(
                    project=cfg.logging.wandb_project,
                    name=cfg.logging.run_name or f"{Path(cfg.run.output_dir).name}-{stage}",
                    group=Path(cfg.run.output_dir).name,
                    job_type=stage,
                    dir=str(self.dir),
                    mode=self.wandb_mode,
                    config=cfg.to_dict(),
                    reinit="finish_previous",
                )

    def forget_after(self, step: int) -> None:
        """A resume from `step`: drop this stage's metrics.jsonl lines logged after it (the steps
        are trained again and would otherwise appear twice)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        lines = self.jsonl.read_text(encoding="utf-8").splitlines()

        def later(line: str) -> bool:
            try:
                entry = json.loads(line)
            except ValueError:
                return False
            return entry.get("stage") == self.stage and int(entry.get("step", 0)) > step

        kept = [line for line in lines if not later(line)]
        if len(kept) != len(lines):
            atomic_write_text(self.jsonl, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": self.stage, "step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.run is not None:
            self.run.log(clean, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if not self.enabled:
            return
        with open(self.dir / "tables.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "step": step, "columns": columns, "rows": rows}, default=str) + "\n")
        if self.run is not None and self.upload_tables:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = _plain(v)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def progress(iterable=None, enabled: bool = True, **kw):
    """tqdm progress bar, silent when disabled (non-main processes, --progress false)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kw)
